"""Folders written at once (merged models, caches): the umask's permissions on every file, and cache builds that
several processes may start at the same time (one builds, the others wait and use its folder)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from dorafit.files import atomic_folder, cached_folder
from dorafit.train import models
from dorafit.train.runner import save_model_folder


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in sorted(folder.rglob("*"))}


class _Tokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer_config.json").write_text("{}")


def test_a_saved_model_folder_gets_the_umasks_permissions(tmp_path, umask_022):
    """transformers' save_pretrained writes model.safetensors 0600 (through a private temporary file)."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    dest = save_model_folder(model, _Tokenizer(), tmp_path / "merged")
    found = modes(dest)
    assert "model.safetensors" in found and set(found.values()) == {0o644}
    assert dest.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary folder left


def _slow_build(calls: list, seconds: float = 0.5):
    def build(folder: Path) -> None:
        calls.append(threading.current_thread().name)
        fd, tmp = tempfile.mkstemp(dir=folder)  # a private file, as libraries write them
        os.close(fd)
        os.replace(tmp, folder / "weights.bin")
        time.sleep(seconds)  # the other thread arrives meanwhile
        (folder / "config.json").write_text("{}")
    return build


def _at_once(fn, n: int = 2) -> list:
    results, errors = [None] * n, []

    def one(i):
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), name=f"builder{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_two_builders_of_one_cache_both_succeed_and_one_builds(tmp_path, umask_022):
    calls = []
    target = tmp_path / "cache" / "model"
    results = _at_once(lambda: cached_folder(target, _slow_build(calls)))
    assert results == [target, target] and len(calls) == 1
    assert modes(target) == {"config.json": 0o644, "weights.bin": 0o644}
    assert cached_folder(target, _slow_build(calls)) == target and len(calls) == 1  # complete: not rebuilt


def test_a_failed_build_leaves_no_folder_and_the_next_call_builds(tmp_path):
    target = tmp_path / "model"

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        cached_folder(target, broken)
    assert not target.exists() and not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    calls = []
    assert cached_folder(target, _slow_build(calls, 0)) == target and (target / "config.json").is_file()


def test_an_incomplete_folder_is_replaced(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale").write_text("x")
    cached_folder(target, _slow_build([], 0))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]


def test_the_gemma_cache_is_built_once_by_concurrent_runs(tmp_path, monkeypatch):
    """The preset's conversion (a minute) replaced by a slow fake: two runs asking at once both get the folder."""
    calls = []
    monkeypatch.setenv("DORAFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_require", lambda *a: None)
    monkeypatch.setattr(models, "_convert_gemma", _slow_build(calls))
    assert _at_once(models.gemma_folder) == [tmp_path / "gemma-3-270m"] * 2 and len(calls) == 1


def test_atomic_folder_replaces_an_existing_folder_whole(tmp_path):
    dest = tmp_path / "out"
    with atomic_folder(dest) as work:
        (work / "a").write_text("1")
    with atomic_folder(dest) as work:
        (work / "b").write_text("2")
    assert [p.name for p in dest.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_current_umask_is_read_without_changing_it():
    import os

    from dorafit.files import current_umask

    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what was set: reading it did not change it
    finally:
        os.umask(previous)
