"""The serving engine's KV cache: one growing, preallocated key/value buffer per layer for a whole batch of rows.

Layout: per layer, keys and values ``[rows, kv_heads, capacity, head_dim]``; the first ``length`` columns are in
use and every row *ends* at column ``length`` (rows are right-aligned; row i's tokens are the columns
``starts[i]:length``, the columns before ``starts[i]`` are padding that the attention mask hides). A decode step
writes every row's new key/value into column ``length`` in place (no per-step concatenation or re-padding; the
buffer grows by half when full); rows join (:meth:`RowCache.join`) and leave (:meth:`RowCache.keep`) by one copy
when the batch changes, not at every step.

**Sliding-window layers** (Gemma 2/3, Mistral) keep every position, like full-attention layers, and are told
apart only by the model's own mask: transformers builds the sliding mask from ``config.sliding_window`` and the
column indices (``kv_idx > q_idx - window``), and with rows right-aligned, column distances within a row are token
distances, so each row attends to exactly the keys it would attend to alone. Keeping the whole history costs the
memory a window-sized ring buffer would save, but a ring buffer shared by rows of different lengths cannot be
right for all of them (the bug this replaces: per-row caches of sliding layers, trimmed to the window, padded
together, broke as soon as one row passed the window).

**Why not transformers' own continuous batching** (``generation/continuous_batching``, a paged cache with
sliding-window allocators and chunked prefill): it packs every request's tokens into one sequence (batch 1), and
dorafit routes adapters by batch row (:func:`dorafit.per_row_adapters`), so every adapted layer would need
per-token segment routing (what S-LoRA's SGMV does), its scheduler owns the generation loop and token choice (no
hook for dorafit's per-request adapter, seeded sampler, prompt log-probabilities), and its paged attention is
written for GPU kernels. A batch of padded rows keeps the routing exact and runs on CPU.

Layer types other than full and sliding attention (linear attention, KV sharing, chunked attention) are refused
by :func:`check_supported` rather than served wrong.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}
GROW = 64  # the least number of columns added when a buffer is full


def check_supported(config) -> None:
    """Raise ValueError naming the layer type if the model has layers this cache cannot serve."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    unknown = types - SUPPORTED_LAYER_TYPES
    if unknown:
        raise ValueError(f"dorafit serve supports full and sliding-window attention layers; this model has "
                         f"{', '.join(sorted(unknown))} layers")
    if getattr(config, "attention_chunk_size", None):
        raise ValueError("dorafit serve does not support chunked attention (attention_chunk_size)")


class RowLayer(CacheLayerMixin):
    """One layer's keys and values for a batch of right-aligned rows (see the module docstring)."""

    is_sliding = False  # every position is kept; a sliding layer's window comes from the model's mask

    def __init__(self):
        super().__init__()
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, dim = key_states.shape
        self.keys = key_states.new_empty(rows, heads, 0, dim)
        self.values = value_states.new_empty(rows, heads, 0, value_states.shape[-1])
        self.device = key_states.device
        self.is_initialized = True

    def _reserve(self, columns: int) -> None:
        capacity = self.keys.shape[2]
        if columns <= capacity:
            return
        capacity = max(columns, capacity + max(capacity // 2, GROW))
        self.keys, self.values = (_resized(t, self.length, capacity) for t in (self.keys, self.values))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        self._reserve(self.length + new)
        self.keys[:, :, self.length:self.length + new] = key_states
        self.values[:, :, self.length:self.length + new] = value_states
        self.length += new
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


def _resized(t: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """A buffer of ``capacity`` columns holding ``t``'s first ``used`` columns."""
    out = t.new_empty(*t.shape[:2], capacity, t.shape[3])
    out[:, :, :used] = t[:, :, :used]
    return out


class RowCache(Cache):
    """A transformers :class:`Cache` of :class:`RowLayer` s, with each row's first column (``starts``)."""

    def __init__(self, n_layers: int, starts: list[int] | None = None):
        super().__init__(layers=[RowLayer() for _ in range(n_layers)])
        self.starts = list(starts or [0])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def attention_mask(self, new: int, device) -> torch.Tensor:
        """``[rows, length + new]``: 1 on each row's tokens and the ``new`` ones about to be added, 0 on padding."""
        columns = torch.arange(self.length + new, device=device)
        return (columns[None, :] >= torch.tensor(self.starts, device=device)[:, None]).long()

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), dropping the padding columns no remaining row needs."""
        self._take_rows(self, rows)

    def copy_rows(self, rows: list[int]) -> RowCache:
        """A new cache of these rows (this one unchanged)."""
        return self._take_rows(RowCache(len(self.layers)), rows)

    def rewind(self, length: int) -> None:
        """Forget the columns from ``length`` on (what a failed forward may have written)."""
        for layer in self.layers:
            layer.length = min(layer.length, length)

    def _take_rows(self, into: RowCache, rows: list[int]) -> RowCache:
        drop = min(self.starts[i] for i in rows)
        for source, target in zip(self.layers, into.layers):
            used = source.length - drop
            keys, values = (_gathered(t, rows, drop, source.length, used + GROW)
                            for t in (source.keys, source.values))
            target.keys, target.values, target.length = keys, values, used
            target.device, target.is_initialized = source.device, True
        into.starts = [self.starts[i] - drop for i in rows]
        return into

    @classmethod
    def of_rows(cls, caches: list[RowCache]) -> RowCache:
        """A new cache holding the rows of ``caches`` in order, right-aligned to the longest (an empty cache gives
        a row of padding only); the caches are unchanged."""
        length = max(c.length for c in caches)
        out = cls(len(caches[0].layers), starts=[s + length - c.length for c in caches for s in c.starts])
        if length == 0:
            return out
        template = next(c for c in caches if c.length)
        rows = len(out.starts)
        for i, layer in enumerate(out.layers):
            like = template.layers[i]
            layer.keys, layer.values = (t.new_zeros(rows, t.shape[1], length + GROW, t.shape[3])
                                        for t in (like.keys, like.values))
            row = 0
            for c in caches:
                n, used = len(c.starts), c.length
                if used:
                    layer.keys[row:row + n, :, length - used:length] = c.layers[i].keys[:, :, :used]
                    layer.values[row:row + n, :, length - used:length] = c.layers[i].values[:, :, :used]
                row += n
            layer.length, layer.device, layer.is_initialized = length, like.device, True
        return out

    def join(self, other: RowCache) -> None:
        """Append ``other``'s rows below these, both right-aligned to the longer of the two."""
        length = max(self.length, other.length)
        shift, other_shift = length - self.length, length - other.length
        for mine, theirs in zip(self.layers, other.layers):
            mine.keys = _stack(mine.keys, mine.length, theirs.keys, theirs.length, length)
            mine.values = _stack(mine.values, mine.length, theirs.values, theirs.length, length)
            mine.length = length
        self.starts = [s + shift for s in self.starts] + [s + other_shift for s in other.starts]


def _gathered(t: torch.Tensor, rows: list[int], start: int, end: int, capacity: int) -> torch.Tensor:
    """A buffer of ``capacity`` columns holding columns ``start:end`` of ``t``'s ``rows`` (one copy per row)."""
    out = t.new_empty(len(rows), t.shape[1], capacity, t.shape[3])
    for j, i in enumerate(rows):
        out[j, :, :end - start] = t[i, :, start:end]
    return out


def _stack(a: torch.Tensor, a_len: int, b: torch.Tensor, b_len: int, length: int) -> torch.Tensor:
    out = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], length + GROW, a.shape[3])
    out[: a.shape[0], :, length - a_len:length] = a[:, :, :a_len]
    out[a.shape[0]:, :, length - b_len:length] = b[:, :, :b_len]
    return out
