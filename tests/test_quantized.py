"""LoRA, DoRA, VeRA, DVoRA and magnitude-only DoRA on quantized frozen layers (bitsandbytes 4-bit nf4/fp4 with
and without double quantization, float32 and bfloat16 compute, int8; torchao NF4), against the textbook formula
computed in float64 on the weight the quantization library dequantizes."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import dorafit
from dorafit.layers import ops_for
from dorafit.layers.bnb import Bnb4bitOps, Bnb8bitOps
from dorafit.layers.torchao_nf4 import TorchaoNF4Ops

from .quant_support import KINDS, Holder, dequantized, make_layer

METHODS = ["lora", "dora", "dora_full_norm", "vera", "dvora", "magnitude_only"]


def _config(method: str) -> dorafit.AdapterConfig:
    if method == "magnitude_only":
        return dorafit.AdapterConfig(method="dora", r=4, targets=[], magnitude_only=["layer"])
    if method == "dora_full_norm":
        return dorafit.AdapterConfig(method="dora", r=4, alpha=8, targets=["layer"], detach_norm=False)
    r = 16 if method in ("vera", "dvora") else 4
    return dorafit.AdapterConfig(method=method, r=r, alpha=8, targets=["layer"])


def _randomize(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "vera_lambda_d", "vera_lambda_b"):
            if hasattr(layer, name):
                p = getattr(layer, name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if hasattr(layer, "magnitude"):
            layer.magnitude.mul_(1 + 0.3 * torch.rand(layer.magnitude.shape, generator=g))


def _adapted(kind_name: str, method: str, seed: int = 0):
    kind = KINDS[kind_name]
    _, quantized = make_layer(kind, out_features=128, seed=seed)
    model = Holder(quantized)
    dorafit.apply(model, _config(method))
    _randomize(model.layer)
    return kind, model


def reference(layer: nn.Module, w0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y = (m / ||W0 + P Q||) (W0 + P Q) x + b`` (or without the scale) in float64, differentiable in the
    adapter tensors; W0 the library's dequantized weight."""
    st = layer.dorafit
    p, q = layer.factors()
    w = w0 if p is None else w0 + p.double() @ q.double()
    y = x.double() @ w.T
    if st.decomposed:
        n = torch.linalg.norm(w, dim=1)
        y = y * (layer.magnitude.double() / (n.detach() if st.detach_norm else n))
    return y if layer.bias is None else y + layer.bias.double()


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_forward_and_gradients_match_float64_on_the_dequantized_weight(kind_name, method):
    kind, model = _adapted(kind_name, method)
    layer = model.layer
    w0 = dequantized(layer, kind)
    x = torch.randn(2, 5, kind.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = model(x)  # training mode: the norm comes from the fused frozen product
    y_ref = reference(layer, w0, x)
    _close(y, y_ref, kind.tol)
    params = [p for p in layer.parameters() if p.requires_grad]
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((y * upstream).sum(), [x, *params])
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), [x, *params])
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, 4 * kind.tol)


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_eval_output_uses_exact_cached_norm(kind_name):
    """In eval mode n is computed block by block in float32 (exact) and cached; 4-bit and NF4 outputs equal the
    reference, int8's carry its inference path's activation rounding (LLM.int8), so its norm is checked alone."""
    kind, model = _adapted(kind_name, "dora")
    layer = model.layer
    w0 = dequantized(layer, kind)
    p, q = layer.factors()
    n_ref = torch.linalg.norm(w0 + p.double() @ q.double(), dim=1)
    model.eval()
    x = torch.randn(3, kind.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(layer.weight_norm().double(), n_ref, rtol=1e-5, atol=0)
    if kind.library != "bnb8":
        _close(y, reference(layer, w0, x), kind.tol)


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_squared_row_norms_equal_the_dequantized_weights_and_magnitude_is_float32(kind_name, monkeypatch):
    import dorafit.layers.quantized as Q

    monkeypatch.setattr(Q, "CHUNK_ELEMENTS", 3000)  # several blocks of rows, cut where the quantization allows
    kind, model = _adapted(kind_name, "dora")
    layer = model.layer
    w0 = dequantized(layer, kind)
    torch.testing.assert_close(layer.base_squared_norms().double(), w0.pow(2).sum(1), rtol=1e-6, atol=0)
    assert layer.magnitude.dtype == torch.float32
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        q = torch.randn(3, kind.in_features)
        w0_qt = layer.dorafit.ops.weight_times_factor(layer, q)
    torch.testing.assert_close(w0_qt.double(), w0 @ q.double().T, rtol=1e-5, atol=1e-5)


def test_chunked_weight_times_factor_gradient(monkeypatch):
    import dorafit.layers.quantized as Q

    monkeypatch.setattr(Q, "CHUNK_ELEMENTS", 3000)
    kind, model = _adapted("bnb-nf4", "dora")  # in = 256, a multiple of the block: read a block of rows at a time
    layer = model.layer
    assert len(list(layer.dorafit.ops.row_chunks(layer))) > 1
    w0 = dequantized(layer, kind)
    q = torch.randn(3, kind.in_features, requires_grad=True)
    g = torch.randn(128, 3)
    (grad,) = torch.autograd.grad((layer.dorafit.ops.weight_times_factor(layer, q) * g).sum(), q)
    torch.testing.assert_close(grad.double(), g.double().T @ w0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind_name", ["bnb-nf4", "bnb-int8", "torchao-nf4"])
def test_training_steps_reduce_the_loss(kind_name):
    kind, model = _adapted(kind_name, "dora")
    torch.manual_seed(0)
    x = torch.randn(32, kind.in_features)
    target = torch.randn(32, 128) * 0.1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert model.layer.magnitude.dtype == torch.float32


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_save_load_round_trip(kind_name, tmp_path):
    kind, model = _adapted(kind_name, "dora")
    model.eval()
    x = torch.randn(3, kind.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x)
    dorafit.save_adapter(model, tmp_path / "a")
    _, fresh = make_layer(kind, out_features=128, seed=0)
    other = Holder(fresh).eval()
    dorafit.load_adapter(other, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    meta = dorafit.read_adapter(tmp_path / "a")[0]
    assert meta["modules"]["layer"] == [128, kind.in_features]  # the layer's shape, not its packed storage's


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_merge_in_place_is_refused_and_changes_nothing(kind_name):
    kind, model = _adapted(kind_name, "dora")
    before = model.layer.weight.data.clone() if kind.library != "torchao" else model.layer.weight.quantized_data.clone()
    with pytest.raises(ValueError, match="merge_and_unload") as info:
        dorafit.merge(model)
    assert "re-quantized" in str(info.value) and "'layer'" in str(info.value)
    after = model.layer.weight.data if kind.library != "torchao" else model.layer.weight.quantized_data
    assert torch.equal(before, after)
    assert not model.layer.dorafit.merged


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_dequantized_merge_equals_the_unmerged_output(kind_name, method):
    kind, model = _adapted(kind_name, method)
    model.train()  # int8: its training product multiplies by the dequantized weight, exactly
    x = torch.randn(4, kind.in_features, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model(x)
    merged = dorafit.merge_and_unload(model, dtype=torch.float32)
    assert type(merged.layer) is nn.Linear and merged.layer.weight.dtype == torch.float32
    with torch.no_grad():
        _close(merged(x), y, kind.tol)


def test_merge_and_unload_dequantizes_the_other_quantized_layers():
    kind = KINDS["bnb-nf4"]
    _, a = make_layer(kind, out_features=128, seed=0)
    _, b = make_layer(kind, out_features=128, seed=1)
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(128, 256), b)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, targets=["0"]))
    x = torch.randn(3, 256)
    with torch.no_grad():
        y = model(x)
        dorafit.merge_and_unload(model)
        assert all(type(m) is nn.Linear for m in (model[0], model[3]))
        _close(model(x), y, kind.tol)


@pytest.mark.parametrize("kind_name,ops", [("bnb-nf4", Bnb4bitOps), ("bnb-int8", Bnb8bitOps),
                                           ("torchao-nf4", TorchaoNF4Ops)])
def test_the_registry_picks_the_family_by_module_and_weight_type(kind_name, ops):
    _, layer = make_layer(KINDS[kind_name], out_features=128)
    assert type(ops_for(layer)) is ops
    assert ops_for(layer).quantized and not ops_for(layer).can_merge_in_place
    with pytest.raises(ValueError, match="quantized"):
        ops_for(layer).weight_matrix(layer)


def test_unsupported_quantized_weights_are_refused_by_name():
    quantization = pytest.importorskip("torchao.quantization")
    model = Holder(nn.Linear(64, 32))
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match="torchao.*supported quantized layers: bitsandbytes"):
        dorafit.apply(model, dorafit.AdapterConfig(method="dora", targets=["layer"]))
    assert not dorafit.adapter_names(model)


def test_unquantized_bitsandbytes_layer_is_refused():
    import bitsandbytes as bnb

    model = Holder(bnb.nn.Linear4bit(64, 32))  # not moved to a device: still float
    with pytest.raises(ValueError, match="not quantized yet"):
        dorafit.apply(model, dorafit.AdapterConfig(method="dora", targets=["layer"]))


def test_mixed_batches_and_disabled_on_a_quantized_base():
    kind = KINDS["bnb-nf4"]
    _, quantized = make_layer(kind, out_features=128)
    model = Holder(quantized)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, targets=["layer"]), name="a")
    dorafit.apply(model, dorafit.AdapterConfig(method="lora", r=2, targets=["layer"]), name="b")
    for holder in model.layer.holders().values():
        _randomize(holder)
    model.eval()
    x = torch.randn(3, kind.in_features)
    with torch.no_grad():
        alone = {}
        for name in ("a", "b", None):
            dorafit.set_adapter(model, name)
            alone[name] = model(x)
        with dorafit.per_row_adapters(model, ["a", None, "b"]):
            mixed = model(x)
        dorafit.set_adapter(model, "a")
        with dorafit.disabled(model):
            torch.testing.assert_close(model(x), alone[None])
    for i, name in enumerate(["a", None, "b"]):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)
