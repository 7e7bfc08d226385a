"""dorafit.norm_cache: the memo behind DoRA's norms, and compile_model (in place, names unchanged)."""

from __future__ import annotations

import copy

import pytest
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


def _dense(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The adapted layer's textbook output from its current tensors (float64): W' = W0 + s B A (VeRA:
    diag(lambda_b) B diag(lambda_d) A), scaled row-wise by m / ||W'|| for DoRA, plus the bias."""
    st = layer.dorafit
    w = layer.weight.double()
    if st.update == "lora":
        w = w + st.scale * layer.lora_B.double() @ layer.lora_A.double()
    elif st.update == "vera":
        p = layer.vera_lambda_b.double()[:, None] * layer.vera_B.double() * layer.vera_lambda_d.double()[None]
        w = w + p @ layer.vera_A.double()
    if st.decomposed:
        w = layer.magnitude.double()[:, None] * w / w.norm(dim=1, keepdim=True)
    return x.double() @ w.T + layer.bias.double()


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "dvora", "magnitude"])
def test_eval_forward_reuses_its_terms_until_a_tensor_is_written(method):
    """Eval mode without grad caches (P, Q, m / n): the output is the dense formula's, equal to the uncached
    eval forward with grad, and an in-place write to any tensor they come from is seen by the next forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    only = {"magnitude_only": ["0"]} if method == "magnitude" else {}
    dorafit.apply(model, dorafit.AdapterConfig(method="dora" if only else method, r=2, alpha=6, targets=["0"], **only))
    layer = model[0]
    with torch.no_grad():
        for t in layer.parameters():
            if t.requires_grad:
                t.add_(0.3 * torch.randn_like(t))
    model.eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    trainable = [t for t in layer.parameters() if t.requires_grad] + [layer.weight]
    for step in range(len(trainable) + 1):
        with torch.no_grad():
            y = model(x)
            assert "inference" in layer.dorafit.caches._entries
            torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # from the cache
        torch.testing.assert_close(y, _dense(layer, x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)  # with grad: not the inference terms
        if step < len(trainable):
            with torch.no_grad():
                trainable[step].mul_(1.5)  # in place: bumps the version counter


def test_inference_terms_are_not_used_in_training_or_with_grad():
    model = _dora()
    with torch.no_grad():
        model(torch.randn(2, 8))  # training mode
    assert "inference" not in model[0].dorafit.caches._entries
    model.eval()
    model(torch.randn(2, 8)).sum().backward()  # eval mode with grad: the magnitude still gets its gradient
    assert "inference" not in model[0].dorafit.caches._entries and model[0].magnitude.grad is not None
