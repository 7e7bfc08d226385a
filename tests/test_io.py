"""Save / load: round trips, and clear errors for missing, corrupt and mismatched files."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import dorafit
from dorafit.io import CONFIG_FILE, TENSORS_FILE

from .conftest import randomize_adapter
from .test_inject import Net


def _adapted_net(method="dora", **kw):
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    cfg = dorafit.AdapterConfig(method=method, r=2, targets=["q_proj", "v_proj"], extra_trainable=["head"], **kw)
    dorafit.apply(model, cfg)
    randomize_adapter(model)
    with torch.no_grad():
        model.head.weight.mul_(2)
    return base, model


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "dvora"])
def test_round_trip_gives_identical_outputs(tmp_path, method):
    base, model = _adapted_net(method)
    ids = torch.randint(0, 20, (3, 4))
    dorafit.save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == sorted([CONFIG_FILE, TENSORS_FILE])
    fresh = copy.deepcopy(base)
    names = dorafit.load_adapter(fresh, tmp_path / "ad")
    assert names == [n for n, _ in dorafit.adapted_modules(model)]
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_file_holds_only_adapter_and_extra_tensors(tmp_path):
    _, model = _adapted_net()
    dorafit.save_adapter(model, tmp_path / "ad")
    meta, tensors = dorafit.read_adapter(tmp_path / "ad")
    assert set(tensors) == set(dorafit.adapter_state_dict(model))
    assert "head.weight" in tensors and "blocks.0.q_proj.weight" not in tensors
    assert meta["config"]["targets"] == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj"]


def test_vera_projections_regenerate_in_a_fresh_process(tmp_path):
    """The seed and shapes in the config reproduce VeRA's shared matrices exactly, in another process."""
    base, model = _adapted_net("dvora")
    torch.save(base.state_dict(), tmp_path / "base.pt")  # our own trusted file, only for this test
    ids = torch.randint(0, 20, (3, 4))
    torch.save({"ids": ids, "y": model(ids).detach()}, tmp_path / "io.pt")
    dorafit.save_adapter(model, tmp_path / "ad")
    script = textwrap.dedent(
        f"""
        import torch, dorafit
        from tests.test_inject import Net
        base = Net(); base.load_state_dict(torch.load({str(tmp_path / 'base.pt')!r}))
        dorafit.load_adapter(base, {str(tmp_path / 'ad')!r})
        ref = torch.load({str(tmp_path / 'io.pt')!r})
        assert torch.equal(base(ref["ids"]), ref["y"]), "outputs differ"
        print("same")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(_repo_root()))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "same"


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def write_config(folder, meta: dict) -> None:
    """An adapter_config.json with edited entries and a matching checksum (to reach the checks behind it)."""
    from dorafit.io import _config_digest

    meta = dict(meta)
    meta["config_sha256"] = _config_digest(meta)
    (folder / CONFIG_FILE).write_text(json.dumps(meta))


def test_vera_wrong_seed_is_refused(tmp_path):
    base, model = _adapted_net("vera")
    dorafit.save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    meta["config"]["vera_seed"] = 1
    write_config(tmp_path / "ad", meta)
    fresh = copy.deepcopy(base)
    with pytest.raises(dorafit.AdapterFileError, match="regenerated from seed 1 differ"):
        dorafit.load_adapter(fresh, tmp_path / "ad")
    assert not list(dorafit.adapted_modules(fresh))


def test_vera_projections_can_be_stored(tmp_path):
    base, model = _adapted_net("vera", save_vera_projections=True)
    dorafit.save_adapter(model, tmp_path / "ad")
    _, tensors = dorafit.read_adapter(tmp_path / "ad")
    assert set(k for k in tensors if k.startswith("vera_")) == {"vera_projections.8x8.A", "vera_projections.8x8.B"}
    fresh = copy.deepcopy(base)
    dorafit.load_adapter(fresh, tmp_path / "ad")
    ids = torch.randint(0, 20, (2, 3))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_vera_parameter_count_matches_formula():
    model = Net()
    dorafit.apply(model, dorafit.AdapterConfig(method="vera", r=4, targets=["q_proj", "v_proj"]))
    trainable, _ = dorafit.trainable_parameter_count(model)
    assert trainable == 4 * (8 + 4)  # layers x (out + r)
    layers = [layer for _, layer in dorafit.adapted_modules(model)]
    assert all(layer.vera_A is layers[0].vera_A for layer in layers)  # shared by layers of the same shape


def _expect_load_error(tmp_path, base, message, folder=None):
    fresh = copy.deepcopy(base)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(dorafit.AdapterFileError, match=message):
        dorafit.load_adapter(fresh, folder or tmp_path / "ad")
    assert not list(dorafit.adapted_modules(fresh)), "a failed load must leave the model unchanged"
    assert set(fresh.state_dict()) == set(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in fresh.parameters())


def test_missing_folder_or_file(tmp_path):
    base, model = _adapted_net()
    _expect_load_error(tmp_path, base, "does not exist", folder=tmp_path / "nowhere")
    dorafit.save_adapter(model, tmp_path / "ad")
    (tmp_path / "ad" / TENSORS_FILE).unlink()
    _expect_load_error(tmp_path, base, f"{TENSORS_FILE} does not exist")


def test_corrupt_config_and_tensors(tmp_path):
    base, model = _adapted_net()
    dorafit.save_adapter(model, tmp_path / "ad")
    blob = (tmp_path / "ad" / TENSORS_FILE).read_bytes()
    (tmp_path / "ad" / TENSORS_FILE).write_bytes(blob[: len(blob) // 2])
    _expect_load_error(tmp_path, base, "checksum differs")
    (tmp_path / "ad" / CONFIG_FILE).write_text("{ not json")
    _expect_load_error(tmp_path, base, "not valid JSON")


def test_mismatched_base_model(tmp_path):
    _, model = _adapted_net()
    dorafit.save_adapter(model, tmp_path / "ad")

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.blocks[1].q_proj = nn.Linear(8, 16)

    _expect_load_error(tmp_path, Wider(), "module 'blocks.1.q_proj': the adapter was saved for a weight of shape")
    _expect_load_error(tmp_path, nn.Sequential(nn.Linear(4, 4)), "does not fit this Sequential")


def test_tensor_shape_and_key_mismatch(tmp_path):
    base, model = _adapted_net()
    dorafit.save_adapter(model, tmp_path / "ad")
    meta, tensors = dorafit.read_adapter(tmp_path / "ad")
    from safetensors.torch import save

    from dorafit.files import sha256_hex

    def rewrite(new_tensors):
        blob = save(new_tensors)
        (tmp_path / "ad" / TENSORS_FILE).write_bytes(blob)
        meta["tensors_sha256"] = sha256_hex(blob)
        write_config(tmp_path / "ad", meta)

    rewrite({**tensors, "blocks.0.q_proj.lora_A": torch.zeros(3, 8)})
    _expect_load_error(tmp_path, base, r"tensor 'blocks.0.q_proj.lora_A': file shape \[3, 8\], model shape \[2, 8\]")
    rewrite({k: v for k, v in tensors.items() if k != "blocks.1.v_proj.magnitude"})
    _expect_load_error(tmp_path, base, "'blocks.1.v_proj.magnitude' is missing")
    rewrite({**tensors, "blocks.0.q_proj.extra": torch.zeros(1)})
    _expect_load_error(tmp_path, base, "has tensor 'blocks.0.q_proj.extra'")


def test_unknown_config_key_is_named(tmp_path):
    base, model = _adapted_net()
    dorafit.save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    meta["config"]["use_magic"] = True
    write_config(tmp_path / "ad", meta)
    _expect_load_error(tmp_path, base, "unknown adapter config keys: use_magic")


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    _, model = _adapted_net()
    dorafit.save_adapter(model, tmp_path / "ad")
    dorafit.save_adapter(model, tmp_path / "ad")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == sorted([CONFIG_FILE, TENSORS_FILE])


def test_saved_names_match_exactly_not_as_suffixes(tmp_path):
    """An adapter on `fc` must not also adapt `block.fc` when loaded."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.block = nn.Sequential()
            self.block.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.block.fc(self.fc(x))

    torch.manual_seed(0)
    base = Model()
    model = copy.deepcopy(base)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=lambda n, m: n == "fc"))
    randomize_adapter(model)
    dorafit.save_adapter(model, tmp_path / "ad")
    assert dorafit.load_adapter(base, tmp_path / "ad") == ["fc"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(base(x), model(x), rtol=0, atol=0)


def test_magnitude_only_adapter_round_trip(tmp_path):
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", targets=[], magnitude_only=["o_proj"]))
    randomize_adapter(model)
    dorafit.save_adapter(model, tmp_path / "ad")
    assert dorafit.load_adapter(base, tmp_path / "ad") == ["blocks.0.o_proj", "blocks.1.o_proj"]
    ids = torch.randint(0, 20, (2, 3))
    torch.testing.assert_close(base(ids), model(ids), rtol=0, atol=0)


def test_loading_tensors_into_a_merged_model_keeps_base_weights(tmp_path):
    base, model = _adapted_net()
    dorafit.merge(model)
    fresh_tensors = {k: torch.randn_like(v) for k, v in dorafit.adapter_state_dict(model).items()}
    dorafit.set_adapter_state_dict(model, fresh_tensors)
    assert model.blocks[0].q_proj.dorafit.merged
    dorafit.unmerge(model)
    torch.testing.assert_close(model.blocks[0].q_proj.weight, base.blocks[0].q_proj.weight, rtol=1e-5, atol=1e-5)


def test_vera_adapter_saved_in_bf16_loads_in_float32(tmp_path):
    base, model = _adapted_net("vera")
    model.to(torch.bfloat16)
    dorafit.save_adapter(model, tmp_path / "ad")
    fresh = copy.deepcopy(base)
    dorafit.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh.blocks[0].q_proj.vera_lambda_b, model.blocks[0].q_proj.vera_lambda_b.float())


def test_config_without_modules_entry_is_reported(tmp_path):
    base, model = _adapted_net()
    dorafit.save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    del meta["modules"]
    write_config(tmp_path / "ad", meta)
    _expect_load_error(tmp_path, base, "has no valid 'modules' entry")


def test_an_edited_config_or_bad_tensors_are_refused(tmp_path):
    from safetensors.torch import save

    from dorafit.files import sha256_hex

    base, model = _adapted_net()
    dorafit.save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    edited = {**meta, "config": {**meta["config"], "alpha": 99.0}}
    (tmp_path / "ad" / CONFIG_FILE).write_text(json.dumps(edited))
    _expect_load_error(tmp_path, base, "was edited or is damaged: its checksum differs")
    dorafit.save_adapter(model, tmp_path / "ad")
    meta, tensors = dorafit.read_adapter(tmp_path / "ad")
    for bad, message in ((float("nan"), "holds NaN or infinite values"), (None, "has dtype torch.int64")):
        changed = dict(tensors)
        key = "blocks.0.q_proj.lora_B"
        changed[key] = tensors[key].clone().fill_(bad) if bad is not None else tensors[key].long()
        blob = save(changed)
        (tmp_path / "ad" / TENSORS_FILE).write_bytes(blob)
        write_config(tmp_path / "ad", {**meta, "tensors_sha256": sha256_hex(blob)})
        _expect_load_error(tmp_path, base, message)


def test_a_peft_folder_is_pointed_at_import_peft(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(dorafit.AdapterFileError, match=r"is a PEFT adapter folder .*dorafit.import_peft"):
        dorafit.read_adapter(tmp_path)
