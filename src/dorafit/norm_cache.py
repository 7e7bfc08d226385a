"""DoRA's cached norm vectors, reachable from eager code and from inside a ``torch.compile`` graph.

Each adapted layer memoises two [out] vectors (float32, float64 for float64 weights):

    ||W0||^2 per output row            W0 is frozen: computed once, used in training and eval
    n = ||W0 + P Q|| per output row    eval mode only (no gradient): see AdaptedLayer.weight_norm

and, for inference (eval mode, no grad, eager), the tuple ``(P, Q, m / n)`` (AdaptedLayer.inference_terms).

Each is keyed by the version counter, storage address, dtype and device of every tensor it is computed
from, so an optimizer step, any in-place write, a reallocation or a move recomputes it. (Writes through
``.data`` bump no version counter: ``model.train()`` / ``model.eval()`` clear the caches for that case.)

Why the custom operators: a Python dict keyed by ``data_ptr()`` read inside a compiled region makes Dynamo
either break the graph or guard on the key and recompile when it changes (once per layer, then after every
optimizer step). Under ``torch.compiler.is_compiling()`` the lookup goes through two custom operators,
``dorafit::squared_row_norms`` and ``dorafit::weight_norm``, which Dynamo and Inductor treat as opaque pure
functions of their tensor inputs: the graph only says "an [out] vector computed from these tensors", the
lookup (or the computation on a miss) runs at run time inside the operator, and nothing about the cache is
guarded. A layer's cache is found from a handle: a 0-dim int64 CPU tensor holding the cache's id
(:attr:`NormCache.handle`). Being a tensor, it is an input of the graph, not a constant: Dynamo checks only
its shape and dtype, so two models of the same architecture share one compiled graph (an integer would be
guarded on its value, and every new model would compile again, up to Dynamo's recompile limit).
The operators return a copy of the cached vector, so a compiled graph that reuses its output buffer cannot
change the cache. They are tagged ``cudagraph_unsafe``: a CUDA-graph replay would skip the lookup.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable, TypeVar

import torch
from torch import Tensor

from . import functional as Fn

T = TypeVar("T")
_IDS = itertools.count(1)
_LIVE: "weakref.WeakValueDictionary[int, NormCache]" = weakref.WeakValueDictionary()


def version_key(*tensors: Tensor) -> tuple:
    """Changes whenever any tensor is written in place, reallocated or moved."""
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


class NormCache:
    """One layer's memo of norm vectors, each stored with the :func:`version_key` of its inputs.

    ``copy.deepcopy`` and pickling give a new, empty cache with its own id (a copied model has other tensors).
    """

    def __init__(self) -> None:
        self.id = next(_IDS)
        self.handle = torch.tensor(self.id, dtype=torch.int64)
        self._entries: dict[str, tuple[tuple, object]] = {}
        _LIVE[self.id] = self

    def clear(self) -> None:
        self._entries.clear()

    def lookup(self, name: str, inputs: tuple[Tensor, ...], compute: Callable[[], T]) -> T:
        """The cached value of ``name`` if ``inputs`` are unchanged since it was computed, else ``compute()``."""
        key = version_key(*inputs)
        hit = self._entries.get(name)
        if hit is None or hit[0] != key:
            # a normal tensor even under torch.inference_mode(): a later forward with grad may save it for backward
            with torch.inference_mode(False), torch.no_grad():
                hit = (key, compute())
            self._entries[name] = hit
        return hit[1]

    def __deepcopy__(self, memo) -> "NormCache":
        return NormCache()

    def __reduce__(self):
        return (NormCache, ())


def _squared_norms(cache: NormCache, w0: Tensor) -> Tensor:
    return cache.lookup("w0_sq", (w0,), lambda: Fn.squared_row_norms(w0))


def _weight_norm(cache: NormCache, w0: Tensor, tensors: list[Tensor], update: str, scale: float, eps: float) -> Tensor:
    def compute() -> Tensor:
        p, q = Fn.update_factors(update, tensors, scale)
        return Fn.decomposed_norm(_squared_norms(cache, w0), w0, p, q, eps)

    return cache.lookup("norm", (w0, *tensors), compute)


# ---- the same lookups as opaque operators, for compiled graphs -----------------------------------------------
# Defined with torch.library.Library (a CompositeExplicitAutograd kernel) rather than torch.library.custom_op,
# whose Python wrapper costs ~30 us more per call; the inputs are always detached, so no autograd is needed.
_LIB = torch.library.Library("dorafit", "DEF")
_LIB.define("squared_row_norms(Tensor w0, Tensor handle) -> Tensor", tags=(torch.Tag.cudagraph_unsafe,))
_LIB.define("weight_norm(Tensor w0, Tensor[] tensors, str update, float scale, float eps, Tensor handle) -> Tensor",
            tags=(torch.Tag.cudagraph_unsafe,))


def _squared_norms_kernel(w0: Tensor, handle: Tensor) -> Tensor:
    return _squared_norms(_LIVE[int(handle)], w0).clone()


def _weight_norm_kernel(w0: Tensor, tensors: list[Tensor], update: str, scale: float, eps: float,
                        handle: Tensor) -> Tensor:
    return _weight_norm(_LIVE[int(handle)], w0, tensors, update, scale, eps).clone()


def _norm_like(w0: Tensor, *args) -> Tensor:
    return w0.new_empty(w0.shape[0], dtype=Fn.norm_dtype(w0.dtype))


_LIB.impl("squared_row_norms", _squared_norms_kernel, "CompositeExplicitAutograd")
_LIB.impl("weight_norm", _weight_norm_kernel, "CompositeExplicitAutograd")
torch.library.register_fake("dorafit::squared_row_norms", _norm_like, lib=_LIB)
torch.library.register_fake("dorafit::weight_norm", _norm_like, lib=_LIB)


# ---- what the adapted layers call ----------------------------------------------------------------------------
def squared_row_norms(cache: NormCache, w0: Tensor) -> Tensor:
    """``||W0||^2`` per output row of the frozen weight matrix ``w0`` [out, in], memoised (no gradient)."""
    if torch.compiler.is_compiling():
        return torch.ops.dorafit.squared_row_norms(w0.detach(), cache.handle)
    return _squared_norms(cache, w0)


def weight_norm(cache: NormCache, w0: Tensor, tensors: tuple[Tensor, ...], update: str | None, scale: float,
                eps: float) -> Tensor:
    """n = ||W0 + P Q|| per output row, memoised (no gradient); P, Q from the update's own ``tensors``.

    ``tensors`` are the layer's stored update tensors (lora_A, lora_B; or VeRA's A, B, lambda_d, lambda_b;
    none for magnitude-only) and ``update`` their kind: see :func:`dorafit.functional.update_factors`.
    """
    update = update or "none"
    if torch.compiler.is_compiling():
        return torch.ops.dorafit.weight_norm(w0.detach(), [t.detach() for t in tensors], update, scale, eps,
                                             cache.handle)
    return _weight_norm(cache, w0, list(tensors), update, scale, eps)


# ---- layers whose W0 is read through their family's ops (quantized weights) -----------------------------------
def _eager_only(ops, module) -> None:
    if torch.compiler.is_compiling():
        raise NotImplementedError(f"torch.compile of DoRA on a quantized base ({ops.describe(module)}) is not "
                                  "supported; run the model eagerly")


def layer_squared_row_norms(cache: NormCache, ops, module) -> Tensor:
    """``||W0||^2`` per output row of a layer whose W0 is read through ``ops`` (a quantized layer: a bounded block
    of rows at a time, :meth:`LayerOps.squared_row_norms`), memoised on ``ops.cache_tensors``."""
    if not ops.quantized:
        return squared_row_norms(cache, ops.weight_matrix(module))
    _eager_only(ops, module)
    return cache.lookup("w0_sq", ops.cache_tensors(module), lambda: ops.squared_row_norms(module))


def layer_weight_norm(cache: NormCache, ops, module, tensors: tuple[Tensor, ...], update: str | None, scale: float,
                      eps: float) -> Tensor:
    """:func:`weight_norm` for a layer read through ``ops``: ``W0 Q^T`` from :meth:`LayerOps.weight_times_factor`."""
    if not ops.quantized:
        return weight_norm(cache, ops.weight_matrix(module), tensors, update, scale, eps)
    _eager_only(ops, module)

    def compute() -> Tensor:
        p, q = Fn.update_factors(update or "none", list(tensors), scale)
        w0_qt = None if p is None else ops.weight_times_factor(module, q)
        return Fn.factored_norm(layer_squared_row_norms(cache, ops, module), w0_qt, p, q, eps)

    return cache.lookup("norm", (*ops.cache_tensors(module), *tensors), compute)
