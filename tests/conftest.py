"""Shared fixtures: one small case per layer family, every method, and a dense textbook reference."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: no test reaches the network

import copy  # noqa: E402
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import dorafit


@dataclass
class LayerCase:
    name: str
    make: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    # textbook: to_native turns W [out, in] into the layer's layout; functional is its forward with that weight
    to_native: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    functional: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear_input(g):
    return torch.randn(2, 3, 7, generator=g, dtype=torch.float64)


LAYER_CASES = {
    "linear": LayerCase(
        "linear",
        lambda: nn.Linear(7, 5),
        _linear_input,
        lambda m, w: w,
        lambda m, x, w: F.linear(x, w, m.bias),
    ),
    "conv1d": LayerCase(
        "conv1d",
        lambda: nn.Conv1d(4, 6, 3, padding=1),
        lambda g: torch.randn(2, 4, 9, generator=g, dtype=torch.float64),
        lambda m, w: w.reshape(m.weight.shape),
        lambda m, x, w: F.conv1d(x, w, m.bias, m.stride, m.padding, m.dilation),
    ),
    "conv2d": LayerCase(
        "conv2d",
        lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2),
        lambda g: torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64),
        lambda m, w: w.reshape(m.weight.shape),
        lambda m, x, w: F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation),
    ),
    "embedding": LayerCase(
        "embedding",
        lambda: nn.Embedding(11, 6, padding_idx=0),
        lambda g: torch.randint(0, 11, (2, 5), generator=g),
        lambda m, w: w.T,
        lambda m, x, w: F.embedding(x, w, m.padding_idx),
    ),
    "gpt2_conv1d": LayerCase(
        "gpt2_conv1d",
        lambda: Conv1D(5, 7),  # nf=out=5, nx=in=7, weight [in, out]
        _linear_input,
        lambda m, w: w.T,
        lambda m, x, w: x @ w + m.bias,
    ),
}

# method name -> AdapterConfig keyword arguments (targets filled in by the fixture)
METHOD_CASES = {
    "lora": dict(method="lora", r=2, alpha=5.0),
    "rslora": dict(method="lora", r=2, alpha=5.0, rslora=True),
    "dora": dict(method="dora", r=2, alpha=5.0),
    "dora_full_grad": dict(method="dora", r=2, alpha=5.0, detach_norm=False),
    "vera": dict(method="vera", r=3),
    "dvora": dict(method="dvora", r=3, detach_norm=False),
    "magnitude_only": dict(method="dora", r=2, alpha=5.0, targets=[], magnitude_only=["layer"]),
    # magnitude_grad="recompute": backward recomputes pre instead of keeping the layer output
    "dora_recompute": dict(method="dora", r=2, alpha=5.0, magnitude_grad="recompute"),
    "dvora_full_grad_recompute": dict(method="dvora", r=3, detach_norm=False, magnitude_grad="recompute"),
    "magnitude_only_recompute": dict(method="dora", r=2, alpha=5.0, targets=[], magnitude_only=["layer"],
                                     magnitude_grad="recompute"),
}


class Wrapper(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def make_config(method: str) -> dorafit.AdapterConfig:
    kw = dict(METHOD_CASES[method])
    kw.setdefault("targets", ["layer"])
    return dorafit.AdapterConfig(**kw)


def randomize_adapter(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B, magnitudes away from ||W0||, VeRA vectors away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dorafit.adapted_modules(model):
            for name in ("lora_A", "lora_B", "vera_lambda_d", "vera_lambda_b"):
                if hasattr(layer, name):
                    p = getattr(layer, name)
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
            if hasattr(layer, "magnitude"):
                m = layer.magnitude
                m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g, dtype=m.dtype))


def reference_weight(layer: nn.Module, w0: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """Dense textbook W' [out, in] from the layer's adapter tensors (METHOD.md), differentiable."""
    st = layer.dorafit
    v = w0
    if st.update == "lora":
        v = w0 + st.scale * (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1))
    elif st.update == "vera":
        v = w0 + layer.vera_lambda_b[:, None] * (layer.vera_B @ (layer.vera_lambda_d[:, None] * layer.vera_A))
    if not st.decomposed:
        return v
    n = torch.linalg.norm(v, dim=1)
    if detach_norm:
        n = n.detach()
    return (layer.magnitude / n)[:, None] * v


@pytest.fixture(params=list(LAYER_CASES))
def layer_case(request) -> LayerCase:
    return LAYER_CASES[request.param]


@pytest.fixture(params=list(METHOD_CASES))
def method(request) -> str:
    return request.param


@pytest.fixture
def adapted(layer_case, method):
    """(case, base model, adapted model with randomized adapter, input) in float64."""
    torch.manual_seed(0)
    base = Wrapper(layer_case.make()).double()
    if hasattr(base.layer, "bias") and base.layer.bias is not None:
        with torch.no_grad():
            base.layer.bias.normal_()
    model = copy.deepcopy(base)
    dorafit.apply(model, make_config(method))
    randomize_adapter(model)
    x = layer_case.make_input(torch.Generator().manual_seed(2))
    return layer_case, base, model, x


#: CPU features whose kernels give different numbers (bitsandbytes' AVX512 4-bit dequantization, its AVX512-BF16
#: repacking, oneDNN's AMX paths), named in the session header so a failure report says which ran
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Which of :data:`CPU_FEATURES` the first CPU's ``flags`` line lists (empty where there is no such file)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for name in CPU_FEATURES if name in flags]


def cpu_line() -> str:
    return (f"cpu: {', '.join(cpu_features()) or 'none of ' + ', '.join(CPU_FEATURES)}; "
            f"torch's CPU capability: {torch.backends.cpu.get_cpu_capability()}")


def pytest_report_header(config) -> str:
    return cpu_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The same line at the end, where the project's quiet default (``-q``) leaves out the header."""
    if config.get_verbosity() < 0:
        terminalreporter.write_line(cpu_line())
