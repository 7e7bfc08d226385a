"""dorafit.norm_cache: the memo behind DoRA's norms, and compile_model (in place, names unchanged)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import dorafit


def _dora(**kw) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["0", "2"], **kw))
    return model


def test_norm_cached_under_inference_mode_can_be_saved_for_backward_later():
    model = _dora().eval()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = model(x)
    y = model(x)  # eval mode with grad: the cached norm is saved for backward
    y.sum().backward()
    torch.testing.assert_close(y, expected)
    assert model[0].magnitude.grad is not None


def test_a_copied_model_gets_its_own_empty_caches():
    model = _dora().eval()
    with torch.no_grad():
        model(torch.randn(2, 8))
    st = model[0].dorafit
    copied = copy.deepcopy(model)[0].dorafit
    assert copied.caches is not st.caches and copied.caches.id != st.caches.id
    assert int(copied.caches.handle) == copied.caches.id
    assert not copied.caches._entries and st.caches._entries


def test_compile_model_compiles_in_place_and_keeps_names(tmp_path):
    model = _dora()
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    torch._dynamo.reset()
    assert dorafit.compile_model(model, backend="aot_eager", fullgraph=True) is model
    x = torch.randn(5, 8)
    y = model(x)
    torch.testing.assert_close(y, eager(x))
    assert list(model.state_dict()) == keys
    dorafit.save_adapter(model, tmp_path / "adapter")
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    fresh.load_state_dict({k: v for k, v in eager.state_dict().items() if k in fresh.state_dict()})
    dorafit.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(x), y)
