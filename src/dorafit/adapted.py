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

Several adapters on one layer: the first adapter applied to a model lives on the layer itself (its tensors under
the keys above; ``AdapterState.name`` says its name, "default" unless named), every further named adapter in an
:class:`AdapterSlot` under ``P.dorafit_adapters.<name>`` with the same attribute names and its own state. Forward
uses the active adapter (``AdapterState.active``, set by :func:`dorafit.set_adapter`; None: the base layer), or,
inside :func:`dorafit.per_row_adapters`, one adapter per batch row (:meth:`AdaptedLayer.per_row_forward`).
A layer that only carries named adapters has no adapter of its own (``AdapterState.present`` is False).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import functional as Fn
from . import norm_cache, stacked_adapters
from .layers import LayerOps
from .magnitude_scale import magnitude_scale, scale_output
from .norm_cache import NormCache

LORA_PARAMS = ("lora_A", "lora_B")
VERA_PARAMS = ("vera_lambda_d", "vera_lambda_b")
VERA_BUFFERS = ("vera_A", "vera_B")
MAGNITUDE_PARAM = "magnitude"
ADAPTER_PARAMS = LORA_PARAMS + VERA_PARAMS + (MAGNITUDE_PARAM,)
SLOTS = "dorafit_adapters"  # the ModuleDict of a layer's named adapters beyond its own


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
    name: str = "default"  # the adapter's name
    present: bool = True  # False: the layer carries only named adapters (AdapterSlot), none of its own
    active: str | None = "default"  # layer-level: the adapter forward uses (None: the base layer)
    rows: RowAdapters | None = None  # layer-level: inside per_row_adapters, the adapter of each batch row
    merged_name: str | None = None  # layer-level: the adapter merged into the weight, if any


class AdapterSlot(nn.Module):
    """A named adapter's tensors on a layer that already carries another (``layer.dorafit_adapters[name]``): the
    same attribute names as on the layer (``lora_A``, ``magnitude``, ...) and its own :class:`AdapterState`."""

    def __init__(self, state: AdapterState, tensors: dict[str, Tensor], buffers: dict[str, Tensor]):
        super().__init__()
        for name, value in tensors.items():
            self.register_parameter(name, nn.Parameter(value, requires_grad=True))
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)
        self.dorafit = state

    def _apply(self, fn, recurse=True):
        """Like the layer: the magnitude stays float32 (float64 for float64 weights) through ``.to(dtype)``."""
        kept = self._parameters.get(MAGNITUDE_PARAM)
        kept = kept.data if kept is not None else None
        result = super()._apply(fn, recurse)
        magnitude = self._parameters.get(MAGNITUDE_PARAM)
        if magnitude is not None and kept is not None and magnitude.dtype != kept.dtype:
            magnitude.data = kept.to(device=magnitude.device)
        self.dorafit.caches.clear()
        return result


class RowAdapters:
    """Which adapter each batch row uses (``names[i]``, None: the base), with each adapter's row indices as one
    tensor (``groups``, in order of first appearance), made once per forward by :func:`dorafit.per_row_adapters`
    rather than in every layer."""

    def __init__(self, names: list, device: torch.device | str = "cpu"):
        self.names = list(names)
        positions: dict = {}
        for i, name in enumerate(self.names):
            positions.setdefault(name, []).append(i)
        self.groups = {name: torch.tensor(index, device=device) for name, index in positions.items()}
        self.positions: dict = {}  # each row's place in a layer's stacked adapters (dorafit.stacked_adapters)


class AdaptedLayer:
    """Mixed in before the base layer's class by :func:`adapt_module`; never instantiated directly."""

    dorafit: AdapterState

    # ---- the update's factors and DoRA's norm ------------------------------------------------------
    def factors(self, holder=None) -> tuple[Tensor | None, Tensor | None]:
        """``(P [out, r], Q [r, in])`` of the directional update, or (None, None) for magnitude-only.

        ``holder``: the layer (its own adapter, the default) or an :class:`AdapterSlot` of a named one."""
        holder = holder if holder is not None else self
        st = holder.dorafit
        return Fn.update_factors(st.update, self._update_tensors(holder), st.scale)

    def _update_tensors(self, holder=None) -> tuple[Tensor, ...]:
        holder = holder if holder is not None else self
        st = holder.dorafit
        if st.update == "lora":
            return holder.lora_A, holder.lora_B
        if st.update == "vera":
            return holder.vera_A, holder.vera_B, holder.vera_lambda_d, holder.vera_lambda_b
        return ()

    def base_squared_norms(self) -> Tensor:
        """``||W0||^2`` per output row, cached until the weight is written to (see :mod:`dorafit.norm_cache`)."""
        return norm_cache.layer_squared_row_norms(self.dorafit.caches, self.dorafit.ops, self)

    def weight_norm(self, p: Tensor | None = None, q: Tensor | None = None, holder=None,
                    w0_qt: Tensor | None = None) -> Tensor:
        """DoRA's n = ||W0 + P Q|| per output row ([out], float32), from the factored formula
        (:func:`dorafit.functional.factored_norm`); ``w0_qt``: ``W0 Q^T`` if the caller has it already.

        Differentiable in P and Q only when ``detach_norm`` is False and grad mode is on. In eval mode the vector
        is cached until any tensor it depends on is written to (``AdapterState.cache_norm`` turns that off, e.g.
        under FSDP, whose re-gathered parameters may reuse storage); in training it is recomputed every call,
        which costs O((out + in) r) memory and one [out, in] x [in, r] product. The caches work the same inside
        a ``torch.compile`` graph, without guards or recompilation (:mod:`dorafit.norm_cache`).
        """
        holder = holder if holder is not None else self
        st, ops = holder.dorafit, self.dorafit.ops
        if p is None and st.update is not None:
            p, q = self.factors(holder)

        def norm() -> Tensor:
            factor = w0_qt if w0_qt is not None or p is None else ops.weight_times_factor(self, q)
            return Fn.factored_norm(self.base_squared_norms(), factor, p, q, st.eps)

        if self._norm_has_grad(st, p):
            return norm()
        if self.training or not st.cache_norm:
            with torch.no_grad():
                return norm()
        return norm_cache.layer_weight_norm(st.caches, ops, self, self._update_tensors(holder), st.update, st.scale,
                                            st.eps)

    @staticmethod
    def _norm_has_grad(st: AdapterState, p: Tensor | None) -> bool:
        """Whether n carries a gradient to P and Q (``detach_norm=False``, in grad mode)."""
        return not st.detach_norm and torch.is_grad_enabled() and p is not None and p.requires_grad

    def inference_terms(self, holder=None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(P, Q, m / n)`` of an adapter for inference (``m / n`` None unless decomposed; P, Q None for
        magnitude-only), cached until any tensor they come from is written to, reallocated or moved (W0's, the
        update's, the magnitude: keyed like the norm, :mod:`dorafit.norm_cache`). An eval forward then runs only
        its products: recomputing ``P = s B`` and ``m / n`` costs about as much as the rank-r products at one token.
        """
        holder = holder if holder is not None else self
        st, ops = holder.dorafit, self.dorafit.ops
        tensors = self._update_tensors(holder)
        inputs = (*ops.cache_tensors(self), *tensors, *((holder.magnitude,) if st.decomposed else ()))

        def compute() -> tuple[Tensor | None, Tensor | None, Tensor | None]:
            p, q = Fn.update_factors(st.update, tensors, st.scale)
            return p, q, holder.magnitude / self.weight_norm(p, q, holder) if st.decomposed else None

        return st.caches.lookup("inference", inputs, compute)

    def _uses_inference_terms(self, st: AdapterState) -> bool:
        """Eval mode without grad, eager, caching allowed: forward takes :meth:`inference_terms`."""
        return not (self.training or torch.is_grad_enabled() or not st.cache_norm or torch.compiler.is_compiling())

    # ---- which adapter ------------------------------------------------------------------------------
    def holder(self, name: str | None):
        """The layer itself or the :class:`AdapterSlot` that carries adapter ``name``; None if this layer has none
        of that name (or ``name`` is None: the base layer)."""
        st = self.dorafit
        if name is None:
            return None
        if st.present and st.name == name:
            return self
        slots = self._modules.get(SLOTS)
        return slots[name] if slots is not None and name in slots else None

    def holders(self) -> dict[str, object]:
        """Every adapter this layer carries, by name, its own first."""
        out = {self.dorafit.name: self} if self.dorafit.present else {}
        slots = self._modules.get(SLOTS)
        out.update(slots.items() if slots is not None else {})
        return out

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        st = self.dorafit
        if st.rows is not None:
            return self.per_row_forward(x, st.rows)
        holder = self.holder(st.active)
        if holder is None or st.disabled or st.merged_name is not None:
            return st.base_class.forward(self, x)  # no adapter here, or one is merged into the weight
        return self.adapter_forward(x, holder)

    def adapter_forward(self, x: Tensor, holder) -> Tensor:
        """The layer's output with the adapter of ``holder`` (the layer or a slot)."""
        st, ops = holder.dorafit, self.dorafit.ops
        if self._uses_inference_terms(st):
            return self._inference_forward(x, holder)
        p, q = self.factors(holder)
        dropout = p is not None and st.dropout and ops.supports_dropout and self.training
        x_adapter = F.dropout(x, st.dropout) if dropout else x
        if not st.decomposed:
            return ops.finish(self, x, ops.low_rank(self, x, x_adapter, p, q, with_bias=True))
        if st.magnitude_grad == "recompute" and torch.compiler.is_compiling() and torch.is_grad_enabled():
            # a compiled graph plans its own memory: a checkpointed region makes it recompute pre in backward
            n = self.weight_norm(p, q, holder)
            y = checkpoint(self._scaled_output, x, x_adapter, p, q, n, holder, use_reentrant=False)
            return ops.finish(self, x, y)
        pre = w0_qt = None
        if p is not None and (self.training or not st.cache_norm or self._norm_has_grad(st, p)):
            # n is computed afresh: a quantized family gets W0 Q^T from the same frozen product as W0 x
            pre, w0_qt = ops.low_rank_with_factor(self, x, x_adapter, p, q, self._norm_has_grad(st, p))
        n = self.weight_norm(p, q, holder, w0_qt)
        y = self._scaled_output(x, x_adapter, p, q, n, holder, pre)
        return ops.finish(self, x, y)

    def _inference_forward(self, x: Tensor, holder) -> Tensor:
        """:meth:`adapter_forward` in eval mode without grad: the same operations on cached P, Q and m / n."""
        st, ops = holder.dorafit, self.dorafit.ops
        p, q, scale = self.inference_terms(holder)
        if not st.decomposed:
            return ops.finish(self, x, ops.low_rank(self, x, x, p, q, with_bias=True))
        pre = self._pre_scale(x, x, p, q)  # this forward's own tensor: the scale overwrites it
        return ops.finish(self, x, scale_output(pre, scale, getattr(self, "bias", None), ops.channel_dim, inplace=True))

    def _scaled_output(self, x: Tensor, x_adapter: Tensor, p: Tensor | None, q: Tensor | None, n: Tensor,
                       holder, pre: Tensor | None = None) -> Tensor:
        """A decomposed layer's ``y = (m / n) * pre + b`` (before ``LayerOps.finish``), m from ``holder``; ``pre``
        computed here unless given."""
        if pre is None:
            pre = self._pre_scale(x, x_adapter, p, q)
        # "recompute": backward computes pre again from what the low-rank product keeps, instead of keeping y
        recompute = (None, ())
        if holder.dorafit.magnitude_grad == "recompute":
            recompute = (self._pre_scale, (x, x_adapter, p, q))
        # pre is this forward's own fresh tensor (nothing saved it), so the scale may overwrite it
        return magnitude_scale(pre, holder.magnitude, n, getattr(self, "bias", None), self.dorafit.ops.channel_dim,
                               inplace=True, recompute=recompute[0], recompute_inputs=recompute[1])

    def _pre_scale(self, x: Tensor, x_adapter: Tensor, p: Tensor | None, q: Tensor | None) -> Tensor:
        """A decomposed layer's output before the magnitude, without bias: ``W0 x + P Q x_adapter`` (or ``W0 x``)."""
        if p is None:  # magnitude-only
            return self.dorafit.ops.base(self, x)
        return self.dorafit.ops.low_rank(self, x, x_adapter, p, q, with_bias=False)

    def per_row_forward(self, x: Tensor, rows: "RowAdapters | list") -> Tensor:
        """Row i of the batch with adapter ``rows.names[i]`` (None: the base layer), inference only.

        ``W0 x`` is one product for the whole batch; the rows of one adapter share one low-rank product
        ``P (Q x)`` and one per-unit scale ``c = m / n`` (n cached): ``y = c * (W0 x + P Q x) + b`` (DoRA),
        ``W0 x + P Q x + b`` (LoRA, VeRA), ``c * W0 x + b`` (magnitude-only), ``W0 x + b`` (base). When every
        row has the same adapter (a batch of one, say) this is the layer's single-adapter forward, as with that
        adapter active (:func:`dorafit.set_adapter`): no row gather or scatter. A linear layer given few tokens
        (decoding) runs all its adapters at once instead of a loop over them (:mod:`dorafit.stacked_adapters`)."""
        if torch.is_grad_enabled():
            raise RuntimeError("per_row_adapters is for inference only: run the model under torch.no_grad()")
        if not isinstance(rows, RowAdapters):
            rows = RowAdapters(rows, x.device)
        if x.shape[0] != len(rows.names):
            raise ValueError(f"per_row_adapters: give one adapter name per batch row; the batch has {x.shape[0]} "
                             f"rows and {len(rows.names)} names")
        if len(rows.groups) == 1 and not self.training:
            holder = self.holder(next(iter(rows.groups)))
            return self.dorafit.base_class.forward(self, x) if holder is None else self.adapter_forward(x, holder)
        stacked = stacked_adapters.forward(self, x, rows)  # few tokens (decoding): every adapter in one product
        if stacked is not None:
            return stacked
        ops = self.dorafit.ops
        y = ops.base(self, x)  # W0 x for every row
        for name, index in rows.groups.items():
            holder = self.holder(name)
            if holder is None:
                continue
            st = holder.dorafit
            p, q = self.factors(holder)
            part = y.index_select(0, index)
            if p is not None:
                part = part + ops.up(self, ops.down(self, x.index_select(0, index), q), p).to(part.dtype)
            if st.decomposed:
                scale = (holder.magnitude / self.weight_norm(p, q, holder)).to(part.dtype)  # [out]
                shape = [1] * part.dim()
                shape[ops.channel_dim] = -1
                part = part * scale.view(shape)
            y.index_copy_(0, index, part)
        return ops.finish(self, x, ops.add_bias(self, y))

    # ---- merge ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, holder=None) -> None:
        """Fold the adapter into the weight: W' = W0 + P Q, or m / n * (W0 + P Q). No-op if merged.

        ``holder``: which adapter (default: the layer's own); one adapter at a time can be merged."""
        holder = holder if holder is not None else self
        st = holder.dorafit
        if st.merged:
            return
        if self.dorafit.merged_name is not None:
            raise ValueError(f"adapter {self.dorafit.merged_name!r} is merged into this layer; unmerge it first")
        if not self.dorafit.ops.can_merge_in_place:
            raise ValueError(quantized_merge_refusal(self.dorafit.ops.describe(self)))
        p, q = self.factors(holder)
        w0 = self.dorafit.ops.weight_matrix(self)
        m = holder.magnitude if st.decomposed else None
        n = self.weight_norm(p, q, holder) if st.decomposed else None
        if m is not None and bool((m == 0).any()):
            rows = torch.nonzero(m == 0).flatten()
            st.merge_lost_rows = (rows, w0[rows].clone())
        self.dorafit.ops.set_weight_matrix(self, Fn.merged_weight(w0, p, q, m, n))
        st.merge_norm = n
        st.merged = True
        self.dorafit.merged_name = st.name

    @torch.no_grad()
    def unmerge(self, holder=None) -> None:
        """Recover W0 from a merged weight (up to rounding). No-op if not merged."""
        holder = holder if holder is not None else self
        st = holder.dorafit
        if not st.merged:
            return
        p, q = self.factors(holder)
        w = self.dorafit.ops.weight_matrix(self)
        m = holder.magnitude if st.decomposed else None
        w0 = Fn.unmerged_weight(w, p, q, m, st.merge_norm)
        if st.merge_lost_rows is not None:
            rows, values = st.merge_lost_rows
            w0[rows] = values
        self.dorafit.ops.set_weight_matrix(self, w0)
        st.merged, st.merge_norm, st.merge_lost_rows = False, None, None
        self.dorafit.merged_name = None

    # ---- the state dict and pickling -----------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A merged layer's state holds the base weight W0 (recovered as :meth:`unmerge` does), not the merged
        one: the state of a model is the same merged or not, and loads into either."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        name = self.dorafit.merged_name
        if name is not None and prefix + "weight" in destination:
            destination[prefix + "weight"] = self._unmerged_weight(self.holder(name))

    @torch.no_grad()
    def _unmerged_weight(self, holder) -> Tensor:
        """W0 in the layer's own layout, computed from the merged weight without changing it."""
        st = holder.dorafit
        p, q = self.factors(holder)
        m = holder.magnitude if st.decomposed else None
        w0 = Fn.unmerged_weight(self.dorafit.ops.weight_matrix(self), p, q, m, st.merge_norm)
        if st.merge_lost_rows is not None:
            rows, values = st.merge_lost_rows
            w0[rows] = values
        native = self.weight.detach().clone()
        self.dorafit.ops.weight_matrix(_WeightOnly(native)).copy_(w0)
        return native

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loading into a merged layer: unmerge, load (W0 and the adapter tensors), merge again."""
        name = self.dorafit.merged_name
        holder = self.holder(name) if name is not None else None
        if holder is not None:
            self.unmerge(holder)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if holder is not None:
            self.merge(holder)

    def __reduce_ex__(self, protocol):
        """Pickle (``torch.save(model)``, ``copy.deepcopy``) by the base layer's class: the adapted class is made
        at run time, so it is made again when unpickling."""
        return _new_adapted, (self.dorafit.base_class,), self.__getstate__()

    def train(self, mode: bool = True):
        """Also drops the cached norms: ``model.eval()`` always starts from the current tensors, even after writes
        through ``.data`` (which do not bump the version counters the caches are keyed on)."""
        for holder in [self, *self.holders().values()]:
            holder.dorafit.caches.clear()
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
        adapters = ", ".join(f"{name}={kind.get((h.dorafit.update, h.dorafit.decomposed), 'magnitude-only')}"
                             for name, h in self.holders().items())
        merged = [name for name, h in self.holders().items() if h.dorafit.merged]
        return f"{st.base_class.extra_repr(self)}, adapters: {adapters or 'none'}, merged={merged or False}"


def quantized_merge_refusal(what: str) -> str:
    """Why an adapter is not merged into a quantized weight, and what to do instead."""
    return (f"cannot merge into {what}: W0 + dW would be re-quantized (lossy, and unmerge could not recover W0). "
            "Keep the adapter unmerged (inference then costs what QLoRA's costs), or write a float model with the "
            "adapter merged in float32 from the dequantized weight: dorafit.merge_and_unload(model) (CLI: dorafit "
            "merge RUN)")


class _WeightOnly:
    """A stand-in module with only a ``weight``, to write a matrix into a tensor in a layer family's layout."""

    def __init__(self, weight: Tensor):
        self.weight = weight


def _new_adapted(base_class: type) -> nn.Module:
    """An empty instance of ``Adapted<base_class>`` (pickle fills in its state)."""
    cls = adapted_class(base_class)
    return cls.__new__(cls)


_ADAPTED_CLASSES: dict[type, type] = {}


def adapted_class(base_class: type) -> type:
    """The (cached) class ``Adapted<Base>`` = AdaptedLayer + the base layer's class."""
    if base_class not in _ADAPTED_CLASSES:
        name = f"Adapted{base_class.__name__}"
        _ADAPTED_CLASSES[base_class] = type(name, (AdaptedLayer, base_class), {"__module__": __name__})
    return _ADAPTED_CLASSES[base_class]


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, AdaptedLayer)


def adapt_module(module: nn.Module, state: AdapterState, tensors: dict[str, Tensor],
                 buffers: dict[str, Tensor]) -> None:
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
    for holder in module.holders().values():
        module.unmerge(holder)
    for name in ADAPTER_PARAMS + VERA_BUFFERS + (SLOTS,):
        if hasattr(module, name):
            delattr(module, name)
    module.__class__ = st.base_class
    del module.dorafit
