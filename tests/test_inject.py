"""Injection: which modules get adapters, what is frozen, and the errors for bad requests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dorafit


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8, bias=False)
        self.o_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.o_proj(self.q_proj(x) + self.v_proj(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_list_targets_match_suffixes_and_full_names():
    names = dorafit.apply(Net(), dorafit.AdapterConfig(targets=["q_proj", "blocks.1.v_proj"]))
    assert names == ["blocks.0.q_proj", "blocks.1.q_proj", "blocks.1.v_proj"]


def test_regex_and_callable_targets():
    assert dorafit.apply(Net(), dorafit.AdapterConfig(targets=r"blocks\.0\.(q|v)_proj")) == [
        "blocks.0.q_proj",
        "blocks.0.v_proj",
    ]
    names = dorafit.apply(Net(), dorafit.AdapterConfig(targets=lambda n, m: isinstance(m, nn.Linear) and "o_" in n))
    assert names == ["blocks.0.o_proj", "blocks.1.o_proj"]


def test_magnitude_only_modules_get_only_a_magnitude():
    model = Net()
    cfg = dorafit.AdapterConfig(method="dora", r=2, targets=["q_proj", "v_proj"], magnitude_only=["o_proj"])
    dorafit.apply(model, cfg)
    o = model.blocks[0].o_proj
    assert hasattr(o, "magnitude") and not hasattr(o, "lora_A")
    assert hasattr(model.blocks[0].q_proj, "lora_A")


def test_only_adapters_and_extra_modules_are_trainable_and_change():
    torch.manual_seed(0)
    model = Net()
    before = copy.deepcopy(model.state_dict())
    cfg = dorafit.AdapterConfig(method="dora", r=2, targets=["q_proj", "v_proj"], extra_trainable=["head"])
    dorafit.apply(model, cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"blocks.{i}.{m}.{t}" for i in (0, 1) for m in ("q_proj", "v_proj") for t in ("lora_A", "lora_B", "magnitude")
    } | {"head.weight", "head.bias"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        model(torch.randint(0, 20, (4, 5))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == key.startswith("head."), key
    for key in trainable:  # every trainable tensor moved
        assert not torch.equal(after[key], initial[key]), key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=["k_proj"]), "'k_proj' matches no module"),
        (dict(targets=["q_projj"]), "did you mean q_proj"),
        (dict(targets=["norm"]), "LayerNorm, which cannot carry an adapter"),
        (dict(targets=["blocks.0"]), "Block, which cannot carry an adapter"),
        (dict(targets=r"nothing\.here"), "matches no module"),
        (dict(r=9, targets=["q_proj"]), "rank r=9 is larger than module 'blocks.0.q_proj' allows"),
        (dict(targets=["q_proj"], extra_trainable=["classifier"]), "extra_trainable 'classifier' matches no module"),
    ],
)
def test_bad_requests_raise_clear_errors_and_leave_model_unchanged(kwargs, message):
    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        dorafit.apply(model, dorafit.AdapterConfig(**kwargs))
    assert not list(dorafit.adapted_modules(model))
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_applying_twice_is_an_error():
    model = Net()
    dorafit.apply(model, dorafit.AdapterConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="already has dorafit adapters"):
        dorafit.apply(model, dorafit.AdapterConfig(targets=["v_proj"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="adalora"), "method must be one of lora, dora, vera, dvora, got 'adalora'"),
        (dict(r=0), "r must be an integer >= 1, got 0"),
        (dict(r=True), "r must be an integer >= 1, got True"),
        (dict(alpha=0), "alpha must be a number > 0"),
        (dict(alpha=float("nan")), "alpha must be a number > 0"),
        (dict(dropout=1.0), "dropout must be a number >= 0 and < 1"),
        (dict(method="lora", magnitude_only=["o_proj"]), "magnitude_only needs a decomposed method"),
        (dict(targets="(unclosed"), "not a valid regular expression"),
        (dict(init="xavier"), "init must be one of kaiming, gaussian"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dorafit.AdapterConfig(**kwargs)


def test_grouped_conv_and_max_norm_embedding_are_refused():
    with pytest.raises(ValueError, match="grouped convolutions"):
        dorafit.apply(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), dorafit.AdapterConfig(r=2, targets=["0"]))
    with pytest.raises(ValueError, match="max_norm"):
        dorafit.apply(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)), dorafit.AdapterConfig(r=2, targets=["0"]))


def test_zero_weight_row_gives_finite_outputs_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight[2].zero_()
    for detach in (True, False):
        m = copy.deepcopy(model)
        dorafit.apply(m, dorafit.AdapterConfig(method="dora", r=2, targets=["0"], detach_norm=detach))
        with torch.no_grad():
            m[0].lora_B.normal_()
        y = m(torch.randn(3, 6))
        y.sum().backward()
        assert torch.isfinite(y).all()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
        dorafit.merge(m)
        assert torch.isfinite(m[0].weight).all()


def test_eval_mode_caches_the_norm_and_invalidates_on_update():
    model = nn.Sequential(nn.Linear(6, 4))
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["0"]))
    layer = model[0]
    model.eval()
    with torch.no_grad():
        n1 = layer.weight_norm()
        assert layer.weight_norm() is n1  # cached: same tensor object
        layer.lora_B.add_(1.0)  # an in-place update (like an optimizer step) invalidates it
        n2 = layer.weight_norm()
    assert n2 is not n1 and not torch.equal(n1, n2)
    dense = torch.linalg.norm(layer.weight + layer.dorafit.scale * layer.lora_B @ layer.lora_A, dim=1)
    torch.testing.assert_close(n2, dense)


def test_tied_weights_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    with pytest.raises(ValueError, match="module 'embed' shares its weight with 'head' \\(tied weights\\)"):
        dorafit.apply(Tied(), dorafit.AdapterConfig(r=2, targets=["embed"]))


def test_model_cast_after_apply_keeps_float32_magnitude_and_exact_step_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["0"]))
    exact = model[0].magnitude.detach().clone()
    model.to(torch.bfloat16)
    assert model[0].magnitude.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16
    assert torch.equal(model[0].magnitude, exact)  # not rounded through bf16
    model.double()
    assert model[0].magnitude.dtype == torch.float64


def test_eval_drops_caches_so_writes_through_data_are_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["0"]))
    model.eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        model(x)
        model[0].lora_B.data.copy_(torch.randn(4, 2))  # .data writes do not bump version counters
        model.eval()
        fresh = copy.deepcopy(model)
        fresh[0].dorafit.caches.clear()
        torch.testing.assert_close(model(x), fresh(x))
