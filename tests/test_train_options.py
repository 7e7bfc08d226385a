"""One validation for every source of an option (command line, config file, stored run), and resuming: a
complete run says so, a run may be extended, never shortened."""

from __future__ import annotations

import json

import pytest

from dorafit.train.options import FIELDS, ADAPTER_OPTIONS, TrainConfig, adapter_config, adapter_options, validate
from dorafit.config import AdapterConfig

from .cli_support import assets, fails, read_jsonl, run_cli  # noqa: F401 (fixture)


# (option, bad value, expected message part) - every option with choices or a range
BAD = [
    ("method", "dorra", "--method must be one of full, lora, dora, vera, dvora, got 'dorra'"),
    ("schedule", "exponential", "--schedule must be one of linear, cosine, constant"),
    ("device", "tpu", "--device must be one of auto, cpu, cuda, got 'tpu'"),
    ("distributed", "horovod", "--distributed must be one of ddp, fsdp"),
    ("init", "xavier", "--init must be one of kaiming, gaussian"),
    ("magnitude_grad", "forget", "--magnitude-grad must be one of save, recompute"),
    ("log", "wandb", "--log must be one of none, tensorboard"),
    ("rank", True, "--rank must be an integer >= 1, got True"),
    ("rank", 0, "--rank must be an integer >= 1, got 0"),
    ("alpha", 0, "--alpha must be a number > 0, got 0"),
    ("warmup", float("inf"), "--warmup must be a number >= 0, got inf"),
    ("dropout", 1.0, "--dropout must be a number >= 0 and < 1"),
    ("test_size", 1.5, "--test-size must be a number > 0 and < 1"),
    ("max_length", 0, "--max-length must be an integer >= 2, got 0"),
    ("threads", -1, "--threads must be an integer >= 1, got -1"),
    ("seed", -1, "--seed must be an integer >= 0, got -1"),
    ("lr", 0, "--lr must be a number > 0, got 0"),
    ("steps", 0, "--steps must be an integer >= 1"),
    ("epochs", 0, "--epochs must be a number > 0"),
    ("batch_size", 0, "--batch-size must be an integer >= 1"),
    ("eval_limit", 0, "--eval-limit must be an integer >= 1"),
    ("max_new_tokens", 0, "--max-new-tokens must be an integer >= 1"),
    ("checkpoint_every", 0, "--checkpoint-every must be an integer >= 1"),
    ("save_every", -2, "--save-every must be an integer >= 0"),
    ("weight_decay", -0.1, "--weight-decay must be a number >= 0"),
    ("vera_seed", -1, "--vera-seed must be an integer >= 0"),
    ("eval_before", "yes", "--eval-before must be true or false, got 'yes'"),
    ("targets", [1, 2], "--targets must be a list of strings"),
]


@pytest.mark.parametrize("name, value, message", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_config_file_values_are_validated_like_the_command_line(tmp_path, assets, name, value, message):  # noqa: F811
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": str(assets["bert"]), "task": str(assets["jsonl"]), name: value},
                                 allow_nan=True))
    msg = fails("train", "--config", config, "--out", tmp_path / "run")
    assert msg == f"error: config file {config}: {message}" or msg.startswith(f"error: config file {config}: {message}")
    assert not (tmp_path / "run").exists()
    if isinstance(value, (bool, list)) or name in ("eval_before",):
        return
    cli = fails("train", "--model", assets["bert"], "--task", assets["jsonl"], "--" + name.replace("_", "-"),
                str(value), "--out", tmp_path / "run")
    assert cli.startswith(f"error: {message}")  # the same words from the command line


def test_yaml_config_values_are_validated(tmp_path, assets):  # noqa: F811
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {assets['bert']}\ntask: {assets['jsonl']}\nmethod: dorra\n")
    assert "--method must be one of" in fails("train", "--config", config, "--out", tmp_path / "run")
    config.write_text(f"model: {assets['bert']}\ntask: {assets['jsonl']}\nwarmup: .inf\n")
    assert "--warmup must be a number >= 0, got inf" in fails("train", "--config", config, "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_adapter_options_are_derived_from_adapter_config():
    assert ADAPTER_OPTIONS == {"method": "method", "rank": "r", "alpha": "alpha", "rslora": "rslora",
                               "targets": "targets", "magnitude_only": "magnitude_only", "dropout": "dropout",
                               "detach_norm": "detach_norm", "magnitude_grad": "magnitude_grad", "init": "init",
                               "vera_seed": "vera_seed"}
    defaults = AdapterConfig()
    for option, field in ADAPTER_OPTIONS.items():
        if option not in ("method", "targets"):
            assert FIELDS[option].default == getattr(defaults, field), option
    cfg = validate(TrainConfig(method="dvora", rank=16, alpha=8.0, dropout=0.1, magnitude_only=["o_proj"]))
    adapter = adapter_config(cfg, ["q_proj"], ["score"])
    assert (adapter.method, adapter.r, adapter.alpha, adapter.dropout, adapter.magnitude_only) == \
        ("dvora", 16, 8.0, 0.1, ["o_proj"])
    assert adapter.targets == ["q_proj"] and adapter.extra_trainable == ["score"]
    back = adapter_options(adapter)
    assert {k: getattr(cfg, k) for k in back if k != "targets"} == {k: v for k, v in back.items() if k != "targets"}


def test_resume_of_a_complete_run_says_so_and_a_run_can_be_extended(tmp_path, assets):  # noqa: F811
    base = ("--model", assets["bert"], "--task", assets["jsonl"], "--schedule", "constant", "--warmup", 0,
            "--no-eval-before", "--batch-size", 8, "--lr", 3e-3, "--checkpoint-every", 2)
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert run_cli("train", *base, "--steps", 6, "--out", straight)[0] == 0
    assert run_cli("train", *base, "--steps", 3, "--out", run)[0] == 0
    before = (run / "eval.json").read_text()
    code, out, err = run_cli("train", "--resume", run)
    assert code == 0 and f"{run} is complete: it trained all 3 steps" in out and "dorafit eval" in out
    assert "resumed" not in out and (run / "eval.json").read_text() == before
    assert "may raise its length on resume, not lower it" in fails("train", "--resume", run, "--steps", 2)
    code, out, err = run_cli("train", "--resume", run, "--steps", 6)
    assert code == 0, err
    assert "resumed from the checkpoint at step 3 of 6" in out
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 6
    # with a constant schedule, 3 steps then 3 more are exactly 6 steps in one go
    strip = lambda rows: [(r["step"], r["loss"], r["lr"]) for r in rows]  # noqa: E731
    assert strip(read_jsonl(run / "metrics.jsonl")) == strip(read_jsonl(straight / "metrics.jsonl"))
    code, out, _ = run_cli("train", "--resume", run, "--steps", 6)
    assert code == 0 and "is complete: it trained all 6 steps" in out


def test_compile_option_compiles_the_adapted_model_in_place(assets, monkeypatch):  # noqa: F811
    from dorafit.train import setup as setup_module

    compiled = []
    monkeypatch.setattr(setup_module, "compile_model", lambda model: compiled.append(model) or model)
    cfg = TrainConfig(model=str(assets["bert"]), task=str(assets["jsonl"]), method="dora", compile=True)
    prepared = setup_module.prepare(cfg)
    assert compiled == [prepared.model] and list(prepared.model.parameters())[0].requires_grad is False
    assert any(name.endswith("lora_A") for name, _ in prepared.model.named_parameters())  # names unchanged
