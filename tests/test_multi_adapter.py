"""Named adapters on one model and mixed-adapter batches (float64, against each adapter alone)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dorafit

from .conftest import randomize_adapter


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.up = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 10)
        self.conv = nn.Conv1d(10, 4, 3, padding=1)

    def forward(self, x):  # x: [B, T, 6]
        h = self.up(self.q_proj(x) + self.v_proj(x).relu())  # [B, T, 10]
        return self.conv(h.transpose(1, 2))  # [B, 4, T]


ADAPTERS = {
    "dora": dorafit.AdapterConfig(method="dora", r=2, alpha=3, targets=["q_proj", "up", "conv"]),
    "lora": dorafit.AdapterConfig(method="lora", r=3, alpha=5, targets=["v_proj", "up"]),
    "vera": dorafit.AdapterConfig(method="vera", r=8, targets=["q_proj", "v_proj"]),
    "dvora": dorafit.AdapterConfig(method="dvora", r=4, targets=["up"], magnitude_only=["conv"]),
}


def alone(base: nn.Module, name: str, seed: int) -> nn.Module:
    """The adapter ``name`` applied alone (unnamed) to a copy of the base, randomised with ``seed``."""
    model = copy.deepcopy(base)
    dorafit.apply(model, ADAPTERS[name])
    randomize_adapter(model, seed)
    return model.eval()


@pytest.fixture
def models():
    torch.manual_seed(0)
    base = Block().double()
    singles = {name: alone(base, name, seed) for seed, name in enumerate(ADAPTERS, 1)}
    multi = copy.deepcopy(base)
    for name, single in singles.items():
        dorafit.apply(multi, ADAPTERS[name], name=name)
        dorafit.set_adapter_state_dict(multi, dorafit.adapter_state_dict(single), name=name)
    return base.eval(), singles, multi.eval()


def test_named_adapters_each_equal_the_adapter_alone(models):
    base, singles, multi = models
    assert dorafit.adapter_names(multi) == list(ADAPTERS)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    for name, single in singles.items():
        dorafit.set_adapter(multi, name)
        torch.testing.assert_close(multi(x), single(x), rtol=1e-12, atol=1e-12)
    dorafit.set_adapter(multi, None)
    torch.testing.assert_close(multi(x), base(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter named 'nope'; this model has dora, lora, vera, dvora"):
        dorafit.set_adapter(multi, "nope")


def test_mixed_batch_rows_equal_each_row_alone(models):
    base, singles, multi = models
    x = torch.randn(6, 5, 6, dtype=torch.float64)
    names = ["lora", None, "dora", "vera", "dora", "dvora"]
    with torch.no_grad(), dorafit.per_row_adapters(multi, names):
        mixed = multi(x)
    for i, name in enumerate(names):
        want = (singles[name] if name else base)(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-12, atol=1e-12, msg=f"row {i} ({name})")
    with pytest.raises(ValueError, match="one adapter name per batch row"):
        with torch.no_grad(), dorafit.per_row_adapters(multi, ["lora"]):
            multi(x)
    multi.train()
    with pytest.raises(RuntimeError, match="inference only"):
        with dorafit.per_row_adapters(multi, names):
            multi(x).sum().backward()


def test_merged_adapters_cannot_be_mixed(models):
    _, _, multi = models
    dorafit.set_adapter(multi, "lora")
    dorafit.merge(multi)
    with pytest.raises(ValueError, match="merged"):
        with dorafit.per_row_adapters(multi, ["lora", "dora"]):
            multi(torch.randn(2, 5, 6, dtype=torch.float64))
    dorafit.unmerge(multi)


def test_save_load_and_unload_by_name(models, tmp_path):
    base, singles, multi = models
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    dorafit.save_adapter(multi, tmp_path / "lora", name="lora")
    fresh = copy.deepcopy(base)
    dorafit.load_adapter(fresh, tmp_path / "lora")  # a saved named adapter is an ordinary adapter folder
    torch.testing.assert_close(fresh.eval()(x), singles["lora"](x), rtol=1e-12, atol=1e-12)
    other = copy.deepcopy(base)
    dorafit.load_adapter(other, tmp_path / "lora", name="mine")
    dorafit.set_adapter(other, "mine")
    torch.testing.assert_close(other.eval()(x), singles["lora"](x), rtol=1e-12, atol=1e-12)
    dorafit.unload(multi, "vera")
    assert dorafit.adapter_names(multi) == ["dora", "lora", "dvora"]
    assert not any(".dorafit_adapters.vera." in k for k in multi.state_dict())
    for name in ("dora", "lora", "dvora"):
        dorafit.set_adapter(multi, name)
        torch.testing.assert_close(multi(x), singles[name](x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already has an adapter named 'dora'"):
        dorafit.apply(multi, ADAPTERS["dora"], name="dora")


def test_only_the_active_adapter_trains_and_the_unnamed_api_is_unchanged():
    torch.manual_seed(0)
    model = Block()
    names = dorafit.apply(model, ADAPTERS["lora"])
    assert dorafit.adapter_names(model) == ["default"] and len(names) == 2
    keys = set(dorafit.adapter_state_dict(model))
    assert "v_proj.lora_A" in keys and "up.lora_B" in keys  # the unnamed adapter keeps today's keys
    with pytest.raises(ValueError, match="already has dorafit adapters"):
        dorafit.apply(model, ADAPTERS["lora"])
    dorafit.apply(model, ADAPTERS["dora"], name="second")
    dorafit.set_adapter(model, "second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("dorafit_adapters.second." in n for n in trainable)
    dorafit.set_adapter(model, "default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == keys


def test_rows_that_share_one_adapter_equal_it_active_bit_for_bit(models):
    """A batch whose rows all use one adapter (a batch of one, say) runs that adapter's own forward."""
    base, singles, multi = models
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    for name in [*ADAPTERS, None]:
        with torch.no_grad():
            with dorafit.per_row_adapters(multi, [name] * 3):
                rows = multi(x)
            dorafit.set_adapter(multi, name)
            active = multi(x)
        assert torch.equal(rows, active), name


MAGNITUDE_ONLY = dorafit.AdapterConfig(method="dora", r=2, targets=["v_proj"], magnitude_only=["q_proj", "up"])


def stacked_builds(monkeypatch) -> list[str]:
    """The layers whose adapters get stacked (dorafit.stacked_adapters), one entry per build."""
    from dorafit import stacked_adapters

    builds, build = [], stacked_adapters._build
    monkeypatch.setattr(stacked_adapters, "_build", lambda layer, *a: (builds.append(layer), build(layer, *a))[1])
    return builds


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_the_stacked_path_gives_each_row_what_it_gets_alone(models, monkeypatch, dtype, tolerance):
    """Few tokens (decoding): every linear layer runs its adapters stacked, one product for all rows, whatever the
    mix of LoRA, DoRA, VeRA, DVoRA, magnitude-only and base rows; the conv layer keeps the per-adapter loop."""
    base, singles, multi = models
    singles = {**singles, "mag": copy.deepcopy(base)}
    dorafit.apply(singles["mag"], MAGNITUDE_ONLY)
    randomize_adapter(singles["mag"], 9)
    dorafit.apply(multi, MAGNITUDE_ONLY, name="mag")
    dorafit.set_adapter_state_dict(multi, dorafit.adapter_state_dict(singles["mag"]), name="mag")
    base, multi = base.to(dtype).eval(), multi.to(dtype).eval()
    singles = {name: model.to(dtype).eval() for name, model in singles.items()}
    builds = stacked_builds(monkeypatch)
    x = torch.randn(7, 2, 6, dtype=dtype)  # 14 tokens
    names = ["lora", None, "dora", "vera", "mag", "dvora", "dora"]
    with torch.no_grad(), dorafit.per_row_adapters(multi, names):
        mixed = multi(x)
        again = multi(x)
    for i, name in enumerate(names):
        with torch.no_grad():
            want = (singles[name] if name else base)(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], want, rtol=tolerance, atol=tolerance, msg=f"row {i} ({name})")
    assert torch.equal(mixed, again)
    assert {id(layer) for layer in builds} == {id(m) for m in (multi.q_proj, multi.v_proj, multi.up)}
    assert len(builds) == 3  # built once, reused by the second forward


def test_the_stacked_adapters_follow_in_place_writes(models, monkeypatch):
    """An in-place write to an adapter's B or magnitude (an optimizer step, a load) re-stacks that layer."""
    base, singles, multi = models
    builds = stacked_builds(monkeypatch)
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    names = ["lora", "dora", None, "vera"]

    def check() -> None:
        with torch.no_grad(), dorafit.per_row_adapters(multi, names):
            mixed = multi(x)
        for i, name in enumerate(names):
            with torch.no_grad():
                want = (singles[name] if name else base)(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], want, rtol=1e-10, atol=1e-10, msg=f"row {i} ({name})")

    check()
    built = len(builds)
    with torch.no_grad():
        for model in (singles["lora"], multi):
            layer = model.v_proj
            (layer.holder("lora") or layer).lora_B.mul_(3)
        for model in (singles["dora"], multi):
            layer = model.q_proj
            (layer.holder("dora") or layer).magnitude.add_(0.5)
    check()
    assert {id(layer) for layer in builds[built:]} == {id(multi.v_proj), id(multi.q_proj)}
