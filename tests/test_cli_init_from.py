"""`dorafit train --init-from DIR`: start from a PEFT (or dorafit) adapter folder."""

from __future__ import annotations

import json

import pytest
import torch

import dorafit
from dorafit.train.setup import load_trained

from .cli_support import assets, run_cli  # noqa: F401 (fixture)


def _peft_adapter(llama_folder, out_folder, use_dora: bool):
    """A PEFT adapter on the tiny LLaMA with non-zero B, saved by PEFT itself; returns its logits on fixed ids."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft_model.save_pretrained(out_folder)
    peft_model.eval()
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        return ids, peft_model(input_ids=ids).logits


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_starts_from_a_peft_adapter(tmp_path, assets, use_dora):  # noqa: F811
    ids, peft_logits = _peft_adapter(assets["llama"], tmp_path / "peft", use_dora)
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--model", assets["llama"], "--task", assets["commonsense"], "--out", run,
                             "--init-from", tmp_path / "peft", "--steps", 2, "--batch-size", 4, "--save-every", 1,
                             "--eval-limit", 4)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["method"] == ("dora" if use_dora else "lora")
    assert (config["rank"], config["alpha"]) == (4, 8.0)
    assert sorted(config["targets"]) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]

    # the step-0 snapshot is the imported adapter: same logits as PEFT's model
    setup = load_trained(run, "cpu")
    snapshot = sorted((run / "snapshots").iterdir())[0]
    _, tensors = dorafit.read_adapter(snapshot)
    dorafit.set_adapter_state_dict(setup.model, tensors)
    setup.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(setup.model(input_ids=ids).logits, peft_logits, rtol=1e-4, atol=1e-5)


def test_init_from_a_folder_without_an_adapter_is_an_error(tmp_path, assets):  # noqa: F811
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli("train", "--model", assets["llama"], "--task", assets["commonsense"], "--out",
                             tmp_path / "run", "--init-from", tmp_path / "empty", "--steps", 1)
    assert code != 0
    assert "no adapter_model.safetensors (PEFT) or adapter.safetensors (dorafit)" in err
