"""The math of every adapter, as small pure functions. Forward and merge both call these.

Notation (PyTorch layout): a frozen weight seen as a matrix ``W0`` of shape [out, in] (conv kernels are
flattened over every non-output dimension; an embedding table [num, dim] is seen as the linear map
one-hot(num) -> dim, i.e. ``W0 = table.T``).

Every directional update is a product of two factors,

    dW = P @ Q,        P: [out, r], Q: [r, in]

    LoRA  (Hu et al. 2021):        P = s * B,                    Q = A,   s = alpha / r  (rsLoRA: alpha / sqrt r)
    VeRA  (Kopiczko et al. 2023):  P = diag(lambda_b) B diag(lambda_d),  Q = A   (A, B frozen, shared)

and a weight-decomposed method (DoRA, Liu et al. 2024, eq. 5) rescales every output row:

    W' = m * V' / n,   V' = W0 + dW,   n = ||V'|| over the input dimension (one value per output unit)

``n`` is never built from the dense [out, in] matrix V' (METHOD.md, "Computing n cheaply"):

    n^2 = ||W0||^2 + 2 * rowsum(P * (W0 Q^T)) + rowsum(P * (P (Q Q^T)))

``||W0||^2`` is constant (W0 is frozen), ``W0 Q^T`` is [out, r] and ``Q Q^T`` is [r, r], so the extra memory
is O((out + in) r). Norms are computed in float32 (float64 for float64 weights) with a floor ``eps``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Largest temporary (in elements) used when a low-precision weight is upcast to float32 chunk by chunk.
_UPCAST_CHUNK_ELEMENTS = 1 << 20  # 4 MiB in float32: a small transient beside the model


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are computed in: float64 for float64 weights, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(w0: Tensor):
    """Yield (start, rows) of ``w0`` upcast to the norm dtype, never more than a bounded chunk at once."""
    dtype = norm_dtype(w0.dtype)
    if w0.dtype == dtype:
        yield 0, w0
        return
    step = max(1, _UPCAST_CHUNK_ELEMENTS // max(1, w0.shape[1]))
    for start in range(0, w0.shape[0], step):
        yield start, w0[start : start + step].to(dtype)


def squared_row_norms(w0: Tensor) -> Tensor:
    """``||W0[j]||^2`` for every output row j: [out], in the norm dtype. W0: [out, in]."""
    out = torch.empty(w0.shape[0], dtype=norm_dtype(w0.dtype), device=w0.device)
    for start, rows in _row_chunks(w0):
        out[start : start + rows.shape[0]] = rows.pow(2).sum(dim=1)
    return out


def weight_times_factor(w0: Tensor, q: Tensor) -> Tensor:
    """``W0 @ Q^T``: [out, r] in the norm dtype, without upcasting all of W0 at once. W0: [out, in], Q: [r, in]."""
    dtype = norm_dtype(w0.dtype)
    q = q.to(dtype)
    if w0.dtype == dtype:
        return w0 @ q.T
    return torch.cat([rows @ q.T for _, rows in _row_chunks(w0)], dim=0)


def delta_weight(p: Tensor, q: Tensor) -> Tensor:
    """The directional update ``dW = P @ Q``: [out, in]."""
    return p @ q


def decomposed_norm(w0_sq: Tensor, w0: Tensor, p: Tensor | None, q: Tensor | None, eps: float) -> Tensor:
    """``n = ||W0 + P Q||`` per output row, from the factored form (no [out, in] temporary).

    Args:
        w0_sq: ``||W0||^2`` per row, [out] (see :func:`squared_row_norms`).
        w0: the frozen weight as a matrix, [out, in].
        p, q: the update's factors, [out, r] and [r, in], or None for a magnitude-only module (n = ||W0||).
        eps: floor on n; all-zero rows would otherwise give 0/0.

    Returns:
        n, [out], in the norm dtype. Differentiable in p and q.
    """
    w0_qt = None if p is None else weight_times_factor(w0, q.to(w0_sq.dtype))
    return factored_norm(w0_sq, w0_qt, p, q, eps)


def factored_norm(w0_sq: Tensor, w0_qt: Tensor | None, p: Tensor | None, q: Tensor | None, eps: float) -> Tensor:
    """``n = ||W0 + P Q||`` per output row from what the factored form needs of W0, and nothing else:

        n^2 = ||W0||^2 + 2 * rowsum(P * (W0 Q^T)) + rowsum(P * (P (Q Q^T)))

    Args:
        w0_sq: ``||W0||^2`` per row, [out].
        w0_qt: ``W0 Q^T``, [out, r] (None when p is None). For a quantized frozen layer it is the layer's own
            forward applied to the r rows of Q, transposed; W0 itself is never needed.
        p, q, eps: as in :func:`decomposed_norm`.

    Returns:
        n, [out], in ``w0_sq``'s dtype. Differentiable in p, q and ``w0_qt``.
    """
    n_sq = w0_sq
    if p is not None:
        dtype = w0_sq.dtype
        p32, q32 = p.to(dtype), q.to(dtype)
        cross = (p32 * w0_qt.to(dtype)).sum(dim=1)  # [out]
        quad = (p32 * (p32 @ (q32 @ q32.T))).sum(dim=1)  # [out]
        n_sq = w0_sq + 2.0 * cross + quad
    return n_sq.clamp_min(eps * eps).sqrt()


def merged_weight(w0: Tensor, p: Tensor | None, q: Tensor | None, magnitude: Tensor | None, n: Tensor | None) -> Tensor:
    """The weight a merged layer uses: ``W0 + P Q`` (LoRA, VeRA) or ``m / n * (W0 + P Q)`` (decomposed).

    Computed in the norm dtype and returned in W0's dtype. W0: [out, in].
    """
    dtype = norm_dtype(w0.dtype)
    w = w0.to(dtype)
    if p is not None:
        w = w + delta_weight(p.to(dtype), q.to(dtype))
    if magnitude is not None:
        w = w * (magnitude.to(dtype) / n.to(dtype)).unsqueeze(1)
    return w.to(w0.dtype)


def unmerged_weight(w: Tensor, p: Tensor | None, q: Tensor | None, magnitude: Tensor | None,
                    n: Tensor | None) -> Tensor:
    """Inverse of :func:`merged_weight`: ``W0 = W' * n / m - P Q``, with the n that the merge used.

    Rows whose magnitude is exactly zero cannot be recovered from W' and are returned as zeros; the caller keeps them.
    """
    dtype = norm_dtype(w.dtype)
    w0 = w.to(dtype)
    if magnitude is not None:
        m = magnitude.to(dtype)
        w0 = w0 * torch.where(m == 0, torch.zeros_like(m), n.to(dtype) / m).unsqueeze(1)
    if p is not None:
        w0 = w0 - delta_weight(p.to(dtype), q.to(dtype))
    return w0.to(w.dtype)


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """LoRA's scale s: ``alpha / r``, or rsLoRA's ``alpha / sqrt(r)`` (Kalajdzievski 2023)."""
    return alpha / (r**0.5) if rslora else alpha / r


def lora_factors(lora_a: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """LoRA's factors: ``P = s * B`` [out, r], ``Q = A`` [r, in] (conv kernels flattened)."""
    return lora_b.flatten(1) * scale, lora_a.flatten(1)


def vera_factors(vera_a: Tensor, vera_b: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> tuple[Tensor, Tensor]:
    """VeRA's factors: ``P = diag(lambda_b) B diag(lambda_d)`` [out, r], ``Q = A`` [r, in]."""
    return lambda_b.unsqueeze(1) * vera_b * lambda_d.unsqueeze(0), vera_a


def update_factors(update: str | None, tensors, scale: float) -> tuple[Tensor | None, Tensor | None]:
    """``(P, Q)`` of a directional update from the tensors a layer stores for it, or (None, None) without one.

    update 'lora': tensors (lora_A, lora_B), see :func:`lora_factors`; 'vera': (A, B, lambda_d, lambda_b), see
    :func:`vera_factors`; None or 'none' (magnitude-only): no tensors.
    """
    if update == "lora":
        return lora_factors(*tensors, scale)
    if update == "vera":
        return vera_factors(*tensors)
    return None, None
