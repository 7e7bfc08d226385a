"""Quantized linear layers built directly with bitsandbytes and torchao, and their dequantized weights read with
the libraries' own functions (independently of dorafit), for the QDoRA tests."""

from __future__ import annotations

import copy
import logging
import math
import types
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Kind:
    name: str
    library: str  # "bnb4", "bnb8" or "torchao"
    quant_type: str = "nf4"
    double: bool = False
    compute: torch.dtype = torch.float32  # the dtype the frozen product runs in
    in_features: int = 256

    @property
    def tol(self) -> float:
        """Relative tolerance against float64 on the dequantized weight: a few roundings of the compute dtype."""
        return 2e-5 if self.compute == torch.float32 else 1e-2


KINDS = {
    k.name: k
    for k in (
        Kind("bnb-nf4", "bnb4", "nf4", double=True),
        Kind("bnb-nf4-bf16", "bnb4", "nf4", double=False, compute=torch.bfloat16),
        Kind("bnb-fp4", "bnb4", "fp4", double=False),
        Kind("bnb-fp4-double-unaligned", "bnb4", "fp4", double=True, in_features=200),  # 200 is no multiple of 64
        Kind("bnb-int8", "bnb8"),
        Kind("torchao-nf4", "torchao"),
    )
}


def quantize(linear: nn.Linear, kind: Kind) -> nn.Module:
    """A quantized copy of ``linear`` (float32) as ``kind`` says, on the CPU."""
    linear = copy.deepcopy(linear)
    has_bias = linear.bias is not None
    if kind.library == "bnb4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=kind.compute,
                                  quant_type=kind.quant_type, compress_statistics=kind.double)
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu").requires_grad_(False)
    if kind.library == "bnb8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu").requires_grad_(False)
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    linear.weight = nn.Parameter(nf4.to_nf4(linear.weight.detach()), requires_grad=False)
    return linear.requires_grad_(False)


def dequantized(layer: nn.Module, kind: Kind) -> torch.Tensor:
    """W0 [out, in] in float64, by the quantization library's own dequantization."""
    if kind.library == "bnb4":
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    if kind.library == "bnb8":
        cb = layer.state.CB if layer.state.CB is not None else layer.weight.data
        scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
        return cb.double() * scb.double().unsqueeze(1) / 127.0
    return layer.weight.get_original_weight().double()


def make_layer(kind: Kind, out_features: int = 128, seed: int = 0, in_features: int | None = None
               ) -> tuple[nn.Linear, nn.Module]:
    """(float32 nn.Linear, its quantized copy)."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features or kind.in_features, out_features)
    return linear, quantize(linear, kind)


class Holder(nn.Module):
    """A one-layer model (dorafit adapts named children)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def dequantize_4bit_reference(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                              shape, dtype: torch.dtype, avx512: bool = False) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization in plain torch: element (r, c) of an [m, n] weight is
    ``code_table[nibble] * absmax[(r n + c) // blocksize]`` (the flat block that quantized it; the scalar CPU
    kernel and CUDA). With ``avx512``, as bitsandbytes' AVX512 CPU kernel computes it (csrc/cpu_ops.cpp,
    ``dequantizeBlockwise4bitCpu``, taken when ``n % 16 == 0``): the scale index is
    ``r * (n // blocksize) + c // blocksize``, which is the flat block only when ``n % blocksize == 0``."""
    from bitsandbytes.backends.utils import _get_4bit_code

    m, n = math.prod(shape[:-1]), shape[-1]
    raw = codes.view(torch.uint8).reshape(-1)
    nibbles = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1)[: m * n].long()
    values = _get_4bit_code(quant_type, raw.device)[nibbles].view(m, n)
    r, c = torch.arange(m).unsqueeze(1), torch.arange(n)
    index = r * (n // blocksize) + c // blocksize if avx512 and n % 16 == 0 else (r * n + c) // blocksize
    return (values * absmax.float()[index]).reshape(shape).to(dtype)


def emulate_avx512_dequantize(monkeypatch) -> None:
    """Make every ``torch.ops.bitsandbytes.dequantize_4bit`` call (the library's products and dorafit's) compute
    what it computes on an AVX512 CPU, on any CPU."""
    def avx512(codes, absmax, blocksize, quant_type, shape, dtype):
        return dequantize_4bit_reference(codes, absmax, blocksize, quant_type, shape, dtype, avx512=True)

    monkeypatch.setattr(torch.ops.bitsandbytes, "dequantize_4bit", types.SimpleNamespace(default=avx512))
