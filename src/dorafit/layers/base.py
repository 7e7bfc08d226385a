"""What the adapter code needs to know about one layer family, and nothing else.

A layer family (``nn.Linear``, ``nn.ConvNd``, ``nn.Embedding``, transformers' ``Conv1D``) is described by a
:class:`LayerOps`: how its weight reads as a matrix [out, in], how it computes ``W0 x`` without its bias,
and how an update's factors ``Q`` [r, in] and ``P`` [out, r] are applied to its input, so that

    base(x) + up(down(x, Q), P) == the layer's own forward with weight W0 + P Q (bias excluded).

The quantization seam: everything DoRA needs from W0 also goes through a family's ops, so a family whose
weight is stored quantized (:mod:`dorafit.layers.quantized`) never has to produce a dense [out, in] matrix:
its :meth:`~LayerOps.shape`, :meth:`~LayerOps.squared_row_norms` (``||W0||^2``, read a bounded block of rows at
a time), :meth:`~LayerOps.weight_times_factor` (``W0 Q^T``), the frozen forward :meth:`~LayerOps.base`, the
dtype adapters are kept in, and whether the weight can take a merge in place (:attr:`~LayerOps.can_merge_in_place`).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn

from .. import functional as Fn


class LayerOps:
    """Base description; each family overrides what differs. All methods are static-like (take the module)."""

    #: dimension of the output that indexes output units (-1: last, 1: channels of a conv)
    channel_dim: int = -1
    #: whether dropout on the adapter input makes sense (not for token ids)
    supports_dropout: bool = True
    #: LoRA init: which factor starts at zero ("B" for the usual LoRA; PEFT zeroes A for embeddings)
    zero_factor: str = "B"
    #: the frozen weight is stored quantized: it is never read as a dense matrix (:meth:`weight_matrix` refuses)
    quantized: bool = False
    #: merge may write W0 + dW into the layer's own weight (not into a quantized one: that would re-quantize it)
    can_merge_in_place: bool = True
    #: on a CPU that multiplies the compute dtype slowly, training computes the frozen product's input gradient
    #: with :meth:`input_grad` (:mod:`dorafit.layers.frozen`)
    blockwise_input_grad: bool = False

    def check(self, module: nn.Module) -> None:
        """Raise ValueError if this module's configuration cannot be adapted exactly."""

    def prepare(self, module: nn.Module) -> None:
        """Called once when the module gets its first adapter (after :meth:`check`)."""

    def describe(self, module: nn.Module) -> str:
        """What the layer is, for messages."""
        return type(module).__name__

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """``(out, in)`` of W0."""
        out, inp = self.weight_matrix(module).shape
        return out, inp

    def weight_shape(self, module: nn.Module) -> list[int]:
        """The shape of the weight as the unquantized layer stores it (recorded in adapter files)."""
        return list(module.weight.shape)

    def adapter_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype of new adapter tensors (LoRA factors, VeRA vectors): the weight's own."""
        return module.weight.dtype

    def cache_tensors(self, module: nn.Module) -> tuple[Tensor, ...]:
        """The tensors W0 is stored in: cached norms are recomputed when any of them changes."""
        return (self.weight_matrix(module),)

    def squared_row_norms(self, module: nn.Module) -> Tensor:
        """``||W0[j]||^2`` per output row j: [out], in the norm dtype."""
        return Fn.squared_row_norms(self.weight_matrix(module))

    def weight_times_factor(self, module: nn.Module, q: Tensor) -> Tensor:
        """``W0 Q^T``: [out, r] in the norm dtype, differentiable in q. q: [r, in]."""
        w0 = self.weight_matrix(module)
        return Fn.weight_times_factor(w0, q.to(Fn.norm_dtype(w0.dtype)))

    def low_rank_with_factor(self, module: nn.Module, x: Tensor, x_adapter: Tensor, p: Tensor, q: Tensor,
                             factor_grad: bool) -> tuple[Tensor, Tensor | None]:
        """``(W0 x + P Q x_adapter, W0 Q^T or None)``: a family whose frozen forward is costly per call (a
        quantized one) computes both in one call; others return None and the norm computes ``W0 Q^T`` itself.
        ``factor_grad``: ``W0 Q^T`` must carry a gradient to q (DoRA with ``detach_norm=False``)."""
        return self.low_rank(module, x, x_adapter, p, q, with_bias=False), None

    def compute_dtype(self, module: nn.Module, x: Tensor | None) -> torch.dtype:
        """The dtype of the frozen product of input ``x`` (None: the layer's usual one)."""
        return module.weight.dtype

    def input_grad(self, module: nn.Module, grad: Tensor) -> Tensor:
        """``g W0`` ([..., out] to [..., in], float32) a block of W0's rows at a time (:mod:`dorafit.layers.frozen`)."""
        raise NotImplementedError

    def frozen_product(self, module: nn.Module, x: Tensor, product: Callable[[Tensor], Tensor]) -> Tensor:
        """``product(x)`` (the frozen ``W0 x``), its input gradient from :meth:`input_grad` where
        :func:`dorafit.layers.frozen.needs_input_grad` says so (a frozen weight only)."""
        from .frozen import needs_input_grad, with_input_grad

        if (not self.blockwise_input_grad or module.weight.requires_grad
                or not needs_input_grad(x, self.compute_dtype(module, x))):
            return product(x)
        return with_input_grad(x, product, functools.partial(self.input_grad, module))

    def weight_matrix(self, module: nn.Module) -> Tensor:
        """The frozen weight as a matrix [out, in] (a view of ``module.weight``)."""
        raise NotImplementedError

    def set_weight_matrix(self, module: nn.Module, matrix: Tensor) -> None:
        """Write a matrix [out, in] into ``module.weight`` in place, in the module's own layout."""
        self.weight_matrix(module).copy_(matrix)

    def lora_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``lora_A`` and ``lora_B`` as stored (the same as the PEFT library stores them)."""
        out, inp = self.shape(module)
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
        y = y + self.up(module, self.down(module, x_adapter, q), p).to(y.dtype)
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
