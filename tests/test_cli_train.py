"""dorafit train / eval / merge end to end on tiny models: run folder contents, eval, merge == adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dorafit.train.setup import load_trained

from .cli_support import assets, read_jsonl, run_cli  # noqa: F401 (fixture)

METHODS = ["full", "lora", "dora", "vera", "dvora"]


def train(tmp_path, *args) -> tuple:
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--out", run, "--seed", 1, "--batch-size", 8, *args)
    assert code == 0, err
    return run, out


def all_test_outputs(setup, model=None) -> torch.Tensor:
    examples = next(iter(setup.data.test_sets().values()))
    return setup.task.check_outputs((model or setup.model).eval(), examples, torch.device("cpu"))


def load_plain(setup, folder):
    """The merged folder loaded with plain transformers, by the run's task type."""
    return type(setup.task).load_model(folder, setup.data.extra).model


@pytest.mark.parametrize("method", METHODS)
def test_classification_run_eval_and_merge(tmp_path, assets, method):  # noqa: F811
    run, out = train(tmp_path, "--model", assets["bert"], "--task", assets["jsonl"], "--method", method,
                     "--steps", 6, "--lr", 3e-3 if method != "full" else 1e-3)
    assert out.strip().splitlines()[-1] == f"run folder: {run.resolve()}"
    assert "before training:\n  pairs            accuracy" in out and "after training:\n  pairs" in out
    for name in ("config.json", "metrics.jsonl", "eval.json", "loss.png", "checkpoint.safetensors"):
        assert (run / name).is_file(), name
    assert (run / ("model" if method == "full" else "adapter")).is_dir()

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all({"loss", "lr", "seconds", "tokens_per_s"} <= set(r) for r in rows)
    result = json.loads((run / "eval.json").read_text())
    assert set(result["tasks"]) == {"pairs"} and result["tasks"]["pairs"]["n"] == 10
    assert result["before"]["tasks"]["pairs"]["n"] == 10
    assert 0 < result["trainable_parameters"] <= result["total_parameters"]
    assert result["trainable_share"] == pytest.approx(result["trainable_parameters"] / result["total_parameters"])
    if method == "full":
        assert result["trainable_share"] == 1.0
    else:  # the head (pooler + classifier) trains beside the adapter and is saved with it
        config = json.loads((run / "config.json").read_text())["config"]
        assert config["head"] == ["bert.pooler", "classifier"]
        keys = load_file(run / "adapter" / "adapter.safetensors").keys()
        assert "classifier.weight" in keys and "bert.pooler.dense.weight" in keys

    # dorafit eval reproduces the stored accuracy
    code, out, err = run_cli("eval", run, "--json", tmp_path / "again.json")
    assert code == 0, err
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["tasks"] == result["tasks"]

    # dorafit merge: plain transformers loads the folder, and it predicts what the adapted model predicts
    merged_dir = tmp_path / "merged"
    code, out, err = run_cli("merge", run, "--out", merged_dir)
    assert code == 0, err
    setup = load_trained(run, "cpu")
    adapted = all_test_outputs(setup)
    plain = load_plain(setup, merged_dir)
    assert not any(hasattr(m, "dorafit") for m in plain.modules())
    merged = all_test_outputs(setup, plain)
    assert torch.equal(merged.argmax(-1), adapted.argmax(-1))
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_commonsense_causal_lm_run_eval_and_merge(tmp_path, assets, method):  # noqa: F811
    run, out = train(tmp_path, "--model", assets["llama"], "--task", assets["commonsense"], "--method", method,
                     "--steps", 5, "--lr", 1e-2, "--batch-size", 4,
                     *(["--magnitude-only", "o_proj"] if method == "dora" else []))
    result = json.loads((run / "eval.json").read_text())
    assert {k: v["n"] for k, v in result["tasks"].items()} == {"task_a": 12, "task_b": 10}
    accs = [t["accuracy"] for t in result["tasks"].values()]
    assert result["average"] == pytest.approx(sum(accs) / 2)
    assert "average" in out
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]
    assert len(losses) == 5 and losses[-1] < losses[0]  # lr 1e-2 on 48 repetitive records: the loss must fall

    code, out, err = run_cli("eval", run, "--json", tmp_path / "again.json")
    assert code == 0, err
    assert json.loads((tmp_path / "again.json").read_text())["tasks"] == result["tasks"]

    code, out, err = run_cli("merge", run, "--out", tmp_path / "merged")
    assert code == 0, err
    assert "predicts what the adapted model predicts" in out
    setup = load_trained(run, "cpu")
    plain = load_plain(setup, tmp_path / "merged")
    torch.testing.assert_close(all_test_outputs(setup, plain), all_test_outputs(setup), rtol=1e-4, atol=1e-5)


def test_config_file_with_command_line_override(tmp_path, assets):  # noqa: F811
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {assets['bert']}\ntask: {assets['jsonl']}\nmethod: lora\nrank: 4\nalpha: 8\n"
                      "steps: 2\nschedule: cosine\ntargets: [query, value]\n")
    run, _ = train(tmp_path, "--config", config, "--rank", 2, "--no-eval-before")
    stored = json.loads((run / "config.json").read_text())["config"]
    assert (stored["method"], stored["rank"], stored["alpha"], stored["schedule"]) == ("lora", 2, 8.0, "cosine")
    assert stored["targets"] == ["query", "value"]
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["config"]["r"] == 2 and len(adapter["modules"]) == 4  # query, value in 2 layers
    assert json.loads((run / "eval.json").read_text())["before"] is None


def test_snapshots_at_step_zero_every_n_and_end(tmp_path, assets):  # noqa: F811
    run, _ = train(tmp_path, "--model", assets["bert"], "--task", assets["jsonl"], "--method", "full",
                   "--steps", 5, "--save-every", 2, "--targets", "query", "--no-eval-before")
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["step-000000", "step-000002", "step-000004", "step-000005"]
    first = load_file(run / "snapshots" / "step-000000" / "weights.safetensors")
    last = load_file(run / "snapshots" / "step-000005" / "weights.safetensors")
    assert set(first) == {f"bert.encoder.layer.{i}.attention.self.query.{p}"
                          for i in (0, 1) for p in ("weight", "bias")}
    assert not torch.equal(first["bert.encoder.layer.0.attention.self.query.weight"],
                           last["bert.encoder.layer.0.attention.self.query.weight"])

    run2 = tmp_path / "run2"
    code, _, err = run_cli("train", "--out", run2, "--model", assets["bert"], "--task", assets["jsonl"],
                           "--steps", 2, "--save-every", 1, "--no-eval-before")
    assert code == 0, err
    assert (run2 / "snapshots" / "step-000000" / "adapter_config.json").is_file()
    assert (run2 / "snapshots" / "step-000002" / "adapter.safetensors").is_file()


def test_help_documents_every_option_with_its_default():
    from dorafit.cli import build_parser
    from dorafit.train.options import FIELDS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    documented = {a.dest: a.help for a in sub._actions if a.dest in FIELDS}
    assert set(documented) == set(FIELDS)
    for name, text in documented.items():
        assert "default" in text, f"--{name} does not state its default"
    text = sub.format_help()
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text


def test_csv_task_with_separate_eval_file(tmp_path, assets):  # noqa: F811
    import csv

    rows = read_jsonl(assets["jsonl"])
    for name, part in (("train.csv", rows[:60]), ("held.csv", rows[60:73])):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows({"text": r["text"] + ", quoted", "label": r["label"]} for r in part)
    run, out = train(tmp_path, "--model", assets["bert"], "--task", tmp_path / "train.csv", "--eval-file",
                     tmp_path / "held.csv", "--method", "lora", "--steps", 2, "--no-eval-before")
    assert "60 training / 13 test examples, labels neg, pos" in out
    assert json.loads((run / "eval.json").read_text())["tasks"]["train"]["n"] == 13


def test_run_folder_works_from_another_directory(tmp_path, assets, monkeypatch):  # noqa: F811
    import os

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli("train", "--model", os.path.relpath(assets["bert"]), "--task",
                           os.path.relpath(assets["jsonl"]), "--steps", 2, "--out", "run", "--no-eval-before")
    assert code == 0, err
    stored = json.loads((work / "run" / "config.json").read_text())["config"]
    assert stored["model"] == str(assets["bert"].resolve()) and stored["task"] == str(assets["jsonl"].resolve())
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli("eval", work / "run")
    assert code == 0, err
    code, _, err = run_cli("train", "--resume", work / "run", "--model", assets["bert"])  # same model, other spelling
    assert code == 0, err
