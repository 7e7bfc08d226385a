"""Faults: damaged checkpoints, signals, kill -9, file modes, leftovers, unwritable folders, bad data files.

Every bad input gets one `error:` line and exit status 2, and leaves the run folder as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dorafit.train import checkpoint

from .cli_support import assets, fails, read_jsonl, run_cli  # noqa: F401 (fixture)

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> SHA-256 of every file under ``folder`` (to assert that nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def base_args(assets, run, steps=6, *extra):  # noqa: F811
    return ["--model", str(assets["bert"]), "--task", str(assets["jsonl"]), "--method", "dora", "--steps", str(steps),
            "--batch-size", "8", "--lr", "3e-3", "--checkpoint-every", "1", "--no-eval-before", "--out", str(run),
            *map(str, extra)]


@pytest.fixture
def stopped_run(tmp_path, assets):  # noqa: F811
    """A run stopped after 3 of 6 steps (a crash right after the checkpoint of step 3)."""
    run = tmp_path / "run"
    code, _, err = run_cli("train", *base_args(assets, run, 3))
    assert code == 0, err
    (run / "eval.json").unlink()  # as if killed before the end: the resume must train on
    return run


def flip_byte(path: Path, where: str) -> None:
    blob = bytearray(path.read_bytes())
    n = int.from_bytes(blob[:8], "little")
    header = bytes(blob[8 : 8 + n])
    if where == "tensor":
        at = 8 + n + (len(blob) - 8 - n) // 2
        blob[at] ^= 0x10
    else:  # a digit of the stored step in the metadata
        at = 8 + header.index(b'\\"step\\": ') + len(b'\\"step\\": ')
        blob[at] = ord("9") if blob[at] != ord("9") else ord("8")
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("where", ["tensor", "metadata"])
def test_a_damaged_checkpoint_is_refused_and_the_advice_works(stopped_run, where):
    flip_byte(stopped_run / checkpoint.FILE, where)
    before = snapshot(stopped_run)
    msg = fails("train", "--resume", stopped_run)
    assert f"the checkpoint {stopped_run / checkpoint.FILE} is damaged" in msg and "SHA-256" in msg
    assert snapshot(stopped_run) == before
    # the advice: delete it and resume, which trains the run again from step 0
    assert f"rm {stopped_run / checkpoint.FILE}; dorafit train --resume {stopped_run}" in msg
    (stopped_run / checkpoint.FILE).unlink()
    code, out, err = run_cli("train", "--resume", stopped_run, "--steps", 6)
    assert code == 0, err
    assert [r["step"] for r in read_jsonl(stopped_run / "metrics.jsonl")] == list(range(1, 7))


def test_a_checkpoint_with_non_finite_values_is_damaged(stopped_run):
    state, params, optim = checkpoint.read(stopped_run)
    name = next(iter(params))
    params[name] = params[name].clone().fill_(float("nan"))
    checkpoint.write(stopped_run, params, optim, state["scheduler"], state["step"], state["seconds"],
                     state["metrics"])
    msg = fails("train", "--resume", stopped_run)
    assert "is damaged" in msg and "NaN or infinite" in msg and "--lr" not in msg


def _wait_for_checkpoint(run: Path, step: int, proc, timeout=120) -> int:
    deadline = time.monotonic() + timeout
    while checkpoint.step_of(run) in ("?",) or checkpoint.step_of(run) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    got = checkpoint.step_of(run)
    return got if isinstance(got, int) else -1


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_checkpoints_and_the_resume_is_exact(tmp_path, assets, sig, status):  # noqa: F811
    steps = 30
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    command = lambda run: [sys.executable, "-m", "dorafit", "train", *base_args(assets, run, steps, "--dropout", 0.1,  # noqa: E731
                                                                                "--threads", 1)]
    subprocess.run(command(whole), check=True, env=ENV, capture_output=True, timeout=300)
    proc = subprocess.Popen(command(stopped), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    at = _wait_for_checkpoint(stopped, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == status, err
    done = checkpoint.step_of(stopped)
    assert done >= at and f"stopped by {sig.name} after step {done} of {steps}" in err
    assert f"Continue with: dorafit train --resume {stopped}" in err
    assert "Traceback" not in err
    resumed = subprocess.run([sys.executable, "-m", "dorafit", "train", "--resume", str(stopped)], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(whole / "adapter" / "adapter.safetensors"), load_file(stopped / "adapter" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [(r["step"], r["loss"]) for r in rows]  # noqa: E731
    assert strip(read_jsonl(stopped / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))


def test_files_respect_the_umask_and_leftovers_are_removed(tmp_path, assets):  # noqa: F811
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert run_cli("train", *base_args(assets, run, 2))[0] == 0
        done = run_cli("merge", run, "--out", tmp_path / "merged", "--check", 0, "--threads", 1, "--device", "cpu")
        assert done[0] == 0, done
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.jsonl", "eval.json", "checkpoint.safetensors", "adapter/adapter.safetensors"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    merged = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in merged and set(merged.values()) == {0o644}, merged
    # what a process killed while writing leaves behind is removed by the next run on the folder
    leftovers = [run / ".checkpoint.safetensors.x1y2.tmp", run / "adapter" / ".adapter.safetensors.abc.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    code, out, _ = run_cli("train", "--resume", run)
    assert code == 0 and "is complete" in out
    assert not any(p.exists() for p in leftovers)


def test_a_failed_fresh_start_leaves_no_folder(tmp_path, assets):  # noqa: F811
    fails("train", "--model", assets["bert"], "--task", tmp_path / "missing.jsonl", "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in fails("train", *base_args(assets, tmp_path / "file"))


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "free some space")])
def test_an_unwritable_or_full_disk_is_named_before_training(tmp_path, assets, monkeypatch, code, words):  # noqa: F811
    import tempfile as real_tempfile

    from dorafit import files

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    msg = fails("train", *base_args(assets, tmp_path / "run"))
    assert f"cannot write to {tmp_path / 'run'}" in msg and words in msg
    monkeypatch.setattr(files.tempfile, "mkstemp", real_tempfile.mkstemp)


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(stopped_run, monkeypatch):
    from dorafit import files

    good = (stopped_run / checkpoint.FILE).read_bytes()
    real = files.os.replace

    def full(src, dst):
        if str(dst).endswith(checkpoint.FILE):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    msg = fails("train", "--resume", stopped_run, "--steps", 6)
    assert f"cannot write {stopped_run / checkpoint.FILE}" in msg and "free some space" in msg
    assert (stopped_run / checkpoint.FILE).read_bytes() == good
    assert not list(stopped_run.glob(".*.tmp"))


# ---- data files ---------------------------------------------------------------------------------------------
def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_numeric_labels_are_one_class_however_written(tmp_path, assets):  # noqa: F811
    rows = [{"text": f"good {i}", "label": [0, 0.0, "0", 1, 1.0, "1.0"][i % 6]} for i in range(60)]
    mixed = tmp_path / "mixed.jsonl"
    msg = fails("train", "--model", assets["bert"], "--task", write(mixed, rows), "--out", tmp_path / "r")
    assert "line 3: the label '0' is text, but the label on line 1 is a number" in msg
    numbers = [{"text": r["text"], "label": float(r["label"])} if i % 2 else {"text": r["text"], "label": int(float(
        r["label"]))} for i, r in enumerate(rows)]
    code, out, err = run_cli("train", "--model", assets["bert"], "--task", write(tmp_path / "n.jsonl", numbers),
                             "--steps", 1, "--no-eval-before", "--out", tmp_path / "r")
    assert code == 0 and "labels 0, 1" in out, err
    booleans = [{"text": "x", "label": True}, {"text": "y", "label": "no"}] * 10
    msg = fails("train", "--model", assets["bert"], "--task", write(tmp_path / "b.jsonl", booleans), "--out",
                tmp_path / "r2")
    assert "line 2: the label 'no' is text, but the label on line 1 is true/false" in msg


def test_a_label_only_in_the_held_out_part_is_an_error(tmp_path, assets):  # noqa: F811
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(40)] + [{"text": "rare", "label": "c"}]
    path = write(tmp_path / "rare.jsonl", rows)
    for seed in range(50):  # a split seed that puts the one "c" in the test part
        code, _, err = run_cli("train", "--model", assets["bert"], "--task", path, "--split-seed", seed,
                               "--steps", 1, "--no-eval-before", "--out", tmp_path / f"r{seed}")
        if code == 2:
            assert "label(s) c occur only in the held-out --test-size part" in err
            return
    pytest.fail("no split put the rare label in the test part")


def test_a_spreadsheet_csv_with_a_byte_order_mark_and_a_bad_byte_by_line(tmp_path, assets):  # noqa: F811
    rows = "".join(f"text {i},{'pos' if i % 2 else 'neg'}\r\n" for i in range(40))
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(b"\xef\xbb\xbftext,label\r\n" + rows.encode())
    code, out, err = run_cli("train", "--model", assets["bert"], "--task", csv_path, "--steps", 1,
                             "--no-eval-before", "--out", tmp_path / "r")
    assert code == 0 and "labels neg, pos" in out, err
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    msg = fails("train", "--model", assets["bert"], "--task", bad, "--out", tmp_path / "r2")
    assert "latin1.jsonl: line 2, column 14: byte 0xe9 is not UTF-8" in msg


def test_vera_and_dvora_rank_may_exceed_the_layer_dimensions():
    import copy

    import dorafit

    from .conftest import Wrapper, randomize_adapter, reference_weight

    torch.manual_seed(0)
    base = Wrapper(torch.nn.Linear(10, 6)).double()
    for method in ("vera", "dvora"):
        model = copy.deepcopy(base)
        dorafit.apply(model, dorafit.AdapterConfig(method=method, r=16, targets=["layer"]))  # r > min(10, 6)
        randomize_adapter(model)
        x = torch.randn(4, 10, dtype=torch.float64)
        dense = reference_weight(model.layer, base.layer.weight, detach_norm=True)
        torch.testing.assert_close(model(x), torch.nn.functional.linear(x, dense, base.layer.bias))
    with pytest.raises(ValueError, match="rank r=16 is larger than module"):
        dorafit.apply(copy.deepcopy(base), dorafit.AdapterConfig(method="lora", r=16, targets=["layer"]))


# ---- the library -------------------------------------------------------------------------------------------
def _adapted_pair():
    import dorafit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Conv1d(5, 4, 3, padding=1))
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, alpha=3, targets=["0", "1"]))
    from .conftest import randomize_adapter

    randomize_adapter(model)
    return model.eval()


def run_pair(model, x):
    return model[1](model[0](x).transpose(1, 2))


def test_an_adapted_model_pickles_deep_copies_and_saves_whole():
    import copy
    import io
    import pickle

    model = _adapted_pair()
    x = torch.randn(2, 7, 6)
    want = run_pair(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(other[0]).__name__ == "AdaptedLinear" and other[0].dorafit.update == "lora"
        torch.testing.assert_close(run_pair(other, x), want, rtol=0, atol=0)


def test_a_merged_models_state_loads_into_an_unmerged_one_and_back():
    import copy

    import dorafit

    model = _adapted_pair()
    x = torch.randn(2, 7, 6)
    want = run_pair(model, x)
    merged = copy.deepcopy(model)
    dorafit.merge(merged)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(merged.state_dict(), strict=True)  # the state holds W0 whether merged or not
    torch.testing.assert_close(run_pair(fresh, x), want, rtol=1e-5, atol=1e-6)
    merged.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(run_pair(merged, x), want, rtol=1e-5, atol=1e-6)


def test_shape_inference_on_the_meta_device():
    import copy

    model = copy.deepcopy(_adapted_pair()).to("meta")
    out = run_pair(model, torch.empty(2, 7, 6, device="meta"))
    assert out.shape == (2, 4, 7) and out.is_meta
