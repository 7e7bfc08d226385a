"""Layer families that can carry an adapter; :func:`ops_for` picks the one for a module from :data:`REGISTRY`.

A family is chosen by the module's type and its weight's type, first match wins, so quantized layers (whose
classes often subclass ``nn.Linear``) come before the float ones. A quantization library's types are named as
strings and looked up only if that library is already imported: a layer of it cannot exist otherwise, and
dorafit never imports bitsandbytes or torchao itself to find out. Adding a library is one small file of
:class:`~dorafit.layers.quantized.QuantizedLinearOps` and one line here.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from torch import Tensor, nn

from .base import LayerOps
from .bnb import Bnb4bitOps, Bnb8bitOps
from .conv import ConvOps
from .embedding import EmbeddingOps
from .linear import GPT2Conv1DOps, LinearOps
from .torchao_nf4 import TorchaoNF4Ops

SUPPORTED_TYPES = ("nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, transformers' Conv1D, bitsandbytes' "
                   "Linear4bit (nf4, fp4) and Linear8bitLt, nn.Linear with a torchao NF4 weight")
QUANTIZED_TYPES = "bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt, torchao NF4 weights"


@dataclass(frozen=True)
class Family:
    """``ops`` serves modules of ``module_type`` whose weight is a ``weight_type`` (None: any plain tensor).
    Types are classes or ``"package.module:Name"`` strings, looked up only once that package is imported."""

    module_type: type | str
    weight_type: type | str | None
    ops: type[LayerOps]


REGISTRY: tuple[Family, ...] = (
    Family("bitsandbytes.nn.modules:Linear4bit", "bitsandbytes.nn.modules:Params4bit", Bnb4bitOps),
    Family("bitsandbytes.nn.modules:Linear8bitLt", "bitsandbytes.nn.modules:Int8Params", Bnb8bitOps),
    Family(nn.Linear, "torchao.quantization.quantize_.workflows.nf4.nf4_tensor:NF4Tensor", TorchaoNF4Ops),
    Family(nn.Linear, None, LinearOps),
    Family((nn.Conv1d, nn.Conv2d, nn.Conv3d), None, ConvOps),
    Family(nn.Embedding, None, EmbeddingOps),
    Family("transformers.pytorch_utils:Conv1D", None, GPT2Conv1DOps),
)


def _resolve(spec):
    """A class (or tuple) as given, the class a string names if its package is imported, else None."""
    if not isinstance(spec, str):
        return spec
    module_name, _, name = spec.partition(":")
    if module_name.split(".")[0] not in sys.modules:
        return None
    try:
        module = __import__(module_name, fromlist=[name])
    except ImportError:
        return None
    return getattr(module, name, None)


def _plain(weight: Tensor) -> bool:
    """A weight stored as float values (not integer codes, not a quantization library's tensor subclass)."""
    return weight.is_floating_point() and not type(weight).__module__.startswith(_QUANTIZING_PACKAGES)


_QUANTIZING_PACKAGES = ("torchao.", "bitsandbytes.")


class UnsupportedWeightOps(LayerOps):
    """A layer of a known type whose weight is a tensor subclass no family reads (another quantization)."""

    def check(self, module: nn.Module) -> None:
        kind = type(module.weight)
        raise ValueError(f"its weight is a {kind.__module__}.{kind.__name__}, a quantized (or wrapped) tensor dorafit "
                         f"cannot read; supported quantized layers: {QUANTIZED_TYPES}. Dequantize this layer, or "
                         "quantize the model with one of those")

    def shape(self, module: nn.Module) -> tuple[int, int]:
        return int(module.weight.shape[0]), int(math.prod(module.weight.shape[1:]))


def ops_for(module: nn.Module) -> LayerOps | None:
    """The :class:`LayerOps` for ``module``, or None if its type cannot carry an adapter."""
    weight = getattr(module, "weight", None)
    for family in REGISTRY:
        module_type = _resolve(family.module_type)
        if module_type is None or not isinstance(module, module_type):
            continue
        if family.weight_type is None:
            return family.ops() if weight is None or _plain(weight) else UnsupportedWeightOps()
        weight_type = _resolve(family.weight_type)
        if weight_type is not None and isinstance(weight, weight_type):
            return family.ops()
    return None


__all__ = ["Family", "LayerOps", "ops_for", "REGISTRY", "SUPPORTED_TYPES", "QUANTIZED_TYPES"]


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' GPT-2-style ``Conv1D`` (without importing transformers)."""
    conv1d = _resolve("transformers.pytorch_utils:Conv1D")
    return conv1d is not None and isinstance(module, conv1d)
