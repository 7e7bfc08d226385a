"""Export to and import from the PEFT library's adapter folder format (``PeftModel.save_pretrained``).

A PEFT folder holds ``adapter_config.json`` (a ``LoraConfig`` or ``VeraConfig`` as JSON) and
``adapter_model.safetensors``. For a module at path P the tensors are named (prefix ``base_model.model.``):

    dorafit                          PEFT
    P.lora_A     [r, in, *k]         base_model.model.P.lora_A.weight       (Linear, GPT-2 Conv1D, ConvNd)
    P.lora_B     [out, r, *1]        base_model.model.P.lora_B.weight
    P.lora_A     [r, num]            base_model.model.P.lora_embedding_A    (Embedding)
    P.lora_B     [dim, r]            base_model.model.P.lora_embedding_B
    P.magnitude  [out]               base_model.model.P.lora_magnitude_vector   [out]; ConvNd: [1, out, 1, ...]
    P.vera_lambda_d [r], _b [out]    base_model.model.P.vera_lambda_d, base_model.model.P.vera_lambda_b
    vera_A [r, in], vera_B [out, r]  base_model.vera_A, base_model.vera_B   (ONE pair shared by all layers)
    extra trainable module X         base_model.model.X.<its state-dict keys>   (PEFT's modules_to_save)

The two libraries compute the same function of these tensors (with dropout 0 or in eval mode):
LoRA ``y = W0 x + b + s B A x`` with ``s = alpha / r`` (rsLoRA ``alpha / sqrt r``), DoRA
``y = (m / ||W0 + s B A||) * (W0 x + s B A x) + b`` (bias never scaled, norm per output unit), VeRA
``y = W0 x + b + lambda_b * B (lambda_d * A x)``. What PEFT cannot express is refused on export, and every
PEFT option dorafit cannot honour is refused on import, by name; nothing is dropped silently:

- Conv layers with dilation != 1 or a padding mode other than zeros: PEFT's conv ``lora_A`` ignores both.
- VeRA: PEFT slices one shared pair ``A[:, :in]``, ``B[:out, :]`` for every layer, while dorafit draws one pair per
  weight shape. Exactly expressible when all VeRA layers share one shape (then the pair is stored in the file);
  several shapes, DVoRA and VeRA on conv/embedding layers are refused. Importing reads PEFT's stored pair.
- Magnitude-only DoRA modules are written as DoRA modules whose ``lora_A`` and ``lora_B`` are zero (their update
  is zero and, having zero gradients, stays zero in PEFT's training too); on import a DoRA module whose two
  factors are exactly zero becomes magnitude-only again.
- Training-time differences (the outputs are equal): PEFT always detaches DoRA's norm, and its DoRA dropout
  computes ``(m/n - 1) W0 x~ + (m/n) s B A x~`` on the dropped input ``x~``; a warning says so when it matters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from . import vera
from .adapted import ADAPTER_PARAMS
from .config import AdapterConfig
from .files import atomic_write_bytes, atomic_write_json
from .inject import adapted_modules, adapter_layers, adapter_state_dict, apply, get_config, own_name, unload
from .io import CONFIG_FILE, set_adapter_state_dict
from .io import FORMAT as DORAFIT_FORMAT
from .layers import ops_for
from .layers.conv import ConvOps
from .layers.embedding import EmbeddingOps
from .layers.linear import GPT2Conv1DOps, LinearOps
from .peft_config import (
    LORA_MAPPED,
    VERA_MAPPED,
    PeftFormatError,
    check_options,
    exact_names,
    list_selects,
    pattern_value,
    save_selects,
    selected_targets,
)

PEFT_TENSORS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
VERA_SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")

# PEFT tensor name suffix -> the dorafit role it holds (older PEFT versions wrote the magnitude with ".weight")
_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
_VERA_SUFFIXES = {".vera_lambda_d": "lambda_d", ".vera_lambda_b": "lambda_b"}


# ---- shared helpers -------------------------------------------------------------------------------------------
def _family(layer: nn.Module) -> str:
    """'embedding', 'conv', 'gpt2_conv1d' or 'linear': what decides PEFT's tensor names and shapes."""
    ops = layer.dorafit.ops
    if isinstance(ops, EmbeddingOps):
        return "embedding"
    if isinstance(ops, ConvOps):
        return "conv"
    return "gpt2_conv1d" if isinstance(ops, GPT2Conv1DOps) else "linear"


def _conv_problem(module: nn.Module) -> str | None:
    """Why PEFT's conv LoRA computes something else on this conv layer, or None."""
    if any(d != 1 for d in module.dilation):
        return f"dilation={tuple(module.dilation)}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def _check_untied(model: nn.Module, names: list[str]) -> None:
    """PEFT's modules_to_save trains a COPY of each module; dorafit's extra_trainable trains the module itself. They
    agree unless a module shares a tensor with the rest of the model (a head tied to the input embedding)."""
    for name in names:
        inside = {id(p) for p in model.get_submodule(name).parameters()}
        for other, param in model.named_parameters(remove_duplicate=False):
            if id(param) in inside and not other.startswith(name + "."):
                raise PeftFormatError(
                    f"module {name!r} shares its weights with {other!r} (tied weights): PEFT's modules_to_save trains "
                    f"an untied copy of {name!r}, dorafit trains the shared tensor, so the two would compute "
                    "different models. Untie the weights first or leave the module out"
                )


def _warn_dora_dropout() -> None:
    warnings.warn("PEFT's DoRA applies dropout as (m/n - 1) W0 x~ + (m/n) s B A x~, dorafit as (m/n)(W0 x + "
                  "s B A x~): outputs without dropout (eval) are equal, training with dropout differs", stacklevel=4)


def _is_dorafit_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == DORAFIT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _model_name(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


# ---- export ------------------------------------------------------------------------------------------------------
def _check_exportable(model: nn.Module, config: AdapterConfig) -> None:
    if config.method == "dvora":
        raise PeftFormatError("PEFT has no DVoRA (DoRA with VeRA's update); export a lora, dora or vera adapter")
    shapes = {}
    for name, layer in adapted_modules(model):
        family = _family(layer)
        if family == "conv" and _conv_problem(layer):
            raise PeftFormatError(
                f"module {name!r} is a conv layer with {_conv_problem(layer)}; PEFT's conv LoRA applies lora_A without "
                "the layer's dilation and padding mode, so it would compute a different function. Leave this layer out"
            )
        if config.method == "vera":
            if family not in ("linear", "gpt2_conv1d"):
                raise PeftFormatError(f"module {name!r}: PEFT's VeRA supports only Linear and GPT-2 Conv1D layers")
            shapes[name] = layer.dorafit.ops.shape(layer)
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{n} {o}x{i}" for n, (o, i) in list(shapes.items())[:4])
        raise PeftFormatError(
            "PEFT's VeRA format has ONE pair of projections, sliced for every layer, while dorafit draws one pair per "
            f"weight shape; these VeRA layers have {len(set(shapes.values()))} shapes ({listing}, ...), which the "
            "PEFT format cannot express. Export VeRA on layers of a single shape, or use lora or dora"
        )
    extra = list(getattr(model, "dorafit_extra_trainable", []))
    _check_untied(model, extra)
    for name, _ in adapted_modules(model):
        inside = [x for x in extra if name == x or name.startswith(x + ".")]
        if inside:
            raise PeftFormatError(f"module {name!r} is adapted inside extra trainable module {inside[0]!r}; PEFT "
                                  "cannot adapt a module inside one of its modules_to_save")
    if config.decomposed and not config.detach_norm:
        warnings.warn("detach_norm=False has no PEFT equivalent: PEFT always treats DoRA's norm as a constant in "
                      "backward. The exported adapter computes the same outputs; training it further in PEFT uses the "
                      "detached gradient", stacklevel=3)
    if config.decomposed and config.dropout:
        _warn_dora_dropout()


def _layer_tensors(name: str, layer: nn.Module, r: int) -> dict[str, Tensor]:
    """One adapted layer's tensors under PEFT's names."""
    st, family, key = layer.dorafit, _family(layer), PREFIX + name
    out: dict[str, Tensor] = {}
    if st.update == "vera":
        out[key + ".vera_lambda_d"], out[key + ".vera_lambda_b"] = layer.vera_lambda_d, layer.vera_lambda_b
    else:
        if st.update == "lora":
            a, b = layer.lora_A, layer.lora_B
        else:  # magnitude-only: zero factors keep the update zero (and zero-gradient) in PEFT
            shape_a, shape_b = st.ops.lora_shapes(layer, r)
            a = torch.zeros(shape_a, dtype=st.ops.adapter_dtype(layer))
            b = torch.zeros(shape_b, dtype=st.ops.adapter_dtype(layer))
        if family == "embedding":
            out[key + ".lora_embedding_A"], out[key + ".lora_embedding_B"] = a, b
        else:
            out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = a, b
    if st.decomposed:
        m = layer.magnitude
        if family == "conv":
            m = m.view(1, -1, *([1] * (layer.weight.dim() - 2)))  # PEFT keeps the conv norm's keepdim shape
        out[key + ".lora_magnitude_vector"] = m
    return out


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class (PeftModel.from_pretrained then builds the matching class).

    PEFT's sequence-classification class also trains and saves modules named classifier / score, and never adapts
    inside them; when an adapted layer sits inside one, no task type is written (a plain PeftModel computes the same).
    """
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        inside_head = any(re.match(r"(^|.*\.)(classifier|score)($|\..*)", n) for n, _ in adapted_modules(model))
        return None if inside_head else "SEQ_CLS"
    return None


def _peft_config(model: nn.Module, config: AdapterConfig, base_model: str | None, revision: str | None = None) -> dict:
    layers = dict(adapted_modules(model))
    all_names = [n for n, _ in model.named_modules() if n]
    targets = exact_names(all_names, list(layers), list_selects)
    if targets is None:
        targets = "|".join(re.escape(n) for n in layers)  # PEFT: a string is a regex, full match
    extra = list(getattr(model, "dorafit_extra_trainable", []))
    modules_to_save = None
    if extra:
        modules_to_save = exact_names(all_names, extra, save_selects)
        if modules_to_save is None:
            raise PeftFormatError(
                f"PEFT selects modules_to_save by name suffix, and no list of names selects exactly {extra} in this "
                "model (another module's name ends with the same text); rename or drop an extra trainable module"
            )
    families = {_family(layer) for layer in layers.values()}
    common = dict(
        base_model_name_or_path=base_model, revision=revision, task_type=_task_type(model), inference_mode=True,
        r=config.r, target_modules=targets, layers_to_transform=None, layers_pattern=None,
        modules_to_save=modules_to_save, bias="none",
        fan_in_fan_out="gpt2_conv1d" in families and "linear" not in families,
    )
    if config.method == "vera":
        return dict(common, peft_type="VERA", projection_prng_key=config.vera_seed, save_projection=True,
                    vera_dropout=config.dropout, d_initial=config.vera_d_init, init_weights=True)
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return dict(common, peft_type="LORA", lora_alpha=alpha, lora_dropout=config.dropout, use_rslora=config.rslora,
                use_dora=config.decomposed, init_lora_weights="gaussian" if config.init == "gaussian" else True,
                rank_pattern={}, alpha_pattern={}, lora_bias=False, exclude_modules=None)


def export_peft(model: nn.Module, path: str | os.PathLike, base_model: str | None = None,
                revision: str | None = None) -> Path:
    """Write the model's dorafit adapter as a PEFT adapter folder, loadable with ``PeftModel.from_pretrained``.

    Args:
        model: a model adapted by :func:`dorafit.apply` (or :func:`dorafit.load_adapter`).
        path: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into (created if needed).
        base_model: the base model's name or path for ``base_model_name_or_path`` (default: the model's own
            ``name_or_path`` when it is a transformers model).
        revision: the base's Hub revision for ``revision`` (PEFT loads the base at it), e.g. the commit a run
            trained on; default None (the repository's main branch).

    Raises:
        PeftFormatError: the adapter uses something PEFT cannot express (see the module docstring).
    """
    folder = Path(path)
    if _is_dorafit_folder(folder):
        raise PeftFormatError(f"{folder} holds a dorafit adapter; write the PEFT export to another folder")
    config = get_config(model)
    _check_exportable(model, config)
    layers = dict(adapted_modules(model))
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors.update(_layer_tensors(name, layer, config.r))
    if config.method == "vera":
        layer = next(iter(layers.values()))
        tensors[VERA_SHARED_KEYS[0]], tensors[VERA_SHARED_KEYS[1]] = layer.vera_A, layer.vera_B
    adapter_keys = {f"{n}.{p}" for n in layers for p in ADAPTER_PARAMS}
    for key, value in adapter_state_dict(model).items():
        if key not in adapter_keys:  # an extra trainable module's tensor
            tensors[PREFIX + key] = value
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = _peft_config(model, config, base_model if base_model is not None else _model_name(model), revision)
    atomic_write_bytes(folder / PEFT_TENSORS_FILE, save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_json(folder / CONFIG_FILE, meta)
    return folder


# ---- import: read and check the PEFT folder --------------------------------------------------------------------
def _read_folder(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    config_path, tensors_path = folder / CONFIG_FILE, folder / PEFT_TENSORS_FILE
    if not config_path.is_file():
        raise PeftFormatError(f"{config_path} does not exist; a PEFT adapter folder holds {CONFIG_FILE} and "
                              f"{PEFT_TENSORS_FILE}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftFormatError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise PeftFormatError(f"{config_path} does not hold a PEFT config (a JSON object)")
    if meta.get("format") == DORAFIT_FORMAT:
        raise PeftFormatError(f"{folder} is a dorafit adapter folder, not a PEFT one; use dorafit.load_adapter")
    if not tensors_path.is_file():
        hint = ""
        if (folder / "adapter_model.bin").is_file():
            hint = (" It has adapter_model.bin, a pickle, which dorafit never loads; re-save the adapter with "
                    "save_pretrained(..., safe_serialization=True)")
        raise PeftFormatError(f"{tensors_path} does not exist.{hint}")
    try:
        tensors = load_safetensors_bytes(tensors_path.read_bytes())
    except Exception as exc:  # safetensors raises several types for malformed files
        raise PeftFormatError(f"{tensors_path} is not a readable safetensors file: {exc}") from None
    return meta, tensors


def _group(tensors: dict[str, Tensor], suffixes: dict[str, str]) -> tuple[dict[str, dict], dict[str, Tensor]]:
    """({module: {role: tensor}}, {other key without prefix: tensor}); a key outside PEFT's prefix is an error."""
    layers: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    for key, value in sorted(tensors.items()):
        if key in VERA_SHARED_KEYS:
            continue
        if not key.startswith(PREFIX):
            raise PeftFormatError(f"tensor {key!r} does not start with PEFT's {PREFIX!r}; this file was not written "
                                  "by PeftModel.save_pretrained")
        key = key[len(PREFIX):]
        for suffix, role in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
            if key.endswith(suffix):
                layers.setdefault(key[: -len(suffix)], {})[role] = value
                break
        else:
            other[key] = value
    return layers, other


def _wrong_model(meta: dict, what: str) -> PeftFormatError:
    base = meta.get("base_model_name_or_path")
    made_for = f" (it was made for {base!r})" if base else ""
    return PeftFormatError(f"{what}: the PEFT adapter belongs to a different base model{made_for}")


def _check_stored_base_tensor(model: nn.Module, meta: dict, key: str, value: Tensor, to_save: list) -> None:
    """PEFT may store base weights too (its save_embedding_layers: a targeted or resized embedding, under
    ``P.base_layer.weight`` or ``P.weight``). Identical to this model's they are redundant; otherwise refused."""
    base_key = key.replace(".base_layer.", ".")
    current = dict(model.state_dict(keep_vars=True)).get(base_key)
    if current is None:
        raise PeftFormatError(f"tensor {PREFIX + key!r} is neither an adapter tensor nor part of a modules_to_save "
                              f"module (modules_to_save={to_save}); dorafit cannot place it")
    if value.shape != current.shape or not torch.equal(value.to(current.dtype), current.detach()):
        raise _wrong_model(meta, f"the file stores its own base weight {base_key!r} (PEFT's save_embedding_layers, "
                                 "e.g. after resizing the vocabulary), and it differs from this model's; dorafit "
                                 "never replaces base weights: load the base model the adapter was trained on")


def _check_module_sets(model: nn.Module, meta: dict, layers: dict, other: dict) -> tuple[list[str], list[str]]:
    """(adapted module names, modules_to_save names) after checking the file against this model."""
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise _wrong_model(meta, f"the adapter has tensors for module {name!r}, which this model does not have")
    to_save = list(meta.get("modules_to_save") or [])
    saved_names = [n for n in modules if n and save_selects(to_save, n)] if to_save else []
    for key in list(other):
        if not any(key.startswith(n + ".") for n in saved_names):
            _check_stored_base_tensor(model, meta, key, other.pop(key), to_save)
    selected = selected_targets(model, meta, to_save)
    missing = [n for n in selected if n not in layers]
    extra = [n for n in layers if n not in selected]
    if missing:
        raise _wrong_model(meta, f"the config's target_modules select {len(missing)} module(s) of this model that "
                                 f"have no tensors in the file (first: {missing[0]!r})")
    if extra:
        raise PeftFormatError(f"the file has tensors for module {extra[0]!r}, which the config's target_modules do "
                              "not select; the folder is inconsistent")
    for name in selected:
        if isinstance(modules[name], (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and _conv_problem(modules[name]):
            raise PeftFormatError(f"module {name!r} is a conv layer with {_conv_problem(modules[name])}; PEFT's "
                                  "conv LoRA ignores it, dorafit does not, so the adapter cannot be imported exactly")
    order = list(modules)
    to_train = [n for n in saved_names if any(k.startswith(n + ".") for k in other)]
    _check_untied(model, to_train)
    return sorted(selected, key=order.index), to_train


def _dorafit_names(model: nn.Module, names: list[str], what: str) -> list[str] | str:
    all_names = [n for n, _ in model.named_modules() if n]
    exact = exact_names(all_names, names, list_selects)
    if exact is not None:
        return exact
    if what == "extra_trainable":
        raise PeftFormatError(f"dorafit's extra_trainable selects by name suffix, and no list selects exactly {names}")
    return "|".join(re.escape(n) for n in names)


# ---- import: LoRA / DoRA and VeRA ----------------------------------------------------------------------------------
def _plan_lora(model: nn.Module, meta: dict, tensors: dict[str, Tensor]):
    check_options(meta, LORA_MAPPED)
    layers, other = _group(tensors, _LORA_SUFFIXES)
    names, to_save = _check_module_sets(model, meta, layers, other)
    use_dora = bool(meta.get("use_dora", False))
    r0, alpha0 = int(meta.get("r", 8)), float(meta.get("lora_alpha", 8))
    full, mag_only, ranks = [], [], {}
    for name in names:
        roles = layers[name]
        for role in ("A", "B") + (("magnitude",) if use_dora else ()):
            if role not in roles:
                raise PeftFormatError(f"module {name!r} lacks its {role} tensor in {PEFT_TENSORS_FILE}")
        if "magnitude" in roles and not use_dora:
            raise PeftFormatError(f"module {name!r} has a lora_magnitude_vector but the config says use_dora=false")
        if use_dora and not roles["A"].any() and not roles["B"].any():
            mag_only.append(name)  # a zero update with zero gradients: DoRA with a trainable magnitude only
            continue
        full.append(name)
        rank = int(pattern_value(meta.get("rank_pattern"), name, r0))
        ranks[name] = (rank, float(pattern_value(meta.get("alpha_pattern"), name, alpha0)))
        if roles["A"].shape[0] != rank:
            raise PeftFormatError(f"module {name!r}: lora_A has rank {roles['A'].shape[0]}, the config says {rank}")
    if len(set(ranks.values())) > 1:
        listing = ", ".join(f"{n}: r={r}, alpha={a:g}" for n, (r, a) in list(ranks.items())[:4])
        raise PeftFormatError(f"the PEFT adapter's rank_pattern / alpha_pattern give its modules different ranks or "
                              f"alphas ({listing}); dorafit uses one rank and one alpha for all modules")
    r, alpha = next(iter(ranks.values())) if ranks else (r0, alpha0)
    init = "gaussian" if meta.get("init_lora_weights") == "gaussian" else "kaiming"
    config = AdapterConfig(
        method="dora" if use_dora else "lora", r=r, alpha=alpha, rslora=bool(meta.get("use_rslora", False)),
        targets=_dorafit_names(model, full, "targets") if full else [],
        magnitude_only=_dorafit_names(model, mag_only, "magnitude_only") if mag_only else None,
        dropout=float(meta.get("lora_dropout", 0.0)), init=init,
        extra_trainable=_dorafit_names(model, to_save, "extra_trainable") if to_save else [],
    )
    if use_dora and config.dropout:
        _warn_dora_dropout()
    return config, layers, other, None


def _plan_vera(model: nn.Module, meta: dict, tensors: dict[str, Tensor]):
    check_options(meta, VERA_MAPPED)
    if not meta.get("save_projection", True) or any(k not in tensors for k in VERA_SHARED_KEYS):
        raise PeftFormatError("the PEFT VeRA adapter does not store its projections (save_projection=false); dorafit "
                              "cannot regenerate PEFT's projections from projection_prng_key. Save it with "
                              "save_projection=True")
    layers, other = _group(tensors, _VERA_SUFFIXES)
    names, to_save = _check_module_sets(model, meta, layers, other)
    shared_a, shared_b = (tensors[k] for k in VERA_SHARED_KEYS)  # [r, max_in], [max_out, r]
    modules = dict(model.named_modules())
    projections = {}  # (out, in) -> PEFT's pair sliced for that shape: A[:, :in], B[:out, :]
    for name in names:
        ops = ops_for(modules[name])
        if not isinstance(ops, LinearOps):
            raise PeftFormatError(f"module {name!r} is a {type(modules[name]).__name__}; PEFT's VeRA adapts only "
                                  "Linear and GPT-2 Conv1D layers, so this file was not written by PEFT for this model")
        out, inp = ops.shape(modules[name])
        if shared_a.shape[1] < inp or shared_b.shape[0] < out:
            raise _wrong_model(meta, f"module {name!r} ({out}x{inp}) is larger than the stored VeRA projections "
                                     f"{list(shared_a.shape)}, {list(shared_b.shape)}")
        projections[(out, inp)] = (shared_a[:, :inp].clone(), shared_b[:out, :].clone())  # own storage per shape
    seed, r = int(meta.get("projection_prng_key", 0)), int(meta.get("r", 256))
    regenerable = all(  # projections dorafit draws itself from this seed (an adapter dorafit exported)
        all(torch.equal(x.float(), y) for x, y in zip(pair, vera.shared_projections(seed, r, *shape)))
        for shape, pair in projections.items()
    )
    config = AdapterConfig(
        method="vera", r=r, targets=_dorafit_names(model, names, "targets"),
        dropout=float(meta.get("vera_dropout", 0.0)),
        vera_seed=seed, vera_d_init=float(meta.get("d_initial", 0.1)), save_vera_projections=not regenerable,
        extra_trainable=_dorafit_names(model, to_save, "extra_trainable") if to_save else [],
    )
    return config, layers, other, projections


def _dorafit_tensors(model: nn.Module, layers: dict, other: dict, meta: dict,
                     adapter: str | None = None) -> dict[str, Tensor]:
    """The file's tensors under dorafit's keys, each shape checked against the adapted model (adapter ``adapter``:
    default the model's own)."""
    out: dict[str, Tensor] = {}
    roles = {"A": "lora_A", "B": "lora_B", "magnitude": "magnitude", "lambda_d": "vera_lambda_d",
             "lambda_b": "vera_lambda_b"}
    for name, layer, holder in adapter_layers(model, adapter):
        for role, value in layers[name].items():
            attr = roles[role]
            if not hasattr(holder, attr):
                continue  # a magnitude-only module's zero factors
            want = getattr(holder, attr).shape
            if role == "magnitude" and value.numel() == want.numel():
                value = value.reshape(want)  # conv: [1, out, 1, ...] -> [out]
            if value.shape != want:
                raise _wrong_model(meta, f"module {name!r}: PEFT tensor {role} has shape {list(value.shape)}, this "
                                         f"model's layer (weight {layer.dorafit.ops.weight_shape(layer)}) needs "
                                         f"{list(want)}")
            out[f"{name}.{attr}"] = value
    out.update(other)
    return out


def import_peft(model: nn.Module, path: str | os.PathLike, extra_trainable: list[str] | None = None,
                name: str | None = None) -> list[str]:
    """Load a PEFT adapter folder (LoRA, rsLoRA, DoRA or VeRA) into a base ``model`` as dorafit adapters, in place.

    The PEFT config is mapped to an :class:`AdapterConfig` (rank, alpha, use_rslora, use_dora, target modules with
    exclude_modules / layers_to_transform, dropout, modules_to_save, consistent rank_pattern / alpha_pattern, VeRA's
    stored projections) and the tensors are copied in. ``extra_trainable`` names more modules to train in full
    beside the adapter (e.g. a new classification head), added to the file's modules_to_save; they keep the
    model's weights. ``name``: load it as a named adapter, beside any the model has (see :func:`dorafit.apply`).
    Returns the adapted module names; :func:`dorafit.get_config` gives the config used.

    Raises:
        PeftFormatError: an option dorafit does not support (named in the message), a folder that is not a
            PEFT adapter, or an adapter made for a different base model (missing modules or wrong shapes).
            On any error the model is left unchanged.
    """
    meta, tensors = _read_folder(Path(path))
    peft_type = meta.get("peft_type")
    if peft_type == "LORA":
        config, layers, other, projections = _plan_lora(model, meta, tensors)
    elif peft_type == "VERA":
        config, layers, other, projections = _plan_vera(model, meta, tensors)
    else:
        raise PeftFormatError(f"the PEFT adapter has peft_type={peft_type!r}; dorafit imports LORA and VERA adapters")
    if extra_trainable:
        more = [n for n in extra_trainable if n not in config.extra_trainable]
        config = dataclasses.replace(config, extra_trainable=list(config.extra_trainable) + more)
    try:
        names = apply(model, config, name=name)
    except ValueError as exc:
        raise PeftFormatError(f"the PEFT adapter in {path} does not fit this model: {exc}") from None
    adapter = name if name is not None else own_name(model)
    try:
        placed: dict = {}  # one tensor per shape, shared by its layers as dorafit's own projections are
        for _, layer, holder in adapter_layers(model, adapter):
            if projections is not None:
                shape = layer.dorafit.ops.shape(layer)
                if shape not in placed:
                    like = holder.vera_A
                    placed[shape] = [t.to(like.device, like.dtype) for t in projections[shape]]
                holder.vera_A, holder.vera_B = placed[shape]
        tensors = _dorafit_tensors(model, layers, other, meta, adapter)
        current = adapter_state_dict(model, adapter)  # the added extra modules keep their own weights
        set_adapter_state_dict(model, {**{k: v for k, v in current.items() if k not in tensors}, **tensors}, adapter)
    except BaseException:
        unload(model, adapter)
        raise
    return names


@contextlib.contextmanager
def peft_deprecation_quiet():
    """Around PEFT's own model wrapping (``PeftModel.from_pretrained``, ``get_peft_model``): PEFT 0.21 reads the
    model's ``is_gradient_checkpointing``, an alias transformers 5 deprecates with a FutureWarning at every read.
    The warning is about PEFT's code, not the caller's; this hides that one warning and no other."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
