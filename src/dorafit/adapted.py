"""An adapted layer: the base layer itself, given adapter tensors and a forward that uses them.

:func:`adapt_module` changes the module's class in place to a subclass of its own class (the way
``torch.nn.utils.parametrize`` does), so ``weight`` and ``bias`` keep their state-dict keys, hooks and
attributes stay, ``isinstance(module, nn.Linear)`` still holds, and the adapter tensors sit beside them:

    P.weight, P.bias                  the frozen base tensors, unchanged keys
    P.lora_A, P.lora_B                LoRA factors (shapes as the PEFT library stores them)
    P.vera_lambda_d, P.vera_lambda_b  VeRA's trainable vectors (its shared A, B are non-persistent buffers)
    P.magnitude                       DoRA's m, one per output unit, float32

Forward, for a layer with weight W0 [out, in] and the update dW = P Q (see :mod:`dorafit.functional`):

    LoRA, VeRA:      y = W0 x + P Q dropout(x) + b
    DoRA, DVoRA:     y = (m / n) * (W0 x + P Q dropout(x)) + b,   n = ||W0 + P Q|| per row
    magnitude-only:  y = (m / ||W0||) * (W0 x) + b

With dropout 0 (or in eval mode) this is exactly the merged layer ``W' x + b`` (bias never scaled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import functional as Fn
from . import norm_cache
from .layers import LayerOps
from .magnitude_scale import magnitude_scale
from .norm_cache import NormCache

LORA_PARAMS = ("lora_A", "lora_B")
VERA_PARAMS = ("vera_lambda_d", "vera_lambda_b")
VERA_BUFFERS = ("vera_A", "vera_B")
MAGNITUDE_PARAM = "magnitude"
ADAPTER_PARAMS = LORA_PARAMS + VERA_PARAMS + (MAGNITUDE_PARAM,)


@dataclass
class AdapterState:
    """Per-layer adapter settings and caches (plain Python, not part of the state dict)."""

    ops: LayerOps
    base_class: type
    update: str | None  # "lora", "vera", or None for magnitude-only
    decomposed: bool
    scale: float  # LoRA's s (1 for VeRA)
    dropout: float
    detach_norm: bool
    eps: float
    magnitude_grad: str = "save"  # "save" or "recompute": what the magnitude's gradient keeps (AdapterConfig)
    cache_norm: bool = True  # cache n in eval mode (see AdaptedLayer.weight_norm)
    merged: bool = False
    disabled: bool = False
    merge_norm: Tensor | None = None  # n used by the last merge, needed to unmerge
    merge_lost_rows: tuple[Tensor, Tensor] | None = None  # (row ids, W0 rows) where m == 0 at merge
    caches: NormCache = field(default_factory=NormCache)


class AdaptedLayer:
    """Mixed in before the base layer's class by :func:`adapt_module`; never instantiated directly."""

    dorafit: AdapterState

    # ---- the update's factors and DoRA's norm ------------------------------------------------------
    def factors(self) -> tuple[Tensor | None, Tensor | None]:
        """``(P [out, r], Q [r, in])`` of the directional update, or (None, None) for magnitude-only."""
        st = self.dorafit
        return Fn.update_factors(st.update, self._update_tensors(), st.scale)

    def _update_tensors(self) -> tuple[Tensor, ...]:
        st = self.dorafit
        if st.update == "lora":
            return self.lora_A, self.lora_B
        if st.update == "vera":
            return self.vera_A, self.vera_B, self.vera_lambda_d, self.vera_lambda_b
        return ()

    def base_squared_norms(self) -> Tensor:
        """``||W0||^2`` per output row, cached until the weight is written to (see :mod:`dorafit.norm_cache`)."""
        return norm_cache.squared_row_norms(self.dorafit.caches, self.dorafit.ops.weight_matrix(self))

    def weight_norm(self, p: Tensor | None = None, q: Tensor | None = None) -> Tensor:
        """DoRA's n = ||W0 + P Q|| per output row ([out], float32), from the factored formula.

        Differentiable in P and Q only when ``detach_norm`` is False and grad mode is on. In eval mode the vector
        is cached until any tensor it depends on is written to (``AdapterState.cache_norm`` turns that off, e.g.
        under FSDP, whose re-gathered parameters may reuse storage); in training it is recomputed every call,
        which costs O((out + in) r) memory and one [out, in] x [in, r] product. The caches work the same inside
        a ``torch.compile`` graph, without guards or recompilation (:mod:`dorafit.norm_cache`).
        """
        st = self.dorafit
        if p is None and st.update is not None:
            p, q = self.factors()
        w0 = st.ops.weight_matrix(self)
        w0_sq = self.base_squared_norms()
        if not st.detach_norm and torch.is_grad_enabled() and p is not None and p.requires_grad:
            return Fn.decomposed_norm(w0_sq, w0, p, q, st.eps)
        if self.training or not st.cache_norm:
            with torch.no_grad():
                return Fn.decomposed_norm(w0_sq, w0, p, q, st.eps)
        return norm_cache.weight_norm(st.caches, w0, self._update_tensors(), st.update, st.scale, st.eps)

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        st = self.dorafit
        if st.merged or st.disabled:
            return st.base_class.forward(self, x)
        ops = st.ops
        p, q = self.factors()
        dropout = p is not None and st.dropout and ops.supports_dropout and self.training
        x_adapter = F.dropout(x, st.dropout) if dropout else x
        if not st.decomposed:
            return ops.finish(self, x, ops.low_rank(self, x, x_adapter, p, q, with_bias=True))
        n = self.weight_norm(p, q)
        if st.magnitude_grad == "recompute" and torch.compiler.is_compiling() and torch.is_grad_enabled():
            # a compiled graph plans its own memory: a checkpointed region makes it recompute pre in backward
            y = checkpoint(self._scaled_output, x, x_adapter, p, q, n, use_reentrant=False)
        else:
            y = self._scaled_output(x, x_adapter, p, q, n)
        return ops.finish(self, x, y)

    def _scaled_output(self, x: Tensor, x_adapter: Tensor, p: Tensor | None, q: Tensor | None, n: Tensor) -> Tensor:
        """A decomposed layer's ``y = (m / n) * pre + b`` (before ``LayerOps.finish``)."""
        st = self.dorafit
        pre = self._pre_scale(x, x_adapter, p, q)
        # "recompute": backward computes pre again from what the low-rank product keeps, instead of keeping y
        recompute = (self._pre_scale, (x, x_adapter, p, q)) if st.magnitude_grad == "recompute" else (None, ())
        # pre is this forward's own fresh tensor (nothing saved it), so the scale may overwrite it
        return magnitude_scale(pre, self.magnitude, n, getattr(self, "bias", None), st.ops.channel_dim, inplace=True,
                               recompute=recompute[0], recompute_inputs=recompute[1])

    def _pre_scale(self, x: Tensor, x_adapter: Tensor, p: Tensor | None, q: Tensor | None) -> Tensor:
        """A decomposed layer's output before the magnitude, without bias: ``W0 x + P Q x_adapter`` (or ``W0 x``)."""
        if p is None:  # magnitude-only
            return self.dorafit.ops.base(self, x)
        return self.dorafit.ops.low_rank(self, x, x_adapter, p, q, with_bias=False)

    # ---- merge ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight: W' = W0 + P Q, or m / n * (W0 + P Q). No-op if merged."""
        st = self.dorafit
        if st.merged:
            return
        p, q = self.factors()
        w0 = st.ops.weight_matrix(self)
        m = self.magnitude if st.decomposed else None
        n = self.weight_norm(p, q) if st.decomposed else None
        if m is not None and bool((m == 0).any()):
            rows = torch.nonzero(m == 0).flatten()
            st.merge_lost_rows = (rows, w0[rows].clone())
        st.ops.set_weight_matrix(self, Fn.merged_weight(w0, p, q, m, n))
        st.merge_norm = n
        st.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Recover W0 from a merged weight (up to rounding). No-op if not merged."""
        st = self.dorafit
        if not st.merged:
            return
        p, q = self.factors()
        w = st.ops.weight_matrix(self)
        m = self.magnitude if st.decomposed else None
        w0 = Fn.unmerged_weight(w, p, q, m, st.merge_norm)
        if st.merge_lost_rows is not None:
            rows, values = st.merge_lost_rows
            w0[rows] = values
        st.ops.set_weight_matrix(self, w0)
        st.merged, st.merge_norm, st.merge_lost_rows = False, None, None

    def train(self, mode: bool = True):
        """Also drops the cached norms: ``model.eval()`` always starts from the current tensors, even after writes
        through ``.data`` (which do not bump the version counters the caches are keyed on)."""
        self.dorafit.caches.clear()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` and friends keep DoRA's magnitude in float32 (float64 for float64 weights)."""
        magnitude = self._parameters.get(MAGNITUDE_PARAM)
        kept = magnitude.data if magnitude is not None else None
        result = super()._apply(fn, recurse)
        magnitude = self._parameters.get(MAGNITUDE_PARAM)
        want = Fn.norm_dtype(self.weight.dtype)
        if magnitude is not None and magnitude.dtype != want:
            magnitude.data = kept.to(device=magnitude.device, dtype=want)
        self.dorafit.caches.clear()
        return result

    def extra_repr(self) -> str:
        st = self.dorafit
        kind = {("lora", False): "lora", ("lora", True): "dora", ("vera", False): "vera", ("vera", True): "dvora"}
        method = kind.get((st.update, st.decomposed), "magnitude-only")
        return f"{st.base_class.extra_repr(self)}, adapter={method}, merged={st.merged}"


_ADAPTED_CLASSES: dict[type, type] = {}


def adapted_class(base_class: type) -> type:
    """The (cached) class ``Adapted<Base>`` = AdaptedLayer + the base layer's class."""
    if base_class not in _ADAPTED_CLASSES:
        name = f"Adapted{base_class.__name__}"
        _ADAPTED_CLASSES[base_class] = type(name, (AdaptedLayer, base_class), {"__module__": __name__})
    return _ADAPTED_CLASSES[base_class]


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, AdaptedLayer)


def adapt_module(module: nn.Module, state: AdapterState, tensors: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
    """Turn ``module`` into an adapted layer in place: register the adapter tensors and swap its class."""
    for name, value in tensors.items():
        module.register_parameter(name, nn.Parameter(value, requires_grad=True))
    for name, value in buffers.items():
        module.register_buffer(name, value, persistent=False)
    module.dorafit = state
    module.__class__ = adapted_class(state.base_class)


def strip_module(module: nn.Module) -> None:
    """Undo :func:`adapt_module` without merging: remove adapter tensors and restore the base class."""
    st = module.dorafit
    if st.merged:
        module.unmerge()
    for name in ADAPTER_PARAMS + VERA_BUFFERS:
        if hasattr(module, name):
            delattr(module, name)
    module.__class__ = st.base_class
    del module.dorafit
