"""Every method on every layer family, in float64, against the dense textbook formula (METHOD.md)."""

from __future__ import annotations

import copy

import pytest
import torch

import dorafit
from dorafit.magnitude_scale import magnitude_scale

from .conftest import Wrapper, make_config, reference_weight


def test_step_zero_equals_base(layer_case, method):
    torch.manual_seed(0)
    base = Wrapper(layer_case.make()).double()
    model = copy.deepcopy(base)
    dorafit.apply(model, make_config(method))
    x = layer_case.make_input(torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-14)


def test_output_and_gradients_match_dense_formula(adapted, method):
    case, base, model, x = adapted
    layer = model.layer
    detach = layer.dorafit.detach_norm
    y = model(x)
    w0 = layer.dorafit.ops.weight_matrix(layer).detach()
    y_ref = case.functional(layer, x, case.to_native(layer, reference_weight(layer, w0, detach)))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)

    params = [p for p in layer.parameters() if p.requires_grad]
    assert params, "the adapter must have trainable tensors"
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad((y * upstream).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), params)
    for p, g, g_ref in zip(params, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_detached_and_full_norm_gradients_differ_only_in_direction():
    """detach_norm changes A/B gradients (paper eq. 6 vs its approximation) but not m's (eq. 7)."""
    grads = {}
    for detach in (True, False):
        torch.manual_seed(0)
        model = Wrapper(torch.nn.Linear(6, 4)).double()
        dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, alpha=3, targets=["layer"], detach_norm=detach))
        from .conftest import randomize_adapter

        randomize_adapter(model)
        x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        model(x).pow(2).sum().backward()
        grads[detach] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(grads[True]["layer.magnitude"], grads[False]["layer.magnitude"])
    assert not torch.allclose(grads[True]["layer.lora_B"], grads[False]["layer.lora_B"])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_magnitude_scale_gradcheck(with_bias, channel_dim):
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    out = pre.shape[channel_dim]
    m = (torch.rand(out, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    n = (torch.rand(out, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(out, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    inputs = (pre, m, n, b) if with_bias else (pre, m, n)

    def fn(*args):
        return magnitude_scale(args[0], args[1], args[2], args[3] if with_bias else None, channel_dim)

    assert torch.autograd.gradcheck(fn, inputs)


def test_merged_equals_unmerged_equals_unloaded(adapted):
    case, base, model, x = adapted
    model.eval()
    y = model(x)
    dorafit.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    dorafit.unmerge(model)
    torch.testing.assert_close(model.layer.weight, base.layer.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)
    plain = dorafit.merge_and_unload(model)
    assert type(plain.layer) is type(base.layer)
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(plain(x), y, rtol=1e-10, atol=1e-12)


def test_disabled_equals_base_even_when_merged(adapted):
    case, base, model, x = adapted
    y = model(x)
    with dorafit.disabled(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), y)
    dorafit.merge(model)
    with dorafit.disabled(model):
        torch.testing.assert_close(model(x), base(x), rtol=1e-10, atol=1e-12)
    assert model.layer.dorafit.merged
    torch.testing.assert_close(model(x), y, rtol=1e-10, atol=1e-12)


def test_unload_restores_base_model(adapted):
    case, base, model, x = adapted
    dorafit.merge(model)
    plain = dorafit.unload(model)
    assert type(plain.layer) is type(base.layer)
    torch.testing.assert_close(plain(x), base(x), rtol=1e-10, atol=1e-12)
    assert all(p.requires_grad for p in plain.parameters())


def test_state_dict_keeps_base_keys(adapted, method):
    case, base, model, x = adapted
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys
    extra = keys - set(base.state_dict())
    expected = {
        "lora": {"layer.lora_A", "layer.lora_B"},
        "rslora": {"layer.lora_A", "layer.lora_B"},
        "dora": {"layer.lora_A", "layer.lora_B", "layer.magnitude"},
        "dora_full_grad": {"layer.lora_A", "layer.lora_B", "layer.magnitude"},
        "vera": {"layer.vera_lambda_d", "layer.vera_lambda_b"},
        "dvora": {"layer.vera_lambda_d", "layer.vera_lambda_b", "layer.magnitude"},
        "magnitude_only": {"layer.magnitude"},
        "dora_recompute": {"layer.lora_A", "layer.lora_B", "layer.magnitude"},
        "dvora_full_grad_recompute": {"layer.vera_lambda_d", "layer.vera_lambda_b", "layer.magnitude"},
        "magnitude_only_recompute": {"layer.magnitude"},
    }[method]
    assert extra == expected
    assert set(dorafit.adapter_state_dict(model)) == expected


def test_dropout_applies_to_adapter_input_only():
    """Documented semantics: y = (m/n) * (W0 x + dW dropout(x)) + b."""
    torch.manual_seed(0)
    model = Wrapper(torch.nn.Linear(8, 6)).double()
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, alpha=3, targets=["layer"], dropout=0.5))
    from .conftest import randomize_adapter

    randomize_adapter(model)
    layer = model.layer
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.manual_seed(123)
    y = model(x)
    torch.manual_seed(123)
    x_drop = torch.nn.functional.dropout(x, 0.5, True)
    w0 = layer.weight.detach()
    dw = layer.dorafit.scale * layer.lora_B @ layer.lora_A
    n = torch.linalg.norm(w0 + dw, dim=1)
    y_ref = (layer.magnitude / n) * (x @ w0.T + x_drop @ dw.T) + layer.bias
    torch.testing.assert_close(y, y_ref)
    model.eval()
    torch.testing.assert_close(model(x), (layer.magnitude / n) * (x @ (w0 + dw).T) + layer.bias)


def test_low_precision_keeps_float32_magnitude_and_norm():
    torch.manual_seed(0)
    model = Wrapper(torch.nn.Linear(16, 8)).to(torch.bfloat16)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, targets=["layer"]))
    assert model.layer.magnitude.dtype == torch.float32
    assert model.layer.lora_A.dtype == torch.bfloat16
    assert model.layer.weight_norm().dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model.layer.magnitude.grad.dtype == torch.float32
