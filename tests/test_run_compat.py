"""Run folders written by dorafit 0.1.0 (before the Task interface) still evaluate, merge and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cli_support import assets, run_cli  # noqa: F401 (fixture)

OLD = Path(__file__).parent / "data" / "v0.1.0"


@pytest.mark.parametrize("kind, model, task, extra", [
    ("classification", "bert", "jsonl", ()),
    ("commonsense", "llama", "commonsense", ("--batch-size", 4)),
])
def test_a_version_0_1_0_run_folder_still_works(tmp_path, assets, kind, model, task, extra):  # noqa: F811
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--model", assets[model], "--task", assets[task], "--steps", 2, "--out", run,
                           "--no-eval-before", *extra)
    assert code == 0, err
    now = json.loads((run / "eval.json").read_text())
    # the run folder as 0.1.0 wrote it: its config.json (the adapter format did not change)
    old = (OLD / f"{kind}_config.json").read_text()
    old = old.replace("{MODEL}", str(assets[model])).replace("{TASK}", str(assets[task])).replace("{RUN}", str(run))
    (run / "config.json").write_text(old)
    assert json.loads(old)["resolved"]["kind"] == kind and "gradient_checkpointing" not in json.loads(old)["config"]
    code, out, err = run_cli("eval", run, "--json", tmp_path / "again.json")
    assert code == 0, err
    assert json.loads((tmp_path / "again.json").read_text())["tasks"] == now["tasks"]
    code, out, err = run_cli("merge", run, "--out", tmp_path / "merged")
    assert code == 0, err
    code, out, err = run_cli("train", "--resume", run)
    assert code == 0 and "is complete" in out, err


def test_a_config_json_with_an_unknown_option_says_which(tmp_path, assets):  # noqa: F811
    run = tmp_path / "run"
    assert run_cli("train", "--model", assets["bert"], "--task", assets["jsonl"], "--steps", 1, "--out", run,
                   "--no-eval-before")[0] == 0
    data = json.loads((run / "config.json").read_text())
    data["config"]["quantum"] = True
    (run / "config.json").write_text(json.dumps(data))
    code, _, err = run_cli("eval", run)
    assert code == 2 and err.count("\n") == 1
    assert "config.json: unknown option(s) quantum; it was written by a newer dorafit" in err
