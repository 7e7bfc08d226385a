"""DoRA's output scale ``y = (m / n) * pre + b`` as one autograd function that saves little.

``pre = W0 x + dW x`` is the layer output before the magnitude (no bias). Per output unit j:

    y_j = (m_j / n_j) * pre_j + b_j
    dL/dpre_j = (m_j / n_j) * g_j                       g = dL/dy
    dL/dm_j   = sum_tokens(g_j * pre_j) / n_j            (paper eq. 7)
    dL/dn_j   = -m_j * sum_tokens(g_j * pre_j) / n_j^2   (only when the norm is not detached; autograd carries
                                                         it on into P and Q, which gives paper eq. 6)
    dL/db_j   = sum_tokens(g_j)

Plain autograd would save ``pre``, a [tokens, out] tensor that nothing else keeps. This function saves its
own output ``y`` instead wherever y determines pre well, because the next operation very often saves y
anyway (attention saves q, k, v; a gated MLP saves up; GELU saves its input), so the two share one storage:

    no bias:                           sum(g * pre) / n = sum(g * y) / m                     (exact)
    bias, float32 or float64 output:   sum(g * pre) / n = (sum(g * y) - b * sum(g)) / m     (y - b rounds like
                                       any float op: relative error ~1e-7 * |b| / |y - b| in float32)
    bias, half-precision output:       saves pre (y - b would lose pre's low digits)

A unit whose magnitude is exactly zero gets no magnitude gradient in the y forms (its output carries no
information about pre). With ``inplace`` (the adapted layers' forward) y overwrites pre's storage.

With ``recompute`` (``AdapterConfig(magnitude_grad="recompute")``) it saves neither y nor pre: backward
calls ``recompute(*recompute_inputs)`` (the layer's own forward without bias, ``pre = W0 x + P Q x``, run
without grad from the tensors the low-rank product saves anyway: x, its dropout, P and Q) and uses

    dL/dm_j = sum_tokens(g_j * pre_j) / n_j      with pre recomputed: exact, in any dtype,

at the cost of one more forward product of the layer per backward.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) the scale is plain differentiable operations
(:func:`magnitude_scale_reference`): Dynamo cannot trace ``ctx.mark_dirty`` of an input that is not
returned, and Inductor fuses ``pre * (m / n) + b`` into one pass. The compiled graph then keeps pre for
backward; with ``magnitude_grad="recompute"`` the adapted layer puts the whole layer in a checkpointed
region instead (see ``AdaptedLayer.forward``), and the graph recomputes it in backward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable
from torch import Tensor


def _broadcast_shape(ndim: int, channel_dim: int) -> list[int]:
    shape = [1] * ndim
    shape[channel_dim] = -1
    return shape


def _reduce_except_channel(t: Tensor, channel_dim: int) -> Tensor:
    dims = [d for d in range(t.dim()) if d != channel_dim % t.dim()]
    return t.sum(dim=dims, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _saves_output(pre: Tensor, bias: Tensor | None) -> bool:
    """Whether backward can work from y instead of pre (see the module docstring)."""
    return bias is None or pre.dtype in (torch.float32, torch.float64)


def _scale_and_bias(pre: Tensor, magnitude: Tensor, norm: Tensor, bias: Tensor | None,
                    channel_dim: int) -> tuple[Tensor, Tensor | None]:
    """``m / n`` and the bias in pre's dtype, shaped to broadcast along ``channel_dim``."""
    shape = _broadcast_shape(pre.dim(), channel_dim)
    scale = (magnitude / norm).to(pre.dtype).view(shape)  # [out], broadcast along channel_dim
    return scale, None if bias is None else bias.to(pre.dtype).view(shape)


class _MagnitudeScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, magnitude: Tensor, norm: Tensor, bias: Tensor | None, channel_dim: int,
                inplace: bool, recompute: Callable[..., Tensor] | None, *recompute_inputs: Tensor) -> Tensor:
        scale, bias_b = _scale_and_bias(pre, magnitude, norm, bias, channel_dim)
        # with recompute, backward needs neither y nor pre, so y may always overwrite pre
        saves_output = recompute is None and _saves_output(pre, bias)
        if bias_b is None:
            y = pre.mul_(scale) if inplace else pre * scale
        elif inplace and (saves_output or recompute is not None):
            y = torch.addcmul(bias_b, pre, scale, out=pre)
        else:
            y = torch.addcmul(bias_b, pre, scale)
        if y is pre:
            ctx.mark_dirty(pre)
        ctx.channel_dim = channel_dim
        ctx.saves_output = saves_output
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.recompute = recompute
        if recompute is None:
            ctx.save_for_backward(y if saves_output else pre, magnitude, norm, scale, bias_b)
        else:
            ctx.save_for_backward(None, magnitude, norm, scale, bias_b, *recompute_inputs)
        return y

    @staticmethod
    @once_differentiable  # saves intermediates: a second derivative would be wrong, so it raises instead
    def backward(ctx, grad_y: Tensor):
        saved, magnitude, norm, scale, bias_b, *recompute_inputs = ctx.saved_tensors
        cd = ctx.channel_dim
        need_pre, need_m, need_n, need_b = ctx.needs_input_grad[:4]
        grad_pre = grad_m = grad_n = grad_b = None
        grad_sum = None  # sum(g) over tokens, [out]
        if bias_b is not None and (need_b or (ctx.saves_output and (need_m or need_n))):
            grad_sum = _reduce_except_channel(grad_y, cd)
        product = None  # [tokens, out]; its storage is reused for grad_pre
        if need_m or need_n:
            if ctx.recompute is not None:
                with torch.no_grad():
                    saved = ctx.recompute(*recompute_inputs)  # pre, as the forward computed it
            product = grad_y * saved  # g * y or g * pre
            g_dot = _reduce_except_channel(product, cd)  # [out]
            if ctx.saves_output:  # sum(g * pre) / n == (sum(g * y) - b sum(g)) / m
                if bias_b is not None:
                    g_dot = g_dot - bias_b.flatten().to(g_dot.dtype) * grad_sum
                g_pre_over_n = torch.where(magnitude == 0, torch.zeros_like(g_dot), g_dot / magnitude)
            else:
                g_pre_over_n = g_dot / norm
            if need_m:
                grad_m = g_pre_over_n.to(magnitude.dtype)
            if need_n:
                grad_n = (-(magnitude / norm) * g_pre_over_n).to(norm.dtype)
        if need_pre:
            grad_pre = grad_y * scale if product is None else torch.mul(grad_y, scale, out=product)
        if bias_b is not None and need_b:
            grad_b = grad_sum.to(ctx.bias_dtype)
        return (grad_pre, grad_m, grad_n, grad_b, None, None, None) + (None,) * len(recompute_inputs)


def magnitude_scale_reference(pre: Tensor, magnitude: Tensor, norm: Tensor, bias: Tensor | None,
                              channel_dim: int) -> Tensor:
    """``y = (magnitude / norm) * pre + bias`` in plain differentiable operations (autograd saves pre).

    What a compiled graph uses; also the reference the custom function is tested against.
    """
    shape = _broadcast_shape(pre.dim(), channel_dim)
    y = pre * (magnitude / norm).to(pre.dtype).view(shape)
    return y if bias is None else y + bias.to(pre.dtype).view(shape)


def magnitude_scale(
    pre: Tensor, magnitude: Tensor, norm: Tensor, bias: Tensor | None, channel_dim: int, inplace: bool = False,
    recompute: Callable[..., Tensor] | None = None, recompute_inputs: tuple[Tensor, ...] = (),
) -> Tensor:
    """``y = (magnitude / norm) * pre + bias``, broadcast along ``channel_dim`` (see the module docstring).

    Args:
        pre: layer output before the magnitude, without bias, e.g. [batch, tokens, out] or [batch, out, h, w].
        magnitude: m, [out] (float32 even for low-precision models).
        norm: n, [out]; pass it detached for the paper's memory-saving form (section 4.3).
        bias: the layer's bias [out] or None; never scaled.
        channel_dim: the dimension of ``pre`` that indexes output units (-1 for linear, 1 for conv).
        inplace: write y into ``pre``'s storage where backward does not need pre (saves a [tokens, out]
            tensor). Only for a ``pre`` that nothing else uses; autograd raises an error in backward if
            something saved it.
        recompute, recompute_inputs: save ``recompute_inputs`` instead of y or pre, and let backward compute
            pre again as ``recompute(*recompute_inputs)`` (run without grad) for the magnitude's gradient.
    Under ``torch.compile`` this is :func:`magnitude_scale_reference` (``inplace`` and ``recompute`` do not
    apply: the compiled graph plans its memory itself).
    """
    if torch.compiler.is_compiling():
        return magnitude_scale_reference(pre, magnitude, norm, bias, channel_dim)
    if not torch.is_grad_enabled():  # inference: the forward's operations without the autograd function's cost
        return scale_output(pre, magnitude / norm, bias, channel_dim, inplace)
    return _MagnitudeScale.apply(pre, magnitude, norm, bias, channel_dim, inplace, recompute, *recompute_inputs)


def scale_output(pre: Tensor, scale: Tensor, bias: Tensor | None, channel_dim: int, inplace: bool = False) -> Tensor:
    """``y = scale * pre + bias`` without autograd (inference), ``scale = m / n`` [out] given: the operations of
    :func:`magnitude_scale`'s forward, for a caller that keeps ``m / n`` (``AdaptedLayer``'s eval-mode cache)."""
    shape = _broadcast_shape(pre.dim(), channel_dim)
    scale = scale.to(pre.dtype).view(shape)
    if bias is None:
        return pre.mul_(scale) if inplace else pre * scale
    bias = bias.to(pre.dtype).view(shape)
    return torch.addcmul(bias, pre, scale, out=pre) if inplace else torch.addcmul(bias, pre, scale)
