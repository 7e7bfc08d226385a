"""Save and load adapters: a folder with ``adapter_config.json`` and ``adapter.safetensors``.

The tensors file holds only adapter tensors (and the extra trainable modules'), keyed by the model's own
state-dict keys. The config file holds the adapter config (targets resolved to the adapted module names),
each adapted module's weight shape, VeRA fingerprints, and the SHA-256 of the tensors file, so a folder
whose two files come from different saves is refused. Both files are written atomically (tensors first,
config last). Loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import re
import os
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from . import __version__, vera
from .config import AdapterConfig
from .files import atomic_write_bytes, atomic_write_json, sha256_hex
from .inject import adapter_layers, adapter_state_dict, apply, find_modules, get_config, own_name, unload

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter.safetensors"
FORMAT = "dorafit-adapter/1"


class AdapterFileError(ValueError):
    """An adapter folder is missing, corrupt, or does not fit the model; the message says which and why."""


VERA_PREFIX = "vera_projections."


def _vera_key(layer) -> str:
    out, inp = layer.dorafit.ops.shape(layer)
    return f"{VERA_PREFIX}{out}x{inp}"


def _seed_fingerprint(layer, config: AdapterConfig) -> str:
    """Fingerprint of the float32 projections the config's seed generates for this layer (independent of dtype)."""
    out, inp = layer.dorafit.ops.shape(layer)
    return vera.seed_fingerprint(config.vera_seed, config.r, out, inp)


def _describe(model: nn.Module, adapter: str | None = None) -> dict:
    config = get_config(model, adapter)
    modules, fingerprints = {}, {}
    mag_only = []
    for name, layer, holder in adapter_layers(model, adapter):
        modules[name] = layer.dorafit.ops.weight_shape(layer)
        if holder.dorafit.update is None:
            mag_only.append(name)
        if holder.dorafit.update == "vera":
            fingerprints[_vera_key(layer)] = _seed_fingerprint(layer, config)
    own = adapter is None or adapter == own_name(model)
    extra = list(model.dorafit_extra_trainable) if own else \
        (find_modules(model, config.extra_trainable, "extra_trainable") if config.extra_trainable else [])
    resolved = dataclasses.replace(
        config,
        targets=[n for n in modules if n not in mag_only],
        magnitude_only=mag_only or None,
        extra_trainable=extra,
    )
    return {"config": resolved.to_dict(), "modules": modules, "vera_fingerprints": fingerprints}


def model_description(model: nn.Module) -> dict:
    """What rebuilds the model an adapter belongs to: its class name and, for a classifier, its labels."""
    info: dict = {"class": type(model).__name__}
    config = getattr(model, "config", None)
    if info["class"].endswith("Classification") and getattr(config, "id2label", None):
        info["id2label"] = {str(k): v for k, v in config.id2label.items()}
    return info


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model: str | None = None,
                 tensors: dict[str, Tensor] | None = None, name: str | None = None) -> Path:
    """Write the model's adapter to the folder ``path`` (created if needed); returns the folder.

    ``tensors`` replaces the model's own adapter tensors (same keys), e.g. full tensors gathered from shards.
    ``name``: which adapter (default: the model's own); any adapter is saved as an ordinary adapter folder.
    """
    folder = Path(path)
    own = adapter_state_dict(model, name)
    if tensors is not None and set(tensors) != set(own):
        raise ValueError(f"save_adapter: the tensors given have keys {sorted(set(tensors) ^ set(own))[:3]} "
                         "that differ from the model's adapter tensors")
    tensors = {k: v.detach().contiguous().cpu() for k, v in (own if tensors is None else tensors).items()}
    config = get_config(model, name)
    if config.save_vera_projections:  # once per shared shape, not once per layer
        for _, layer, holder in adapter_layers(model, name):
            if holder.dorafit.update == "vera":
                key = _vera_key(layer)
                tensors[f"{key}.A"] = holder.vera_A.detach().contiguous().cpu()
                tensors[f"{key}.B"] = holder.vera_B.detach().contiguous().cpu()
    blob = save_safetensors_bytes(tensors, metadata={"format": FORMAT})
    meta = _describe(model, name)
    meta.update(format=FORMAT, dorafit_version=__version__, tensors_sha256=sha256_hex(blob),
                model=model_description(model))
    if base_model is not None:
        meta["base_model"] = base_model
    meta["config_sha256"] = _config_digest(meta)
    atomic_write_bytes(folder / TENSORS_FILE, blob)
    atomic_write_json(folder / CONFIG_FILE, meta)
    return folder


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, tensors) of an adapter folder, checked for presence, format and integrity."""
    folder = Path(path)
    config_path, tensors_path = folder / CONFIG_FILE, folder / TENSORS_FILE
    if not tensors_path.is_file() and (folder / "adapter_model.safetensors").is_file():
        raise AdapterFileError(f"{folder} is a PEFT adapter folder (adapter_model.safetensors); load it with "
                               "dorafit.import_peft(model, folder), or dorafit train --init-from")
    for p in (config_path, tensors_path):
        if not p.is_file():
            raise AdapterFileError(f"{p} does not exist; an adapter folder holds {CONFIG_FILE} and {TENSORS_FILE}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{config_path} is not a dorafit adapter config (expected format {FORMAT!r})")
    for key in ("config", "modules", "tensors_sha256"):
        if not isinstance(meta.get(key), (dict, str)):
            raise AdapterFileError(f"{config_path} has no valid {key!r} entry; the file is corrupt, save the "
                                   "adapter again")
    if "config_sha256" in meta and meta["config_sha256"] != _config_digest(meta):
        raise AdapterFileError(f"{config_path} was edited or is damaged: its checksum differs from its contents "
                               "(alpha, targets or another entry changed after saving); save the adapter again")
    blob = tensors_path.read_bytes()
    if sha256_hex(blob) != meta.get("tensors_sha256"):
        raise AdapterFileError(
            f"{tensors_path} does not match {config_path} (checksum differs): the files come from different saves "
            "or the tensors file is corrupt; save the adapter again"
        )
    try:
        tensors = load_safetensors_bytes(blob)
    except Exception as exc:  # safetensors raises several types (SafetensorError, ValueError, ...) for bad headers
        raise AdapterFileError(f"{tensors_path} is not a readable safetensors file: {exc}") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterFileError(f"{tensors_path}: tensor {key!r} has dtype {t.dtype}; adapter tensors are floats")
        if not bool(t.isfinite().all()):
            raise AdapterFileError(f"{tensors_path}: tensor {key!r} holds NaN or infinite values; the adapter is "
                                   "damaged or was saved from a diverged run")
    return meta, tensors


def _config_digest(meta: dict) -> str:
    """SHA-256 of the adapter config file's entries (all but this digest), as canonical JSON."""
    rest = {k: v for k, v in meta.items() if k != "config_sha256"}
    return sha256_hex(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _check_and_copy(model: nn.Module, meta: dict, tensors: dict[str, Tensor], adapter: str | None = None) -> None:
    """Check the model's adapted modules and tensors against the file, then copy (nothing is copied on error)."""
    saved_modules = meta["modules"]
    config = get_config(model, adapter)
    ours = {name: layer.dorafit.ops.weight_shape(layer) for name, layer, _ in adapter_layers(model, adapter)}
    for name, shape in saved_modules.items():
        if name not in ours:
            raise AdapterFileError(f"the adapter was saved for module {name!r}, which this model does not have adapted")
        if ours[name] != shape:
            raise AdapterFileError(
                f"module {name!r}: the adapter was saved for a weight of shape {shape}, this model's is {ours[name]}; "
                "this adapter belongs to a different base model"
            )
    stored: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer, holder in adapter_layers(model, adapter):
        if holder.dorafit.update == "vera":
            key = _vera_key(layer)
            if f"{key}.A" in tensors:  # stored projections replace the regenerated ones, still shared per shape
                if key not in stored:
                    like = holder.vera_A
                    stored[key] = tuple(tensors[f"{key}.{ab}"].to(like.device, like.dtype) for ab in "AB")
                holder.vera_A, holder.vera_B = stored[key]
            elif meta.get("vera_fingerprints", {}).get(key) != _seed_fingerprint(layer, config):
                raise AdapterFileError(
                    f"module {name!r}: VeRA's shared projections regenerated from seed {config.vera_seed} "
                    "differ from the ones the adapter was trained with (wrong seed, rank or shape)"
                )
    set_adapter_state_dict(model, {k: v for k, v in tensors.items() if not k.startswith(VERA_PREFIX)}, adapter)


def set_adapter_state_dict(model: nn.Module, tensors: dict[str, Tensor], name: str | None = None) -> None:
    """Copy adapter tensors into an adapted model; every key and shape must match, else nothing is copied.

    ``name``: into that adapter (default: the model's own), keyed like the model's own (``<layer>.lora_A``)."""
    current = adapter_state_dict(model, name)
    missing = sorted(set(current) - set(tensors))
    unexpected = sorted(set(tensors) - set(current))
    if missing:
        raise AdapterFileError(f"adapter tensor {missing[0]!r} is missing from the file ({len(missing)} missing)")
    if unexpected:
        raise AdapterFileError(f"the file has tensor {unexpected[0]!r}, which this model does not have")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise AdapterFileError(
                f"tensor {key!r}: file shape {list(value.shape)}, model shape {list(current[key].shape)}"
            )
    merged = [(layer, holder) for _, layer, holder in adapter_layers(model, name) if holder.dorafit.merged]
    for layer, holder in merged:  # a merged weight folds in the old adapter: take it out before replacing tensors
        layer.unmerge(holder)
    with torch.no_grad():
        for key, value in tensors.items():
            current[key].copy_(value)
    for layer, holder in merged:
        layer.merge(holder)


def _exact_names(names: list[str]) -> str | list[str]:
    """A regular expression that full-matches exactly these module names (an empty list stays empty)."""
    return "|".join(re.escape(n) for n in names) if names else []


def _check_modules(model: nn.Module, meta: dict, path) -> None:
    """Every module the adapter was saved for exists in ``model``; else say which and what the model is."""
    have = dict(model.named_modules())
    saved = list(meta["modules"]) + list(meta["config"].get("extra_trainable") or [])
    missing = [n for n in saved if n not in have]
    if not missing:
        return
    saved_on = (meta.get("model") or {}).get("class")
    first = missing[0]
    close = [n for n in have if n and (first.endswith("." + n) or n.endswith("." + first))]
    hint = (f"; this model names it {close[0]!r}: the adapter was saved on a model with another head or wrapper"
            if close else "")
    built = f" (it was saved on a {saved_on})" if saved_on else ""
    raise AdapterFileError(
        f"the adapter in {path} does not fit this {type(model).__name__}{built}: {len(missing)} of its {len(saved)} "
        f"modules are missing, e.g. {first!r}{hint}. Load it into the model class it was trained on")


def load_adapter(model: nn.Module, path: str | os.PathLike, extra: bool = True, name: str | None = None) -> list[str]:
    """Apply the saved config to a base ``model`` (in place), then load the saved tensors.

    ``extra=False`` keeps the model's own tensors of the saved ``extra_trainable`` modules (e.g. a fresh
    classification head for another label set) instead of the saved ones; they stay trainable.
    ``name``: load it as a named adapter, beside any the model has (see :func:`dorafit.apply`).
    Returns the adapted module names. On any error the model is left as it was.
    """
    meta, tensors = read_adapter(path)
    try:
        config = AdapterConfig.from_dict(meta["config"])
        # The file lists full module names; match them exactly (a plain list would also match "x.<name>").
        config = dataclasses.replace(
            config,
            targets=_exact_names(config.targets),
            magnitude_only=_exact_names(config.magnitude_only) if config.magnitude_only else None,
        )
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{Path(path) / CONFIG_FILE}: invalid adapter config: {exc}") from None
    _check_modules(model, meta, path)
    try:
        names = apply(model, config, name=name)
    except ValueError as exc:
        raise AdapterFileError(f"the adapter in {path} does not fit this model: {exc}") from None
    adapter = name if name is not None else own_name(model)
    if not extra:
        prefixes = tuple(f"{n}." for n in get_config(model, adapter).extra_trainable or [])
        own = {k: v.detach().clone() for k, v in adapter_state_dict(model, adapter).items() if k.startswith(prefixes)}
        tensors = {**{k: v for k, v in tensors.items() if not k.startswith(prefixes)}, **own}
    try:
        _check_and_copy(model, meta, tensors, adapter)
    except BaseException:
        unload(model, adapter)
        raise
    return names
