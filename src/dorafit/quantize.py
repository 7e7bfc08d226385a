"""Quantize a float model's frozen linear layers with bitsandbytes, for LoRA / DoRA on a quantized base.

    dorafit.quantize.quantize_model(model, "nf4")    # every nn.Linear but the output layer and the named skips
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", targets=[...]))

Kinds: ``nf4`` and ``fp4`` (``bnb.nn.Linear4bit``, blocks of 64, double quantization of the block scales, as
QLoRA; blocks of 32 for a layer whose input width is a multiple of 32 but not of 64, see :func:`blocksize_for`),
``int8`` (``bnb.nn.Linear8bitLt``, LLM.int8 with transformers' default outlier threshold 6.0). The 4-bit
compute dtype is the layer's own dtype unless given. Layers are quantized where their weight is (CPU or GPU),
one at a time, so a model never needs more than its float size plus one layer. Not quantized: the model's output
layer (often tied to the input embeddings), layers named in ``skip`` (names or name suffixes, as adapter targets, and
everything under them: e.g. a classification head that trains in full) and any layer whose weight another
module shares, and, for the 4-bit kinds, a layer whose input width is no multiple of 32 (left in float, with a
warning naming it).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING

from .memory import return_freed_memory

if TYPE_CHECKING:  # torch is imported where it is used: the command line imports this module for KINDS
    import torch
    from torch import nn

KINDS = ("nf4", "fp4", "int8")
INSTALL = "pip install 'dorafit[quant]' (bitsandbytes)"
#: the 4-bit block sizes tried, in order: QLoRA's 64, then bitsandbytes' smallest
BLOCKSIZES = (64, 32)


def blocksize_for(in_features: int) -> int | None:
    """The block size of a 4-bit layer with ``in_features`` inputs: the first of :data:`BLOCKSIZES` dividing it,
    else None (the layer is not quantized).

    A block must never span two rows: bitsandbytes' AVX512 CPU kernel reads row ``r``'s scale for column ``c`` at
    ``r * (in // blocksize) + c // blocksize`` rather than at the block ``(r * in + c) // blocksize`` that quantized
    it, so with ``in % blocksize != 0`` an AVX512 CPU would dequantize (and train on) another W0 than other CPUs
    and CUDA do (docs/incoming/bnb-avx512-bug.md)."""
    return next((size for size in BLOCKSIZES if in_features % size == 0), None)


def require_bitsandbytes(what: str = "quantization") -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{what} needs the bitsandbytes package; install it with: {INSTALL}")


def quantized_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized as ``kind`` (and its bias as it is), frozen."""
    import torch

    with torch.no_grad():
        return _quantized_linear(linear, kind, compute_dtype)


def _quantized_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype | None) -> nn.Module:
    from torch import nn

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
        blocksize = blocksize_for(linear.in_features)
        if blocksize is None:
            raise ValueError(f"a {kind} layer needs an input width that is a multiple of {BLOCKSIZES[-1]}; this one "
                             f"has {linear.in_features} (leave it in float)")
        import torch

        with torch.device("meta"):  # no float32 weight of its own: it gets linear's, quantized by the move below
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                      compute_dtype=compute_dtype or dtype, compress_statistics=True, quant_type=kind)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, compress_statistics=True,
                                         quant_type=kind, blocksize=blocksize, module=layer)
        # keep the canonical layout: on an AVX512-BF16 CPU the library would repack the weight in place at the
        # first eval forward, after which its rows no longer dequantize block by block
        layer.support_avx512bf16_for_cpu = False
    if kind == "int8":
        layer.weight.data = linear.weight.data.to("cpu")  # quantized by the move below (into new tensors)
    layer.dorafit_float_dtype = dtype  # what dequantizing gives back (the int8 layer does not record it)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to(device)
    layer.requires_grad_(False)
    return layer.train(linear.training)


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
    from torch import nn

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
                   compute_dtype: torch.dtype | None = None, only: list[str] | None = None) -> list[str]:
    """Replace the model's frozen ``nn.Linear`` layers by bitsandbytes layers of ``kind``, in place (see the module
    docstring for which; ``only``: of those, just these names); returns the names of the replaced layers."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    require_bitsandbytes()
    from .dequantize import set_submodule

    names = quantizable_layers(model, skip)
    if only is not None:
        names = [name for name in names if name in set(only)]
    if kind != "int8":
        unfit = [name for name in names if blocksize_for(model.get_submodule(name).in_features) is None]
        if unfit:
            warnings.warn(f"{len(unfit)} linear layer(s) left in float ({', '.join(unfit[:3])}"
                          f"{', ...' if len(unfit) > 3 else ''}): {kind} needs an input width that is a multiple of "
                          f"{BLOCKSIZES[-1]}, so that every CPU reads the block scales alike", stacklevel=2)
            names = [name for name in names if name not in unfit]
    for name in names:
        set_submodule(model, name, quantized_linear(model.get_submodule(name), kind, compute_dtype))
    return_freed_memory()  # the replaced float weights
    if names:  # as transformers marks a model it loads quantized: PEFT then wraps the layers with its bnb layers
        setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return names
