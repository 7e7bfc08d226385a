"""What the adapter code needs to know about one layer family, and nothing else.

A layer family (``nn.Linear``, ``nn.ConvNd``, ``nn.Embedding``, transformers' ``Conv1D``) is described by a
:class:`LayerOps`: how its weight reads as a matrix [out, in], how it computes ``W0 x`` without its bias,
and how an update's factors ``Q`` [r, in] and ``P`` [out, r] are applied to its input, so that

    base(x) + up(down(x, Q), P) == the layer's own forward with weight W0 + P Q (bias excluded).
"""

from __future__ import annotations

from torch import Tensor, nn


class LayerOps:
    """Base description; each family overrides what differs. All methods are static-like (take the module)."""

    #: dimension of the output that indexes output units (-1: last, 1: channels of a conv)
    channel_dim: int = -1
    #: whether dropout on the adapter input makes sense (not for token ids)
    supports_dropout: bool = True
    #: LoRA init: which factor starts at zero ("B" for the usual LoRA; PEFT zeroes A for embeddings)
    zero_factor: str = "B"

    def check(self, module: nn.Module) -> None:
        """Raise ValueError if this module's configuration cannot be adapted exactly."""

    def weight_matrix(self, module: nn.Module) -> Tensor:
        """The frozen weight as a matrix [out, in] (a view of ``module.weight``)."""
        raise NotImplementedError

    def set_weight_matrix(self, module: nn.Module, matrix: Tensor) -> None:
        """Write a matrix [out, in] into ``module.weight`` in place, in the module's own layout."""
        self.weight_matrix(module).copy_(matrix)

    def lora_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A`` and ``lora_B`` as stored (the same as the PEFT library stores them)."""
        out, inp = self.weight_matrix(module).shape
        return (r, inp), (out, r)

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        """``W0 x`` without the bias."""
        raise NotImplementedError

    def down(self, module: nn.Module, x: Tensor, q: Tensor) -> Tensor:
        """``Q x``: the input projected to rank r. q: [r, in]."""
        raise NotImplementedError

    def up(self, module: nn.Module, u: Tensor, p: Tensor) -> Tensor:
        """``P u``: rank r back to the output units. p: [out, r]."""
        raise NotImplementedError

    def low_rank(
        self, module: nn.Module, x: Tensor, x_adapter: Tensor, p: Tensor, q: Tensor, with_bias: bool
    ) -> Tensor:
        """``W0 x + P Q x_adapter`` (+ the bias if ``with_bias``); ``x_adapter`` is x after the adapter's dropout.

        Generic: from :meth:`base`, :meth:`down` and :meth:`up`. Families with a faster equivalent override it.
        """
        y = self.base(module, x)
        y = y + self.up(module, self.down(module, x_adapter, q), p)
        return self.add_bias(module, y) if with_bias else y

    def add_bias(self, module: nn.Module, y: Tensor) -> Tensor:
        bias = getattr(module, "bias", None)
        if bias is None:
            return y
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return y + bias.view(shape)

    def finish(self, module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Anything the family's forward does after the bias (e.g. a scaled embedding's factor)."""
        return y
