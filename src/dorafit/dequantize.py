"""Leaving a quantized base: plain float ``nn.Linear`` layers in place of quantized ones.

An adapter is never merged into a quantized weight (:func:`dorafit.adapted.quantized_merge_refusal`). Instead
:func:`dorafit.merge_and_unload` replaces each adapted quantized layer by a float layer whose weight is

    W' = W0 + P Q   (LoRA, VeRA)     or     W' = (m / n) * (W0 + P Q)   (DoRA, DVoRA, magnitude-only)

computed in float32 from the dequantized W0 (:func:`merged_float_layer`), and every other quantized layer by
its dequantized W0 (:func:`dequantize`), so the result is a float model that computes what the adapted
quantized model computes (up to the layers' compute-dtype rounding) and saves with plain ``save_pretrained``.
These are the only places dorafit builds a dense [out, in] weight of a quantized layer: the float model needs it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as Fn
from .adapted import is_adapted
from .layers import ops_for


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``model`` by ``module``."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


@torch.no_grad()
def merged_float_layer(layer: nn.Module, holder, dtype: torch.dtype | None = None) -> nn.Linear:
    """A float ``nn.Linear`` computing what the adapted quantized ``layer`` computes with ``holder``'s adapter
    (dropout off): the merge in float32 from the dequantized W0, stored in ``dtype`` (default: the dtype the
    weight was quantized from)."""
    ops, st = layer.dorafit.ops, holder.dorafit
    p, q = layer.factors(holder)
    magnitude = holder.magnitude if st.decomposed else None
    norm = layer.weight_norm(p, q, holder) if st.decomposed else None
    weight = Fn.merged_weight(ops.dequantized_weight(layer), p, q, magnitude, norm)
    return ops.float_linear(layer, weight, dtype)


def _drop_quantization_marks(model: nn.Module) -> None:
    """What transformers records on a model it loaded quantized: a dequantized model saves as a float one."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized layer of ``model`` (bitsandbytes 4-bit and 8-bit, torchao NF4) by a plain float
    ``nn.Linear`` with its dequantized weight and its bias, in place; returns the model. ``dtype``: of the new
    weights (default: each layer's dtype before quantization). Layers that carry adapters are refused: merge
    them with :func:`dorafit.merge_and_unload`, or take the adapters off with :func:`dorafit.unload` first."""
    found = [(name, module, ops_for(module)) for name, module in model.named_modules() if name]
    quantized = [(name, module, ops) for name, module, ops in found if ops is not None and ops.quantized]
    adapted = [name for name, module, _ in quantized if is_adapted(module)]
    if adapted:
        raise ValueError(f"module {adapted[0]!r} carries an adapter; dorafit.merge_and_unload(model) merges it into "
                         "a float layer (or dorafit.unload(model) removes it) before dequantizing")
    for name, module, ops in quantized:
        ops.prepare(module)  # the library's canonical layout (see Bnb4bitOps.prepare), whatever ran before
        set_submodule(model, name, ops.float_linear(module, dtype=dtype))
    if quantized:
        _drop_quantization_marks(model)
    return model
