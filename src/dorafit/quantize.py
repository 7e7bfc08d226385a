"""Quantize a float model's frozen linear layers with bitsandbytes, for LoRA / DoRA on a quantized base.

    dorafit.quantize.quantize_model(model, "nf4")    # every nn.Linear but the output layer and the named skips
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", targets=[...]))

Kinds: ``nf4`` and ``fp4`` (``bnb.nn.Linear4bit``, blocks of 64, double quantization of the block scales, as
QLoRA), ``int8`` (``bnb.nn.Linear8bitLt``, LLM.int8 with transformers' default outlier threshold 6.0). The 4-bit
compute dtype is the layer's own dtype unless given. Layers are quantized where their weight is (CPU or GPU),
one at a time, so a model never needs more than its float size plus one layer. Not quantized: the model's output
layer (often tied to the input embeddings), layers named in ``skip`` (names or name suffixes, as adapter targets, and
everything under them: e.g. a classification head that trains in full) and any layer whose weight another
module shares.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util

import torch
from torch import nn

KINDS = ("nf4", "fp4", "int8")
INSTALL = "pip install 'dorafit[quant]' (bitsandbytes)"


def require_bitsandbytes(what: str = "quantization") -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{what} needs the bitsandbytes package; install it with: {INSTALL}")


@torch.no_grad()
def quantized_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized as ``kind`` (and its bias as it is), frozen."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    require_bitsandbytes()
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    device, dtype = linear.weight.device, linear.weight.dtype
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype or dtype, compress_statistics=True, quant_type=kind)
        # keep the canonical layout: on an AVX512-BF16 CPU the library would repack the weight in place at the
        # first eval forward, after which its rows no longer dequantize block by block
        layer.support_avx512bf16_for_cpu = False
    layer.weight.data = linear.weight.data.to("cpu")  # quantized by the move below (into new tensors)
    layer.dorafit_float_dtype = dtype  # what dequantizing gives back (the int8 layer does not record it)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to(device)
    layer.requires_grad_(False)
    return layer.train(linear.training)


def _return_freed_memory() -> None:
    """Hand the replaced float weights back to the system: glibc keeps freed heap memory for reuse otherwise,
    and the process would stay as large as the float model."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, count in seen.items() if count > 1}


def quantizable_layers(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The names of the layers :func:`quantize_model` quantizes: plain ``nn.Linear`` layers but the output layer,
    those whose weight another module shares, and those named in ``skip`` (and everything under them)."""
    from .inject import find_modules

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shared = _shared_weights(model)
    skipped = tuple(find_modules(model, list(skip), "skip")) if skip else ()  # names or name suffixes, as targets
    return [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not output and id(module.weight) not in shared
        and not any(name == s or name.startswith(s + ".") for s in skipped)
    ]


def quantize_model(model: nn.Module, kind: str, skip: list[str] | tuple[str, ...] = (),
                   compute_dtype: torch.dtype | None = None) -> list[str]:
    """Replace the model's frozen ``nn.Linear`` layers by bitsandbytes layers of ``kind``, in place (see the module
    docstring for which); returns the names of the replaced layers."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    require_bitsandbytes()
    from .dequantize import set_submodule

    names = quantizable_layers(model, skip)
    for name in names:
        set_submodule(model, name, quantized_linear(model.get_submodule(name), kind, compute_dtype))
    _return_freed_memory()
    if names:  # as transformers marks a model it loads quantized: PEFT then wraps the layers with its bnb layers
        setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return names
