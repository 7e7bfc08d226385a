"""The input gradient of frozen bfloat16 and 4-bit layers on a CPU without bfloat16 instructions
(:mod:`dorafit.layers.frozen`): the path is taken inside ``FrozenInputGrads`` only, its gradients equal torch's own
(to bfloat16 rounding) and a float64 reference, and it never makes a float32 copy of a whole weight.

The CPU's flags are not asked: every test declares bfloat16 slow, so the path runs on any CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dorafit
from dorafit.layers import frozen
from dorafit.layers.frozen import FrozenInputGrads

from .quant_support import KINDS, Holder, make_layer

OUT, IN, TOKENS = 192, 128, 6


@pytest.fixture(autouse=True)
def slow_bfloat16(monkeypatch):
    monkeypatch.setattr(frozen, "slow_on_cpu", lambda dtype: dtype in frozen.NATIVE_FLAGS)


def plain_layer() -> nn.Module:
    torch.manual_seed(0)
    return Holder(nn.Linear(IN, OUT).to(torch.bfloat16).requires_grad_(False))


def nf4_layer() -> nn.Module:
    pytest.importorskip("bitsandbytes")
    _, layer = make_layer(KINDS["bnb-nf4-bf16"], out_features=OUT, in_features=IN)
    return Holder(layer.requires_grad_(False))


def adapted(model: nn.Module) -> nn.Module:
    model.dorafit_adapter_dtype = torch.float32
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", targets=["layer"], r=4))
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad and p.dim() == 2:
            nn.init.normal_(p, std=0.05)
    return model


def gradients(model: nn.Module, x: torch.Tensor, fast: bool):
    """(output, x's gradient, the trainable tensors' gradients, whether the rerouted product ran)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    context = FrozenInputGrads(model) if fast else torch.enable_grad()
    with context:
        y = model(x)
        y.float().pow(2).sum().backward()
    rerouted = "WithInputGrad" in type(y.grad_fn).__name__ or _graph_has(y.grad_fn, "WithInputGrad")
    return y.detach(), x.grad, [p.grad for p in model.parameters() if p.requires_grad], rerouted


def _graph_has(fn, name: str, seen=None) -> bool:
    seen = seen if seen is not None else set()
    if fn is None or fn in seen:
        return False
    seen.add(fn)
    return name in type(fn).__name__ or any(_graph_has(f, name, seen) for f, _ in fn.next_functions)


@pytest.mark.parametrize("make", [plain_layer, nf4_layer], ids=["bfloat16", "nf4-bfloat16"])
@pytest.mark.parametrize("adapter", [False, True], ids=["frozen", "dora"])
def test_input_gradient_equals_torchs_and_float64(make, adapter):
    model = adapted(make()) if adapter else make()
    torch.manual_seed(2)
    x = torch.randn(2, TOKENS // 2, IN).to(torch.bfloat16)
    y_fast, gx_fast, grads_fast, rerouted = gradients(model, x, fast=True)
    y_torch, gx_torch, grads_torch, torch_rerouted = gradients(model, x, fast=False)
    assert rerouted and not torch_rerouted
    assert torch.equal(y_fast, y_torch)  # the forward is torch's (or bitsandbytes') own
    for a, b in zip(grads_fast, grads_torch):  # the layer's own trainable tensors do not depend on x's gradient
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # x's gradient: g W0 with g = 2 y, in float64 from the same bfloat16 g, against both
    layer = model.layer
    ops = layer.dorafit.ops if adapter else dorafit.layers.ops_for(layer)
    w0 = ops.dequantized_weight(layer) if ops.quantized else layer.weight
    if not adapter:
        reference = (2 * y_torch.double()) @ w0.double()
        torch.testing.assert_close(gx_fast.double(), reference, rtol=2 ** -7, atol=1e-2 * reference.abs().max().item())
    torch.testing.assert_close(gx_fast.float(), gx_torch.float(), rtol=2 ** -6, atol=1e-2 * gx_torch.abs().max().item())


def test_off_outside_the_block_and_hooks_removed():
    model = plain_layer()
    x = torch.randn(TOKENS, IN, dtype=torch.bfloat16, requires_grad=True)
    assert "WithInputGrad" not in type(model(x).grad_fn).__name__
    with FrozenInputGrads(model) as block:
        assert block.layers == [model.layer] and len(model.layer._forward_hooks) == 1
        assert "WithInputGrad" in type(model(x).grad_fn).__name__
        with torch.no_grad():  # nothing to differentiate: torch's product
            assert model(x).grad_fn is None
    assert not model.layer._forward_hooks
    assert "WithInputGrad" not in type(model(x).grad_fn).__name__
    float32 = Holder(nn.Linear(IN, OUT).requires_grad_(False))
    assert FrozenInputGrads(float32).layers == []


class LargestFloat32(TorchDispatchMode):
    """The most elements of any float32 tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("make", [plain_layer, nf4_layer], ids=["bfloat16", "nf4-bfloat16"])
def test_backward_never_upcasts_a_whole_weight(make, monkeypatch):
    monkeypatch.setattr(frozen, "ROW_BLOCK_ELEMENTS", OUT * IN // 4)
    monkeypatch.setattr(dorafit.layers.quantized, "CHUNK_ELEMENTS", OUT * IN // 4)
    model = make()
    x = torch.randn(TOKENS, IN, dtype=torch.bfloat16, requires_grad=True)
    with FrozenInputGrads(model):
        y = model(x)
        watch = LargestFloat32()
        with watch:
            y.backward(torch.ones_like(y))
    assert x.grad is not None and 0 < watch.largest <= OUT * IN // 4
