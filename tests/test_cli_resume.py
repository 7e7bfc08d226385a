"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run with the same seed ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from dorafit.train import checkpoint

from .cli_support import assets, read_jsonl  # noqa: F401 (fixture)

STEPS = 40


def command(assets, run, *extra) -> list[str]:  # noqa: F811
    return [sys.executable, "-m", "dorafit", "train", "--model", str(assets["bert"]), "--task", str(assets["jsonl"]),
            "--method", "dora", "--dropout", "0.1", "--steps", str(STEPS), "--batch-size", "8", "--grad-accum", "2",
            "--lr", "3e-3", "--checkpoint-every", "1", "--threads", "1", "--seed", "3", "--out", str(run), *extra]


def checkpoint_step(run) -> int:
    try:
        from safetensors import safe_open

        with safe_open(str(run / checkpoint.FILE), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]
    except Exception:  # not written yet
        return -1


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path, assets):  # noqa: F811
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(command(assets, whole), check=True, env=env, capture_output=True, timeout=300)

    proc = subprocess.Popen(command(assets, broken), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while checkpoint_step(broken) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_step(broken)
    if killed_at >= STEPS:
        pytest.fail("the run finished before it could be killed; raise STEPS")
    assert killed_at >= 5, "no checkpoint appeared in time"
    assert not (broken / "adapter").exists()

    done = subprocess.run([sys.executable, "-m", "dorafit", "train", "--resume", str(broken), "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from the checkpoint at step {killed_at} of {STEPS}" in done.stdout

    a = load_file(whole / "adapter" / "adapter.safetensors")
    b = load_file(broken / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    strip = lambda rows: [(r["step"], r["loss"], r["lr"]) for r in rows]  # noqa: E731 (timings differ)
    assert strip(read_jsonl(broken / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))
    assert len(read_jsonl(whole / "metrics.jsonl")) == STEPS
    eval_a, eval_b = (json.loads((r / "eval.json").read_text()) for r in (whole, broken))
    assert eval_a["tasks"] == eval_b["tasks"] and eval_a["before"] == eval_b["before"]

    # resuming a finished run changes nothing
    again = subprocess.run([sys.executable, "-m", "dorafit", "train", "--resume", str(broken), "--threads", "1"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert load_file(broken / "adapter" / "adapter.safetensors")[key].equal(a[key])
