"""Quantized linear layers built directly with bitsandbytes and torchao, and their dequantized weights read with
the libraries' own functions (independently of dorafit), for the QDoRA tests."""

from __future__ import annotations

import copy
import logging
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
