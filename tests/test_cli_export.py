"""``dorafit export RUN --format peft --out DIR`` on a training run and on a plain adapter folder."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2Model

import dorafit
from dorafit.train.setup import load_trained

from .cli_support import assets, run_cli  # noqa: F401 (fixture)
from .conftest import randomize_adapter

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set")


def test_export_training_run_loads_in_peft(tmp_path, assets):  # noqa: F811
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--out", run, "--model", assets["bert"], "--task", assets["jsonl"],
                           "--method", "dora", "--steps", 3, "--lr", 3e-3, "--batch-size", 8, "--no-eval-before")
    assert code == 0, err
    out = tmp_path / "peft"
    code, stdout, err = run_cli("export", run, "--format", "peft", "--out", out)
    assert code == 0, err
    assert "checked: PEFT's outputs equal dorafit's on 8 test examples" in stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["use_dora"] is True
    assert config["base_model_name_or_path"] == str(assets["bert"].resolve())
    assert sorted(config["modules_to_save"]) == ["classifier", "pooler"]  # the trained head travels along

    # independently of the command's own check: a fresh base model from its folder + PEFT == dorafit's run model
    setup = load_trained(run, "cpu")
    base = AutoModelForSequenceClassification.from_pretrained(assets["bert"], num_labels=2)
    theirs = PeftModel.from_pretrained(base, out).eval()
    examples = next(iter(setup.data.test_sets().values()))
    torch.testing.assert_close(setup.task.check_outputs(theirs, examples, setup.device),
                               setup.task.check_outputs(setup.model.eval(), examples, setup.device),
                               rtol=1e-5, atol=1e-5)

    code, _, err = run_cli("export", run, "--out", out)
    assert code == 2 and "is not an empty folder" in err


def test_export_adapter_folder_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)).save_pretrained(folder)
    model = GPT2Model.from_pretrained(folder).eval()
    base = copy.deepcopy(model)
    dorafit.apply(model, dorafit.AdapterConfig(method="lora", r=2, alpha=3, rslora=True, targets=["c_attn", "c_fc"]))
    randomize_adapter(model)
    dorafit.save_adapter(model, tmp_path / "adapter", base_model=str(folder))
    dorafit.save_adapter(model, tmp_path / "anonymous")

    code, stdout, err = run_cli("export", tmp_path / "adapter", "--out", tmp_path / "peft", "--name", "org/tiny-gpt2")
    assert code == 0, err
    assert f"PEFT adapter folder: {(tmp_path / 'peft').resolve()}" in stdout
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-gpt2"
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-5, atol=1e-5)

    code, _, err = run_cli("export", tmp_path / "anonymous", "--out", tmp_path / "peft2")
    assert code == 2 and "does not record its base model; name it with --base-model" in err
    code, _, err = run_cli("export", tmp_path / "anonymous", "--out", tmp_path / "peft2", "--base-model", folder)
    assert code == 0, err
    code, _, err = run_cli("export", tmp_path, "--out", tmp_path / "peft3")
    assert code == 2 and "is neither a run folder" in err
