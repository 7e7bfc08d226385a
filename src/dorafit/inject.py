"""Put adapters into a model, take them out, merge them, switch them off.

``apply(model, config)`` adapts, in place, every module that ``config.targets`` (or ``magnitude_only``) names,
freezes everything else except ``config.extra_trainable``, and remembers the config on the model.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import functional as Fn
from . import vera
from .adapted import (
    ADAPTER_PARAMS,
    SLOTS,
    AdaptedLayer,
    AdapterSlot,
    AdapterState,
    adapt_module,
    is_adapted,
    strip_module,
)
from .adapted import quantized_merge_refusal
from .config import AdapterConfig, Targets
from .dequantize import dequantize, merged_float_layer, set_submodule
from .layers import SUPPORTED_TYPES, ops_for

_CONFIG_ATTR = "dorafit_config"  # the model's own adapter's config (its first)
_NAMED_ATTR = "dorafit_named"  # name -> AdapterConfig of the adapters added beside it, in order
ADAPTER_DTYPE_ATTR = "dorafit_adapter_dtype"  # optional: the dtype new adapter tensors take (see apply)
_ACTIVE_ATTR = "dorafit_active"  # the adapter forward uses (None: the base model)
_REQUIRES_GRAD_ATTR = "_dorafit_requires_grad"
DEFAULT = "default"  # the name of an adapter applied without one


# ---- matching ------------------------------------------------------------------------------------------
def _matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    if callable(targets):
        return targets
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return lambda name, module: pattern.fullmatch(name) is not None
    names = list(targets)
    return lambda name, module: any(name == t or name.endswith("." + t) for t in names)


def _no_match_error(what: str, target, model: nn.Module) -> ValueError:
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and ops_for(m) is not None})
    hint = ""
    if isinstance(target, str):
        close = difflib.get_close_matches(target, leaf_names, n=3)
        if close:
            hint = f"; did you mean {', '.join(close)}?"
    shown = repr(target) if len(repr(target)) <= 80 else repr(target)[:77] + "...'"
    return ValueError(
        f"{what} {shown} matches no module of this {type(model).__name__}{hint or '.'} "
        f"Adaptable layer names in this model: {', '.join(leaf_names) or '(none)'}"
    )


def find_modules(model: nn.Module, targets: Targets, what: str = "target") -> list[str]:
    """Names of the modules ``targets`` selects; every listed name (or the regex / callable) must match one."""
    match = _matcher(targets)
    found = [name for name, module in model.named_modules() if name and match(name, module)]
    if not callable(targets) and not isinstance(targets, str):
        for t in targets:
            if not any(name == t or name.endswith("." + t) for name in found):
                raise _no_match_error(what, t, model)
    elif not found:
        raise _no_match_error(what, targets if isinstance(targets, str) else "callable", model)
    return found


# ---- building one adapted layer ---------------------------------------------------------------------------
def _init_lora(shape_a, shape_b, ops, config: AdapterConfig, dtype: torch.dtype, device) -> dict[str, Tensor]:
    a = torch.empty(shape_a, dtype=dtype, device=device)
    b = torch.zeros(shape_b, dtype=dtype, device=device)
    if ops.zero_factor == "A":  # embeddings, as the PEFT library does: A = 0, B ~ N(0, 1)
        a.zero_()
        nn.init.normal_(b)
    elif config.init == "gaussian":
        nn.init.normal_(a, std=1.0 / config.r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return {"lora_A": a, "lora_B": b}


def _checked_ops(name: str, module: nn.Module, config: AdapterConfig, magnitude_only: bool):
    """The layer's ops, after checking that this module can take this adapter (a ValueError names why not)."""
    ops = ops_for(module)
    if ops is None:
        raise ValueError(
            f"module {name!r} is a {type(module).__name__}, which cannot carry an adapter; "
            f"supported: {SUPPORTED_TYPES}. Name its Linear/Conv/Embedding children instead."
        )
    try:
        ops.check(module)
    except ValueError as exc:
        raise ValueError(f"module {name!r}: {exc}") from None
    out, inp = ops.shape(module)
    # LoRA's rank bounds the update; VeRA's r is the size of its shared random projections, which may exceed the
    # layer's dimensions (the VeRA paper uses r = 256-1024 on every layer, as PEFT allows)
    if not magnitude_only and config.update == "lora" and config.r > min(out, inp):
        raise ValueError(
            f"rank r={config.r} is larger than module {name!r} allows (weight {out} x {inp}: r <= {min(out, inp)}); "
            "lower r or leave this module out of targets"
        )
    return ops


def _adapt(name: str, module: nn.Module, config: AdapterConfig, magnitude_only: bool, shared: dict,
           adapter: str = DEFAULT, resident: bool = True, active: str | None = DEFAULT,
           adapter_dtype: torch.dtype | None = None) -> None:
    """Give ``module`` the adapter ``adapter``: as its own (``resident``: the first adapter of a model) or in an
    :class:`AdapterSlot` beside what it carries; ``active``: the model's active adapter; ``adapter_dtype``: of
    the new tensors (default: the layer family's, see ``LayerOps.adapter_dtype``)."""
    ops = _checked_ops(name, module, config, magnitude_only)
    if not is_adapted(module):
        ops.prepare(module)
    out, inp = ops.shape(module)
    kw = dict(dtype=adapter_dtype or ops.adapter_dtype(module), device=module.weight.device)
    update = None if magnitude_only else config.update
    tensors: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    scale = 1.0
    if update == "lora":
        shape_a, shape_b = ops.lora_shapes(module, config.r)
        tensors.update(_init_lora(shape_a, shape_b, ops, config, **kw))
        scale = Fn.lora_scale(config.alpha, config.r, config.rslora)
    elif update == "vera":
        key = (out, inp)
        if key not in shared:
            a, b = vera.shared_projections(config.vera_seed, config.r, out, inp)
            shared[key] = (a.to(kw["device"], kw["dtype"]), b.to(kw["device"], kw["dtype"]))
        buffers["vera_A"], buffers["vera_B"] = shared[key]
        tensors["vera_lambda_d"] = torch.full((config.r,), config.vera_d_init, **kw)
        tensors["vera_lambda_b"] = torch.zeros(out, **kw)
    if config.decomposed:
        with torch.no_grad():  # m = ||W0|| (float32, float64 for float64 weights) by the same function as n: m / n == 1
            tensors["magnitude"] = Fn.factored_norm(ops.squared_row_norms(module), None, None, None, config.eps)
    state = AdapterState(
        ops=ops,
        base_class=type(module),
        update=update,
        decomposed=config.decomposed,
        scale=scale,
        dropout=config.dropout,
        detach_norm=config.detach_norm,
        magnitude_grad=config.magnitude_grad,
        eps=config.eps,
        name=adapter,
        active=active,
    )
    if resident:
        adapt_module(module, state, tensors, buffers)
        return
    if not is_adapted(module):  # a layer only named adapters reach: no adapter of its own
        empty = AdapterState(ops=ops, base_class=type(module), update=None, decomposed=False, scale=1.0, dropout=0.0,
                             detach_norm=True, eps=config.eps, present=False, active=active)
        adapt_module(module, empty, {}, {})
    if SLOTS not in module._modules:
        module.add_module(SLOTS, nn.ModuleDict())
    getattr(module, SLOTS)[adapter] = AdapterSlot(state, tensors, buffers)


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> names of the distinct modules that hold it as a direct parameter."""
    owners: dict[int, list[str]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners


# ---- public API -------------------------------------------------------------------------------------------
def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(name, layer) for every layer that carries the model's own (first) adapter."""
    for name, module in model.named_modules():
        if is_adapted(module) and module.dorafit.present:
            yield name, module


def adapter_layers(model: nn.Module, adapter: str | None = None) -> list[tuple[str, AdaptedLayer, object]]:
    """(module name, layer, holder) for every layer that carries ``adapter`` (default: the model's own), where
    ``holder`` is the layer itself or the :class:`AdapterSlot` holding that adapter's tensors."""
    adapter = own_name(model) if adapter is None else adapter
    out = []
    for name, module in model.named_modules():
        if is_adapted(module):
            holder = module.holder(adapter)
            if holder is not None:
                out.append((name, module, holder))
    return out


def own_name(model: nn.Module) -> str | None:
    """The name of the model's own (first) adapter, or None if it has none."""
    config = getattr(model, _CONFIG_ATTR, None)
    return None if config is None else getattr(model, "dorafit_own_name", DEFAULT)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters: its own first, then those added beside it, in order."""
    own = own_name(model)
    return ([own] if own is not None else []) + list(getattr(model, _NAMED_ATTR, {}))


def get_config(model: nn.Module, name: str | None = None) -> AdapterConfig:
    """The config ``apply`` used for adapter ``name`` (default: the model's own); error if there is none."""
    if name is not None and name != own_name(model):
        named = getattr(model, _NAMED_ATTR, {})
        if name not in named:
            raise ValueError(f"this model has no adapter named {name!r}; it has "
                             f"{', '.join(adapter_names(model)) or 'none'}")
        return named[name]
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model has no dorafit adapters; call dorafit.apply(model, config) first")
    return config


def apply(model: nn.Module, config: AdapterConfig, name: str | None = None) -> list[str]:
    """Adapt ``model`` in place; returns the names of the adapted modules (full method and magnitude-only).

    Freezes every parameter except the adapters' and those of ``config.extra_trainable`` modules.
    Errors (naming the problem) if the model already has adapters, a target matches nothing or names an
    unsupported layer type, or r exceeds a layer's dimensions. On error the model is left unchanged.

    ``name``: add a named adapter. The first adapter of a model is its own (its tensors under the layers' own
    keys, as without a name); a named adapter added to a model that has one goes beside it (its tensors under
    ``<layer>.dorafit_adapters.<name>.``), frozen and inactive until :func:`dorafit.set_adapter` picks it.

    The adapter tensors take each layer's dtype (float32 on a quantized layer), unless the model carries an
    attribute ``dorafit_adapter_dtype`` (a ``torch.dtype``): float32 master weights beside a bfloat16 base, as
    ``dorafit train --dtype bfloat16`` sets it; every later :func:`dorafit.load_adapter` then follows it too.
    """
    adapter_dtype = getattr(model, ADAPTER_DTYPE_ATTR, None)
    existing = adapter_names(model)
    if name is None and (existing or any(is_adapted(m) for m in model.modules())):
        raise ValueError("this model already has dorafit adapters; call dorafit.unload(model) or merge_and_unload "
                         "first, or add another beside them with apply(model, config, name=...)")
    if name is not None and name in existing:
        raise ValueError(f"this model already has an adapter named {name!r}; unload it first or choose another name")
    if name is not None and (not isinstance(name, str) or not name or "." in name):
        raise ValueError(f"an adapter name must be a non-empty string without '.', got {name!r}")
    resident = not existing
    mag_names = set(find_modules(model, config.magnitude_only, "magnitude_only")) if config.magnitude_only else set()
    full_names = [n for n in find_modules(model, config.targets) if n not in mag_names]
    extra_names = find_modules(model, config.extra_trainable, "extra_trainable") if config.extra_trainable else []
    modules = dict(model.named_modules())
    chosen = sorted(set(full_names) | mag_names, key=list(modules).index)
    owners = _weight_owners(model)
    for module_name in chosen:  # validate everything before changing anything
        _checked_ops(module_name, modules[module_name], config, module_name in mag_names)
        others = [o for o in owners[id(modules[module_name].weight)] if o != module_name]
        if others:
            raise ValueError(
                f"module {module_name!r} shares its weight with {others[0]!r} (tied weights): merging the adapter "
                f"would change {others[0]!r} too. Untie them first (e.g. clone the weight into {others[0]!r}) or "
                f"leave {module_name!r} out"
            )
    adapter = name or DEFAULT
    if not resident:
        frozen = {id(p) for p in model.parameters()}
        active = getattr(model, _ACTIVE_ATTR, own_name(model))
        shared: dict = {}
        for module_name in chosen:
            _adapt(module_name, modules[module_name], config, module_name in mag_names, shared, adapter, False, active,
                   adapter_dtype)
        for p in model.parameters():  # the new adapter's tensors start frozen: it is not active
            if id(p) not in frozen:
                p.requires_grad_(False)
        getattr(model, _NAMED_ATTR)[adapter] = config
        return chosen
    setattr(model, _REQUIRES_GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    shared = {}
    for module_name in chosen:
        _adapt(module_name, modules[module_name], config, module_name in mag_names, shared, adapter, True, adapter,
               adapter_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapted_modules(model):
        for pname in ADAPTER_PARAMS:
            if hasattr(layer, pname):
                getattr(layer, pname).requires_grad_(True)
    for module_name in extra_names:
        for p in modules[module_name].parameters():
            p.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, _NAMED_ATTR, {})
    setattr(model, _ACTIVE_ATTR, adapter)
    model.dorafit_own_name = adapter
    model.dorafit_extra_trainable = extra_names
    return chosen


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The tensors of adapter ``name`` (default: the model's own) and its extra trainable modules, keyed as the
    model's own adapter's would be (``<layer>.lora_A``), so any adapter saves and loads like the first."""
    if name is None or name == own_name(model):
        get_config(model)
        prefixes = [f"{n}." for n in model.dorafit_extra_trainable]
        wanted = {f"{n}.{p}" for n, layer in adapted_modules(model) for p in ADAPTER_PARAMS if hasattr(layer, p)}
        return {k: v for k, v in model.state_dict().items() if k in wanted or any(k.startswith(p) for p in prefixes)}
    config = get_config(model, name)
    out = {f"{n}.{p}": getattr(holder, p).detach() for n, _, holder in adapter_layers(model, name)
           for p in ADAPTER_PARAMS if p in holder._parameters}
    if config.extra_trainable:
        state = model.state_dict()
        prefixes = tuple(f"{n}." for n in find_modules(model, config.extra_trainable, "extra_trainable"))
        out.update({k: v for k, v in state.items() if k.startswith(prefixes)})
    return out


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def _all_adapted(model: nn.Module) -> list[AdaptedLayer]:
    return [m for m in model.modules() if is_adapted(m)]


def merge(model: nn.Module) -> None:
    """Fold the active adapter into its layers' weights: inference then costs exactly what the base model costs.

    Refused (nothing merged) if a layer's weight is quantized: :func:`merge_and_unload` writes a float model."""
    active = getattr(model, _ACTIVE_ATTR, own_name(model))
    get_config(model, active)
    for name, layer, _ in adapter_layers(model, active):
        if not layer.dorafit.ops.can_merge_in_place:
            raise ValueError(f"dorafit.merge: module {name!r}: "
                             + quantized_merge_refusal(layer.dorafit.ops.describe(layer)))
    _merge(model, active)


def _merge(model: nn.Module, active: str | None, skip: frozenset = frozenset()) -> None:
    for name, layer, holder in adapter_layers(model, active):
        if name not in skip:
            layer.merge(holder)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: base weights come back (up to float rounding)."""
    get_config(model)
    for layer in _all_adapted(model):
        for holder in layer.holders().values():
            layer.unmerge(holder)


def _remove(model: nn.Module, merge_first: bool, dtype: torch.dtype | None = None) -> nn.Module:
    if not adapter_names(model):
        get_config(model)  # the error: no adapters
    floats: dict[str, nn.Module] = {}  # quantized layers: a float layer with the adapter merged, made before any change
    if merge_first:
        active = getattr(model, _ACTIVE_ATTR, own_name(model))
        get_config(model, active)
        floats = {name: merged_float_layer(layer, holder, dtype)
                  for name, layer, holder in adapter_layers(model, active)
                  if not layer.dorafit.ops.can_merge_in_place}
        _merge(model, active, frozenset(floats))
    for layer in _all_adapted(model):
        if merge_first:
            for holder in layer.holders().values():
                holder.dorafit.merged = False  # keep the merged weight: strip without unmerging
        strip_module(layer)
    flags = getattr(model, _REQUIRES_GRAD_ATTR, {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    for attr in (_CONFIG_ATTR, _NAMED_ATTR, _ACTIVE_ATTR, _REQUIRES_GRAD_ATTR, "dorafit_extra_trainable",
                 "dorafit_own_name"):
        if hasattr(model, attr):
            delattr(model, attr)
    for name, layer in floats.items():
        set_submodule(model, name, layer)
    if merge_first:  # a merged model is a float model, also where the adapter sat only on float layers
        dequantize(model, dtype)
    return model


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active adapter and turn adapted layers back into plain torch layers (in place; any other
    adapters are dropped); returns the model.

    On a quantized base the result is a float model: each adapted quantized layer becomes an ``nn.Linear`` whose
    weight is the merge computed in float32 from the dequantized W0, and every other quantized layer its
    dequantized W0 (:mod:`dorafit.dequantize`); ``dtype``: of those float weights (default: each layer's dtype
    before quantization)."""
    return _remove(model, merge_first=True, dtype=dtype)


def unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove every adapter without merging: the base model comes back (in place); returns the model.

    ``name``: remove only that adapter (the others stay; if it was active, the model's own becomes active, or
    the base model if it was the model's own)."""
    if name is None or adapter_names(model) == [name]:
        get_config(model, name)
        return _remove(model, merge_first=False)
    get_config(model, name)
    own = name == own_name(model)
    for _, layer, holder in adapter_layers(model, name):
        layer.unmerge(holder)
        if own:
            for attr in ADAPTER_PARAMS + ("vera_A", "vera_B"):
                if hasattr(layer, attr):
                    delattr(layer, attr)
            layer.dorafit.present = False
        else:
            slots = layer._modules[SLOTS]
            del slots[name]
            if not len(slots):
                del layer._modules[SLOTS]
        if not layer.dorafit.present and SLOTS not in layer._modules:
            strip_module(layer)
    if own:
        delattr(model, _CONFIG_ATTR)
        model.dorafit_extra_trainable = []
    else:
        del getattr(model, _NAMED_ATTR)[name]
    if getattr(model, _ACTIVE_ATTR, None) == name:
        set_active(model, own_name(model))
    return model


def set_active(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` (None: none, the base model) the one forward uses and the only one that trains."""
    if name is not None:
        get_config(model, name)
    merged = {layer.dorafit.merged_name for layer in _all_adapted(model)} - {None}
    if merged and merged != {name}:
        raise ValueError(f"adapter {merged.pop()!r} is merged into the weights; unmerge it (dorafit.unmerge) before "
                         "switching adapters")
    for layer in _all_adapted(model):
        layer.dorafit.active = name
        for holder_name, holder in layer.holders().items():
            for pname in ADAPTER_PARAMS:
                if pname in holder._parameters:
                    holder._parameters[pname].requires_grad_(holder_name == name)
    setattr(model, _ACTIVE_ATTR, name)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model: inside the block adapted layers compute their base layer's forward.

    A merged model is unmerged for the block and merged again after it.
    """
    if not adapter_names(model):
        get_config(model)
    layers = _all_adapted(model)
    was_merged = [(layer, layer.holder(layer.dorafit.merged_name)) for layer in layers if layer.dorafit.merged_name]
    for layer in layers:
        for holder in layer.holders().values():
            layer.unmerge(holder)
        layer.dorafit.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.dorafit.disabled = False
        for layer, holder in was_merged:
            layer.merge(holder)
