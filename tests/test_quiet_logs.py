"""Logs a person can read: no progress-bar redraws where stderr is no terminal, no warnings about deprecated
library calls or GPU kernels a CPU machine cannot load, and a warm-up whose first step already trains."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dorafit.train.loop import lr_factor, make_scheduler

from .cli_support import assets  # noqa: F401 (fixture)


def _lrs(schedule: str, warmup: int, total: int) -> list[float]:
    """The learning rate of each step, read from the optimizer as the training loop does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, schedule, warmup, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warm_up_starts_above_zero_and_reaches_lr_when_it_ends(schedule):
    assert _lrs(schedule, 1, 5)[:2] == [0.5, 1.0]
    assert _lrs(schedule, 3, 8)[:4] == [0.25, 0.5, 0.75, 1.0]
    assert _lrs(schedule, 0, 4)[0] == 1.0


def test_the_decays_after_warm_up_are_transformers_ones():
    from transformers import get_scheduler

    total, warmup = 12, 2
    for schedule in ("linear", "cosine"):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        theirs = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        for step in range(warmup, total):
            assert math.isclose(lr_factor(step, schedule, warmup, total), theirs.lr_lambdas[0](step), abs_tol=1e-12)


def test_a_run_logged_to_a_file_has_no_bar_redraws_warnings_or_kernel_noise(tmp_path, assets):  # noqa: F811
    """``dorafit train`` (with a 4-bit base, so bitsandbytes and transformers' quantizer machinery load) writing
    to a pipe, as under nohup or a scheduler: every stderr line is plain text."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("DORAFIT_PROGRESS", "TQDM_DISABLE",
                                                            "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run(
        [sys.executable, "-m", "dorafit", "train", "--model", str(assets["bert"]), "--task", str(assets["jsonl"]),
         "--method", "dora", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--quantize", "nf4",
         "--threads", "1", "--out", str(run)],
        capture_output=True, text=True, timeout=600, env=env)  # the warnings filters a user has by default
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "\r" not in log
    for noise in ("Warning", "warn", "Failed to load", "deprecated", "it/s]"):  # none of them in a plain log
        assert noise not in log, (noise, log)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["lr"] > 0


def test_progress_bars_are_switched_off_where_stderr_is_no_terminal(monkeypatch):
    from transformers.utils import logging as hf_logging

    from dorafit.cli import progress_bars_on_terminal_only

    for name in ("DORAFIT_PROGRESS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's own settings are undone afterwards
        monkeypatch.delenv(name)
    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        monkeypatch.setenv("DORAFIT_PROGRESS", "1")  # asked for: kept
        progress_bars_on_terminal_only()
        assert "TQDM_DISABLE" not in os.environ and hf_logging.is_progress_bar_enabled()
        monkeypatch.delenv("DORAFIT_PROGRESS")
        progress_bars_on_terminal_only()  # pytest's captured stderr is no terminal
        assert os.environ["TQDM_DISABLE"] == os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
