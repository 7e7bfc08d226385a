"""A mixed-adapter batch through one linear layer in a fixed number of operations (S-LoRA/Punica style, on CPU).

:meth:`dorafit.adapted.AdaptedLayer.per_row_forward` gives row i of a batch adapter ``a(i)``. Looping over the
batch's adapters costs about ten small operations per adapter per layer (gather the rows, two rank-r products,
the scale, scatter back), which at decode time (one token per row) cost more than the products themselves. Here
the adapters of the batch are stacked once per layer (eval mode) and reused until one of their tensors changes:

    Q_cat = [Q_1; ...; Q_S]        [R, in]     R = r_1 + ... + r_S (the LoRA/VeRA adapters of the batch)
    P_cat = [P_1, ..., P_S]        [out, R]    P = s B (LoRA), diag(lambda_b) B diag(lambda_d) (VeRA)
    C     = [c_1; ...; c_S; 1]     [S + 1, out]  c = m / n (DoRA, DVoRA, magnitude-only), 1 (LoRA, VeRA, base)

and the whole batch is, whatever its mix of adapters (LoRA, DoRA, VeRA, DVoRA, magnitude-only, the base):

    u = Q_cat x                    [..., R]   every adapter's down-projection of every row (one product)
    u = u * M                      M[i, j] = 1 where column j belongs to a(i), else 0
    y = C[a(i)] * (W0 x + P_cat u) + b

Row i's output is exactly its own adapter's ``c (W0 x + P Q x) + b``: the other adapters' columns of u are
zeroed, and adding their zero products changes no sum (up to the order of rounding inside one product). The
down-projection costs S times a single adapter's and the up-projection R columns instead of r: negligible for a
few rows (decoding), so this path is taken for inputs of at most :data:`MAX_TOKENS` tokens; longer inputs (prompt
prefill) keep the per-adapter loop, whose fixed costs are then small.

The stack is memoised in the layer's :class:`~dorafit.norm_cache.NormCache` under one name, keyed by the version
counters of W0, every stacked adapter's tensors and magnitude (so an in-place write, an optimizer step or
loading another adapter re-stacks it; ``model.train()`` / ``.eval()`` / ``.to()`` clear it), one entry per layer:
the latest batch's set of adapters (decode steps reuse it until the set changes).

Applies to the linear families (``nn.Linear``, GPT-2's ``Conv1D``, quantized linear layers: their down and up
projections are products over the last dimension) in eval mode, eagerly; :func:`forward` returns None otherwise,
and the caller runs the loop. Measured (benchmarks/serving.py's model, 8 rows, 4 DoRA adapters, one token each,
2-core AMD EPYC, 2026-12-06, loaded): the adapters added about 14 ms to a 66 ms base decode forward through the
loop, about 5 ms stacked; at 8 x 48 tokens (prefill) the loop was as fast or faster, hence :data:`MAX_TOKENS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layers.linear import LinearOps

STACK = "stacked_adapters"  # the NormCache entry's name
#: the stacked path runs for inputs of at most this many tokens (all rows together); longer ones take the loop
MAX_TOKENS = 64


@dataclass
class Stack:
    """One layer's stacked adapters (see the module docstring)."""

    names: tuple[str, ...]  # the stacked adapters, in stack order (sorted names)
    q: Tensor | None  # Q_cat [R, in], or None if no adapter of the batch has a directional update
    p: Tensor | None  # P_cat [out, R]
    owner: Tensor | None  # [R]: the stack position of each column's adapter
    scale: Tensor | None  # C [S + 1, out] in the norm dtype (the last row: ones); None if no adapter is decomposed
    layout: tuple  # (names, each stacked adapter's position and rank): what the rows' index and mask depend on


def forward(layer, x: Tensor, rows) -> Tensor | None:
    """``layer``'s per-row output for the batch ``x`` (row i with adapter ``rows.names[i]``), or None where the
    stacked form does not apply (not a linear family, training mode, more than :data:`MAX_TOKENS` tokens, adapters
    whose factors differ in dtype, inside ``torch.compile``).

    The bookkeeping (the memo's version check, the rows' positions, the scale's gather) runs with torch-function
    modes off: under ``--pack-weights``' mode (:mod:`dorafit.serving.packed`) each tensor attribute read would
    otherwise be a Python call; the three products run under the mode as usual."""
    ops = layer.dorafit.ops
    if torch.compiler.is_compiling():  # the memo is plain Python: a compiled graph keeps the loop
        return None
    with torch._C.DisableTorchFunction():
        if layer.training or not isinstance(ops, LinearOps) or x.dim() < 2 or x.numel() > MAX_TOKENS * x.shape[-1]:
            return None
        holders = {name: h for name in rows.groups if name is not None and (h := layer.holder(name)) is not None}
        stack = _stack(layer, holders)
        if stack is None:
            return None
        index, mask = _row_positions(rows, stack, x)  # [B]: each row's stack position (S: the base); M [B, 1.., R]
        scale = None
        if stack.scale is not None:  # [B, 1.., out], as the loop rounds m / n
            scale = stack.scale.index_select(0, index).to(x.dtype).view(len(index), *[1] * (x.dim() - 2), -1)
    y = ops.base(layer, x)  # W0 x for every row (a fresh tensor: updated in place below)
    if stack.q is not None:
        u = ops.down(layer, x, stack.q).mul_(mask)  # [B, ..., R]: each row's own adapter's columns
        y = y.add_(ops.up(layer, u, stack.p).to(y.dtype))
    if scale is not None:
        y = y.mul_(scale)
    return ops.finish(layer, x, ops.add_bias(layer, y))


def _stack(layer, holders: dict) -> Stack | None:
    """The layer's memoised :class:`Stack` of ``holders`` (None if their factors differ in dtype)."""
    names = tuple(sorted(holders))
    inputs = [*layer.dorafit.ops.cache_tensors(layer)]
    for name in names:
        holder = holders[name]
        inputs += layer._update_tensors(holder)
        if holder.dorafit.decomposed:
            inputs.append(holder.magnitude)
    return layer.dorafit.caches.lookup(STACK, tuple(inputs), lambda: _build(layer, names, holders))


def _build(layer, names: tuple[str, ...], holders: dict) -> Stack | None:
    terms = {name: layer.inference_terms(holders[name]) for name in names}  # (P, Q, m / n or None)
    factors = {name: t[:2] for name, t in terms.items()}
    if len({q.dtype for _, q in factors.values() if q is not None}) > 1:
        return None
    directional = [(i, factors[name]) for i, name in enumerate(names) if factors[name][0] is not None]
    q = p = owner = scale = None
    if directional:
        q = torch.cat([f[1] for _, f in directional], dim=0)
        p = torch.cat([f[0] for _, f in directional], dim=1)
        owner = torch.cat([torch.full((f[1].shape[0],), i, dtype=torch.long, device=q.device)
                           for i, f in directional])
    decomposed = [holders[name].dorafit.decomposed for name in names]
    if any(decomposed):
        c = {name: terms[name][2] for name, is_decomposed in zip(names, decomposed) if is_decomposed}
        ones = torch.ones_like(next(iter(c.values())))
        scale = torch.stack([c.get(name, ones) for name in names] + [ones])
    layout = (names, tuple((i, f[1].shape[0]) for i, f in directional))
    return Stack(names, q, p, owner, scale, layout)


def _row_positions(rows, stack: Stack, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Row i's position in the stack ([B]; S, one past the last, for the base or an adapter this layer lacks) and
    the mask M of the module docstring (shaped [B, 1, ..., R] for ``x``'s dimensions, 1 where column j belongs to
    row i's adapter), made once per batch and stack layout (kept on ``rows``: every layer with the same adapters
    and ranks shares them)."""
    key = (stack.layout, x.dim())
    if key not in rows.positions:
        position = {name: i for i, name in enumerate(stack.names)}
        index = torch.tensor([position.get(name, len(stack.names)) for name in rows.names], device=x.device)
        shape = (len(rows.names), *[1] * (x.dim() - 2), -1)
        mask = None if stack.q is None else (index[:, None] == stack.owner[None, :]).to(stack.q.dtype).view(shape)
        rows.positions[key] = index, mask
    return rows.positions[key]
