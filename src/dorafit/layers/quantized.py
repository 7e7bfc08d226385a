"""What every quantized linear family shares: DoRA on a quantized frozen base without a dense W0.

A quantized layer stores W0 [out, in] compressed (4-bit codes with per-block scales, int8 rows with a scale
per row, ...). DoRA's factored norm (:func:`dorafit.functional.factored_norm`)

    n^2 = ||W0||^2 + 2 * rowsum(P * (W0 Q^T)) + rowsum(P * (P (Q Q^T)))

needs three things of W0, and none of them is the dense matrix:

    ||W0||^2 per row   constant: computed once, dequantizing a bounded block of rows at a time (:meth:`rows`)
    W0 Q^T  [out, r]   in training, the frozen layer's own forward on the r rows of Q, appended to the batch's
                       tokens: one quantized product gives ``W0 x`` and ``W0 Q^T`` together
                       (:meth:`low_rank_with_factor`); elsewhere (eval, merge) block by block in float32
                       (:func:`chunked_weight_times_factor`, exact, with a block-by-block gradient too)
    W0 x               the frozen layer's forward, as for QLoRA

So a DoRA step on a quantized base costs what a LoRA step on it costs, plus Q's r rows in the frozen product.
A family subclass says how its library computes the frozen product (:meth:`base`) and how to dequantize rows
``[start, stop)`` (:meth:`rows`, with :meth:`row_alignment`); in training and unmerged inference dorafit's
own code never creates a tensor of out * in elements for it (only :meth:`dequantized_weight` does, to write a
float model; and a bitsandbytes 4-bit layer whose width is no multiple of its block size, which is dequantized
in one piece as the library's own product does, see :mod:`dorafit.layers.bnb`). (The library's own kernels may:
bitsandbytes on CPU dequantizes the whole weight inside its matmul and its backward; torchao's NF4 linear does so
on every device.)

Adapters on a quantized layer are float32 whatever the compute dtype; the adapter input is cast to them and
the update's output back to the layer's. Merging into the quantized weight is refused (it would re-quantize
W0 + dW: lossy, and unmerge could not recover W0): :func:`dorafit.merge_and_unload` writes a float layer
instead (:meth:`float_linear`, merged in float32 from the dequantized W0).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import functional as Fn
from .frozen import blockwise_rows
from .linear import LinearOps

#: most elements dequantized at once (a block of rows), as for upcasting float weights
CHUNK_ELEMENTS = Fn._UPCAST_CHUNK_ELEMENTS
#: a block of rows is also at most 1/BLOCKS_PER_LAYER of the layer (as far as the quantization blocks allow a cut),
#: so even a small layer is never dequantized whole
BLOCKS_PER_LAYER = 8


class QuantizedLinearOps(LinearOps):
    """A linear layer whose frozen weight is quantized; subclasses name the library's pieces."""

    quantized = True
    can_merge_in_place = False
    blockwise_input_grad = False  # a family whose own backward multiplies in the compute dtype turns it on

    # ---- what a family provides ---------------------------------------------------------------------------
    def shape(self, module: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        """``W0 x`` without the bias, by the library's quantized product; output in x's dtype."""
        raise NotImplementedError

    def rows(self, module: nn.Module, start: int, stop: int) -> Tensor:
        """W0's rows ``[start, stop)`` dequantized, float32 [stop - start, in]; ``start`` is a multiple of
        :meth:`row_alignment` (and ``stop`` too, or the last row)."""
        raise NotImplementedError

    def row_alignment(self, module: nn.Module) -> int:
        """Blocks of rows must start at multiples of this (where the quantization blocks allow a cut)."""
        return 1

    def float_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype of the dequantized float layer :meth:`float_linear` writes by default."""
        return torch.float32

    # ---- the seam, from those ------------------------------------------------------------------------------
    def weight_matrix(self, module: nn.Module) -> Tensor:
        raise ValueError(f"{self.describe(module)} stores its weight quantized; dorafit does not read it as a dense "
                         "matrix. Write a float model first: dorafit.merge_and_unload(model) (with its adapter merged) "
                         "or dorafit.dequantize(model) (a model without adapters)")

    def weight_shape(self, module: nn.Module) -> list[int]:
        return list(self.shape(module))

    def adapter_dtype(self, module: nn.Module) -> torch.dtype:
        return torch.float32

    def cache_tensors(self, module: nn.Module) -> tuple[Tensor, ...]:
        return (module.weight,)

    def row_chunks(self, module: nn.Module) -> Iterator[tuple[int, Tensor]]:
        """(start, float32 rows) over all of W0: at most :data:`CHUNK_ELEMENTS` elements and 1/:data:`BLOCKS_PER_LAYER`
        of the rows at a time, in whole multiples of :meth:`row_alignment` rows."""
        out, inp = self.shape(module)
        align = self.row_alignment(module)
        rows = min(CHUNK_ELEMENTS // max(1, inp), -(-out // BLOCKS_PER_LAYER))
        step = max(align, rows // align * align)
        for start in range(0, out, step):
            yield start, self.rows(module, start, min(out, start + step))

    @torch.no_grad()
    def squared_row_norms(self, module: nn.Module) -> Tensor:
        out = torch.empty(self.shape(module)[0], dtype=torch.float32, device=module.weight.device)
        for start, rows in self.row_chunks(module):
            out[start : start + rows.shape[0]] = rows.pow(2).sum(dim=1)
        return out

    def weight_times_factor(self, module: nn.Module, q: Tensor) -> Tensor:
        return chunked_weight_times_factor(self, module, q.to(torch.float32))

    def compute_dtype(self, module: nn.Module, x: Tensor | None) -> torch.dtype:
        return x.dtype if x is not None else self.float_dtype(module)

    def input_grad(self, module: nn.Module, grad: Tensor) -> Tensor:
        return blockwise_rows(grad, self.row_chunks(module), self.shape(module)[1])

    def down(self, module: nn.Module, x: Tensor, q: Tensor) -> Tensor:
        return F.linear(x.to(q.dtype), q)  # [..., r], in the adapter's dtype

    def low_rank(self, module: nn.Module, x: Tensor, x_adapter: Tensor, p: Tensor, q: Tensor,
                 with_bias: bool) -> Tensor:
        """The generic form (the library computes W0 x); the update is cast back to the output's dtype."""
        return super(LinearOps, self).low_rank(module, x, x_adapter, p, q, with_bias)

    def low_rank_with_factor(self, module: nn.Module, x: Tensor, x_adapter: Tensor, p: Tensor, q: Tensor,
                             factor_grad: bool) -> tuple[Tensor, Tensor]:
        """One frozen product for the tokens and Q's r rows: ``base([x; Q]) = [W0 x; (W0 Q^T)^T]``.

        Returns ``(W0 x + P Q x_adapter, W0 Q^T)``; ``W0 Q^T`` is in the compute dtype the layer uses for x and
        carries a gradient to q only with ``factor_grad``."""
        x2 = x.reshape(-1, x.shape[-1])
        factor = q if factor_grad else q.detach()
        both = self.base(module, torch.cat([x2, factor.to(x2.dtype)]))  # [tokens + r, out]
        tokens = x2.shape[0]
        y = both[:tokens].view(*x.shape[:-1], both.shape[-1])
        pre = y + self.up(module, self.down(module, x_adapter, q), p).to(y.dtype)
        return pre, both[tokens:].T

    # ---- leaving the quantized world -----------------------------------------------------------------------
    @torch.no_grad()
    def dequantized_weight(self, module: nn.Module) -> Tensor:
        """The dense float32 W0 [out, in], block by block: only for writing a float model (merge, dequantize)."""
        out, inp = self.shape(module)
        w = torch.empty(out, inp, dtype=torch.float32, device=module.weight.device)
        for start, rows in self.row_chunks(module):
            w[start : start + rows.shape[0]] = rows
        return w

    @torch.no_grad()
    def float_linear(self, module: nn.Module, weight: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with ``weight`` (default: the dequantized W0) and the layer's bias, in ``dtype``
        (default: :meth:`float_dtype`)."""
        out, inp = self.shape(module)
        dtype = dtype or self.float_dtype(module)
        bias = getattr(module, "bias", None)
        layer = nn.Linear(inp, out, bias=bias is not None, device=module.weight.device, dtype=dtype)
        layer.weight.copy_(self.dequantized_weight(module) if weight is None else weight)
        if bias is not None:
            layer.bias.copy_(bias)
        layer.requires_grad_(False)
        return layer.train(module.training)


class _ChunkedWeightTimesFactor(torch.autograd.Function):
    """``W0 Q^T`` and its gradient ``dL/dQ = G^T W0`` (G = dL/d(W0 Q^T), [out, r]), a block of rows at a time."""

    @staticmethod
    def forward(ctx, q: Tensor, ops: QuantizedLinearOps, module: nn.Module) -> Tensor:
        ctx.ops, ctx.module = ops, module
        return torch.cat([rows @ q.T for _, rows in ops.row_chunks(module)], dim=0)  # [out, r]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        grad_q = None
        for start, rows in ctx.ops.row_chunks(ctx.module):
            part = grad[start : start + rows.shape[0]].T @ rows  # [r, in]
            grad_q = part if grad_q is None else grad_q.add_(part)
        return grad_q, None, None


def chunked_weight_times_factor(ops: QuantizedLinearOps, module: nn.Module, q: Tensor) -> Tensor:
    """``W0 Q^T`` [out, r] in q's dtype (float32), exact and differentiable in q, never holding more than a block
    of W0's rows; a quantized layer's ``W0 Q^T`` outside training (eval, merge)."""
    return _ChunkedWeightTimesFactor.apply(q, ops, module)
