"""AdapterConfig.magnitude_grad: 'save' keeps the layer output for dL/dm, 'recompute' recomputes pre in backward.

Exactness against the dense formula is in tests/test_exactness.py (the *_recompute METHOD_CASES); here: the
scale's own gradients, the bytes each mode keeps, low precision, nesting in activation checkpointing, and the
round trip through adapter_config.json.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import dorafit
from dorafit.bench.measure import SavedTensorCounter, model_storages
from dorafit.magnitude_scale import magnitude_scale

from .conftest import randomize_adapter


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_recomputing_scale_gradcheck(with_bias, channel_dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    out = x.shape[channel_dim]
    w = torch.randn(out, out, dtype=torch.float64, generator=g, requires_grad=True)
    m = (torch.rand(out, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    n = (torch.rand(out, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(out, dtype=torch.float64, generator=g, requires_grad=True)

    def pre_of(x, w):  # a linear map along channel_dim, so that pre is recomputable from (x, w)
        return torch.movedim(torch.movedim(x, channel_dim, -1) @ w.T, -1, channel_dim)

    def fn(x, w, m, n, b):
        return magnitude_scale(pre_of(x, w), m, n, b if with_bias else None, channel_dim, inplace=True,
                               recompute=pre_of, recompute_inputs=(x, w))

    assert torch.autograd.gradcheck(fn, (x, w, m, n, b))


class Block(nn.Module):
    """A residual block: nothing after ``proj`` keeps its output (as for LLaMA's down_proj)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        return x + self.proj(torch.tanh(x))


def _saved_bytes(config_kw: dict, compiled: bool) -> int:
    torch.manual_seed(0)
    model = Block()
    dorafit.apply(model, dorafit.AdapterConfig(r=4, targets=["proj"], **config_kw))
    x = torch.randn(64, 32, requires_grad=True)
    if compiled:
        torch._dynamo.reset()
        model = torch.compile(model, backend="aot_eager", fullgraph=True)
        model(x).sum().backward()
    with SavedTensorCounter(exclude=model_storages(model)) as counter:
        y = model(x)
    y.sum().backward()
    return counter.nbytes


@pytest.mark.parametrize("compiled", [False, True])
def test_recompute_keeps_what_lora_keeps_and_save_one_output_more(compiled):
    lora = _saved_bytes(dict(method="lora"), compiled)
    save = _saved_bytes(dict(method="dora"), compiled)
    recompute = _saved_bytes(dict(method="dora", magnitude_grad="recompute"), compiled)
    output = 64 * 32 * 4  # one [tokens, out] float32 tensor
    vectors = 4 * 32 * 4  # DoRA's per-unit vectors (m / n, n, ...): O(out)
    assert save >= lora + output
    assert recompute <= lora + vectors


def test_recompute_equals_save_bitwise_in_bfloat16_with_bias():
    grads = {}
    for mode in ("save", "recompute"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8)).to(torch.bfloat16)
        dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["0", "1"], magnitude_grad=mode))
        randomize_adapter(model)
        x = torch.randn(4, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
        model(x).float().pow(2).sum().backward()
        grads[mode] = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(grads["save"], grads["recompute"]):
        assert torch.equal(a, b)


def test_recompute_inside_activation_checkpointing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["0", "2"], magnitude_grad="recompute"))
    randomize_adapter(model)
    plain = copy.deepcopy(model)
    x = torch.randn(5, 8, dtype=torch.float64)
    checkpoint(model, x, use_reentrant=False).sum().backward()
    plain(x).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_magnitude_grad_round_trips_through_the_adapter_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["0"], magnitude_grad="recompute"))
    dorafit.save_adapter(model, tmp_path / "adapter")
    assert '"magnitude_grad": "recompute"' in (tmp_path / "adapter" / "adapter_config.json").read_text()
    fresh = nn.Sequential(nn.Linear(8, 8))
    dorafit.load_adapter(fresh, tmp_path / "adapter")
    assert dorafit.get_config(fresh).magnitude_grad == "recompute"
    assert fresh[0].dorafit.magnitude_grad == "recompute"


def test_unknown_magnitude_grad_is_refused():
    with pytest.raises(ValueError, match="magnitude_grad must be one of save, recompute, got 'keep'"):
        dorafit.AdapterConfig(magnitude_grad="keep")
