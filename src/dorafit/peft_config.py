"""What a PEFT ``adapter_config.json`` means: the options dorafit honours or refuses, and PEFT's rules for
which modules a config selects (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``modules_to_save``, ``rank_pattern`` / ``alpha_pattern``), as PEFT 0.21 applies them.

The import never relies on these rules alone: the adapter file's tensors name the adapted modules, and any
disagreement between the two is an error, so a rule that drifted from PEFT's shows up as a refusal, not as a
silently different adapter.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .io import AdapterFileError
from .layers import _is_gpt2_conv1d

# PEFT config keys that describe the file, not the function it computes
_METADATA_KEYS = {"peft_type", "peft_version", "base_model_name_or_path", "revision", "task_type", "inference_mode",
                  "auto_mapping", "runtime_config", "megatron_core", "qalora_group_size"}
# LoRA initialisations that leave the base weights alone (the trained A, B are all that matter afterwards)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# settings of those initialisations, unused once trained
_INIT_SETTINGS = {"eva_config", "corda_config", "lora_ga_config", "loftq_config", "init_lora_weights"}
# the options dorafit maps onto an AdapterConfig (LoraConfig, VeraConfig); everything else must be inert
LORA_MAPPED = {"r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "target_modules", "exclude_modules",
               "layers_to_transform", "layers_pattern", "modules_to_save", "rank_pattern", "alpha_pattern",
               "fan_in_fan_out", "bias"}
VERA_MAPPED = {"r", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
               "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out", "bias",
               "init_weights"}


class PeftFormatError(AdapterFileError):
    """A PEFT folder dorafit cannot read exactly, or a dorafit adapter the PEFT format cannot express."""


def list_selects(names: list[str], key: str) -> bool:
    """PEFT's (and dorafit's) rule for a list of module names: the full name, or a '.'-separated suffix of it."""
    return key in names or any(key.endswith("." + n) for n in names)


def save_selects(names: list[str], key: str) -> bool:
    """PEFT's rule for ``modules_to_save``: any module whose name ends with one of the strings."""
    return any(key.endswith(n) for n in names)


def exact_names(all_names: list[str], chosen: list[str], selects: Callable[[list[str], str], bool]) -> list[str] | None:
    """The leaf names, else the full names, of ``chosen`` if that list selects exactly ``chosen``; else None."""
    want = set(chosen)
    for candidate in (sorted({n.rsplit(".", 1)[-1] for n in chosen}), sorted(want)):
        if {n for n in all_names if selects(candidate, n)} == want:
            return candidate
    return None


def _inert(value) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def check_options(meta: dict, mapped: set[str]) -> None:
    """Refuse, by name, every PEFT option that changes what the adapter computes and that dorafit cannot honour."""
    if meta.get("bias", "none") != "none":
        raise PeftFormatError(f"the PEFT adapter uses bias={meta['bias']!r} (it trains the base model's biases), "
                              "which dorafit does not support; only bias='none' can be imported")
    init = meta.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise PeftFormatError(
            f"the PEFT adapter uses init_lora_weights={init!r}, which dorafit does not support: that initialisation "
            "changes the base model's weights (pissa, olora, corda, loftq, lora_ga) or the layer's training (mica), "
            "so the adapter only works on PEFT's modified model. Convert it to a plain LoRA with PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for key, value in meta.items():
        if key in mapped or key in _METADATA_KEYS or key in _INIT_SETTINGS or _inert(value):
            continue
        raise PeftFormatError(f"the PEFT adapter uses {key}={value!r}, which dorafit does not support; "
                              "it cannot be imported without changing what the adapter computes")


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_index_ok(meta: dict, key: str) -> bool:
    """PEFT's layers_to_transform / layers_pattern filter (applied to modules found by a list of names)."""
    indexes = meta.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    patterns = meta.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for regex in regexes:
        match = re.match(regex, key)
        if match:
            index = int(match.group("idx"))
            return index == indexes if isinstance(indexes, int) else index in indexes
    return False


def selected_targets(model: nn.Module, meta: dict, modules_to_save: list[str]) -> list[str]:
    """The module names PEFT's config selects in this model: target_modules (a list of names or suffixes, a regex,
    or 'all-linear': every Linear / GPT-2 Conv1D but the output embedding), minus exclude_modules and anything in
    modules_to_save, filtered by layers_to_transform."""
    targets, exclude = meta.get("target_modules"), meta.get("exclude_modules")
    if targets is None:
        raise PeftFormatError("the PEFT config has no target_modules")
    linear = isinstance(targets, str) and targets.lower() == "all-linear"
    output = model.get_output_embeddings() if linear and hasattr(model, "get_output_embeddings") else None
    found = []
    for key, module in model.named_modules():
        if not key:
            continue
        if exclude and (re.fullmatch(exclude, key) if isinstance(exclude, str) else list_selects(list(exclude), key)):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
            continue
        if linear:
            hit = (isinstance(module, nn.Linear) or _is_gpt2_conv1d(module)) and module is not output
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, key) is not None
        else:
            hit = key in targets or (list_selects(list(targets), key) and _layer_index_ok(meta, key))
        if hit:
            found.append(key)
    return found
