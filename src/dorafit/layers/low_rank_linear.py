"""``y = W0 x + P (Q x) + b`` for a linear map, as one autograd function: the fast path of linear layers.

With x: [tokens, in], W0: [out, in], P: [out, r], Q: [r, in]:

    forward:   u   = x Q^T                        [tokens, r]
               y   = x W0^T + b;  y += u P^T      the second product accumulates into y (addmm): no separate
                                                  pass over [tokens, out] to add the adapter
    backward:  g_u = g P                          [tokens, r]   (g = dL/dy)
               g_x = g W0;  g_x += g_u Q          accumulated the same way (autograd would add two tensors)
               g_P = g^T u,   g_Q = g_u^T x,   g_b = sum over tokens of g,   g_W0 = g^T x (only if W0 trains)

It saves x and u, as LoRA through plain autograd does, and creates no [out, in] tensor unless W0 itself
requires a gradient. The generic path (``LayerOps.low_rank``) computes the same map from ``base``,
``down`` and ``up``; tests check both against the dense formula in float64.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F
from torch import Tensor


def _forward(x: Tensor, w0: Tensor, p: Tensor, q: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, x2, u)``: the output, x as [tokens, in] and ``u = x Q^T``."""
    # y is created with its final shape and written through 2-D views, so that it is not a view itself
    # (the magnitude scale that follows in DoRA updates it in place)
    x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
    u = x2 @ q.T  # [tokens, r]
    y = F.linear(x, w0, bias).contiguous()  # [..., out] (contiguous already; made sure for the view below)
    y.view(-1, y.shape[-1]).addmm_(u, p.T)
    return y, x2, u


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, p: Tensor, q: Tensor, bias: Tensor | None) -> Tensor:
        y, x2, u = _forward(x, w0, p, q, bias)
        ctx.save_for_backward(x2, u, w0, p, q)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable  # saves intermediates: a second derivative would be wrong, so it raises instead
    def backward(ctx, grad_y: Tensor):
        x2, u, w0, p, q = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [tokens, out]
        need_x, need_w0, need_p, need_q, need_b = ctx.needs_input_grad
        grad_x = grad_w0 = grad_p = grad_q = grad_b = None
        g_u = g @ p if (need_x or need_q) else None  # [tokens, r]
        if need_x:
            grad_x = (grad_y @ w0).contiguous()  # [..., in]
            grad_x.view(-1, grad_x.shape[-1]).addmm_(g_u, q)
        if need_w0:
            grad_w0 = g.T @ x2
        if need_p:
            grad_p = g.T @ u
        if need_q:
            grad_q = g_u.T @ x2
        if need_b and ctx.has_bias:
            grad_b = g.sum(dim=0)
        return grad_x, grad_w0, grad_p, grad_q, grad_b


def low_rank_linear(x: Tensor, w0: Tensor, p: Tensor, q: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x W0^T + (x Q^T) P^T + b`` (see the module docstring). x: [..., in]; returns [..., out]. Without grad
    mode (inference) the same operations run without the autograd function (whose call costs more than the
    low-rank product at one token)."""
    if not torch.is_grad_enabled():
        return _forward(x, w0, p, q, bias)[0]
    return _LowRankLinear.apply(x, w0, p, q, bias)
