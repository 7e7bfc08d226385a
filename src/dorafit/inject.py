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
    AdaptedLayer,
    AdapterState,
    adapt_module,
    is_adapted,
    strip_module,
)
from .config import AdapterConfig, Targets
from .layers import SUPPORTED_TYPES, ops_for

_CONFIG_ATTR = "dorafit_config"
_REQUIRES_GRAD_ATTR = "_dorafit_requires_grad"


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
def _init_lora(shape_a, shape_b, ops, config: AdapterConfig, like: Tensor) -> dict[str, Tensor]:
    a = torch.empty(shape_a, dtype=like.dtype, device=like.device)
    b = torch.zeros(shape_b, dtype=like.dtype, device=like.device)
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
    out, inp = ops.weight_matrix(module).shape
    # LoRA's rank bounds the update; VeRA's r is the size of its shared random projections, which may exceed the
    # layer's dimensions (the VeRA paper uses r = 256-1024 on every layer, as PEFT allows)
    if not magnitude_only and config.update == "lora" and config.r > min(out, inp):
        raise ValueError(
            f"rank r={config.r} is larger than module {name!r} allows (weight {out} x {inp}: r <= {min(out, inp)}); "
            "lower r or leave this module out of targets"
        )
    return ops


def _adapt(name: str, module: nn.Module, config: AdapterConfig, magnitude_only: bool, shared: dict) -> None:
    ops = _checked_ops(name, module, config, magnitude_only)
    w0 = ops.weight_matrix(module)
    out, inp = w0.shape
    update = None if magnitude_only else config.update
    tensors: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    scale = 1.0
    if update == "lora":
        shape_a, shape_b = ops.lora_shapes(module, config.r)
        tensors.update(_init_lora(shape_a, shape_b, ops, config, module.weight))
        scale = Fn.lora_scale(config.alpha, config.r, config.rslora)
    elif update == "vera":
        key = (out, inp)
        if key not in shared:
            a, b = vera.shared_projections(config.vera_seed, config.r, out, inp)
            shared[key] = (a.to(module.weight.device, module.weight.dtype), b.to(module.weight.device, module.weight.dtype))
        buffers["vera_A"], buffers["vera_B"] = shared[key]
        kw = dict(dtype=module.weight.dtype, device=module.weight.device)
        tensors["vera_lambda_d"] = torch.full((config.r,), config.vera_d_init, **kw)
        tensors["vera_lambda_b"] = torch.zeros(out, **kw)
    if config.decomposed:
        with torch.no_grad():  # m = ||W0|| (float32, float64 for float64 weights) by the same function as n: m / n == 1
            tensors["magnitude"] = Fn.decomposed_norm(Fn.squared_row_norms(w0), w0, None, None, config.eps)
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
    )
    adapt_module(module, state, tensors, buffers)


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
    """(name, layer) for every adapted layer of ``model``."""
    for name, module in model.named_modules():
        if is_adapted(module):
            yield name, module


def get_config(model: nn.Module) -> AdapterConfig:
    """The config ``apply`` used on this model; error if it has no adapters."""
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model has no dorafit adapters; call dorafit.apply(model, config) first")
    return config


def apply(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Adapt ``model`` in place; returns the names of the adapted modules (full method and magnitude-only).

    Freezes every parameter except the adapters' and those of ``config.extra_trainable`` modules.
    Errors (naming the problem) if the model already has adapters, a target matches nothing or names an
    unsupported layer type, or r exceeds a layer's dimensions. On error the model is left unchanged.
    """
    if getattr(model, _CONFIG_ATTR, None) is not None or any(is_adapted(m) for m in model.modules()):
        raise ValueError("this model already has dorafit adapters; call dorafit.unload(model) or merge_and_unload first")
    mag_names = set(find_modules(model, config.magnitude_only, "magnitude_only")) if config.magnitude_only else set()
    full_names = [n for n in find_modules(model, config.targets) if n not in mag_names]
    extra_names = find_modules(model, config.extra_trainable, "extra_trainable") if config.extra_trainable else []
    modules = dict(model.named_modules())
    chosen = sorted(set(full_names) | mag_names, key=list(modules).index)
    owners = _weight_owners(model)
    for name in chosen:  # validate everything before changing anything
        _checked_ops(name, modules[name], config, name in mag_names)
        others = [o for o in owners[id(modules[name].weight)] if o != name]
        if others:
            raise ValueError(
                f"module {name!r} shares its weight with {others[0]!r} (tied weights): merging the adapter would change "
                f"{others[0]!r} too. Untie them first (e.g. clone the weight into {others[0]!r}) or leave {name!r} out"
            )
    setattr(model, _REQUIRES_GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    shared: dict = {}
    for name in chosen:
        _adapt(name, modules[name], config, name in mag_names, shared)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapted_modules(model):
        for pname in ADAPTER_PARAMS:
            if hasattr(layer, pname):
                getattr(layer, pname).requires_grad_(True)
    for name in extra_names:
        for p in modules[name].parameters():
            p.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)
    model.dorafit_extra_trainable = extra_names
    return chosen


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors and the extra trainable modules' tensors, keyed by the model's own state-dict keys."""
    get_config(model)
    prefixes = [f"{n}." for n in model.dorafit_extra_trainable]
    wanted = {f"{name}.{p}" for name, layer in adapted_modules(model) for p in ADAPTER_PARAMS if hasattr(layer, p)}
    return {k: v for k, v in model.state_dict().items() if k in wanted or any(k.startswith(p) for p in prefixes)}


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def merge(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight: inference then costs exactly what the base model costs."""
    get_config(model)
    for _, layer in adapted_modules(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: base weights come back (up to float rounding)."""
    get_config(model)
    for _, layer in adapted_modules(model):
        layer.unmerge()


def _remove(model: nn.Module, merge_first: bool) -> nn.Module:
    get_config(model)
    for _, layer in list(adapted_modules(model)):
        if merge_first:
            layer.merge()
            layer.dorafit.merged = False  # keep the merged weight: strip without unmerging
        strip_module(layer)
    flags = getattr(model, _REQUIRES_GRAD_ATTR, {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    for attr in (_CONFIG_ATTR, _REQUIRES_GRAD_ATTR, "dorafit_extra_trainable"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and turn adapted layers back into plain torch layers (in place); returns the model."""
    return _remove(model, merge_first=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the base model comes back (in place); returns the model."""
    return _remove(model, merge_first=False)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model: inside the block adapted layers compute their base layer's forward.

    A merged model is unmerged for the block and merged again after it.
    """
    get_config(model)
    layers = [layer for _, layer in adapted_modules(model)]
    was_merged = [layer.dorafit.merged for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.dorafit.disabled = True
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.dorafit.disabled = False
            if merged:
                layer.merge()
