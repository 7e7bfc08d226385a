"""dorafit.sealed: a sealed file written to disk without its bytes held in memory."""

from __future__ import annotations

import errno
import tracemalloc

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dorafit import files, sealed
from dorafit.train import rundir


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"param/a": torch.randn(1024, 1024, generator=g), "optim/0/exp_avg": torch.randn(300, generator=g),
            "b16": torch.randn(7, 3, generator=g).bfloat16(), "step": torch.tensor(3.0)}


def test_written_file_is_the_sealed_bytes_and_unseals(tmp_path):
    tensors, metadata = _tensors(), {"state": '{"step": 3}'}
    path = tmp_path / "checkpoint.safetensors"
    tracemalloc.start()
    sealed.write_sealed(path, tensors, metadata)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 2**20 + 2**20  # the digest's 1 MiB block, not the file's 4 MiB
    blob = path.read_bytes()
    got_meta, got = sealed.unseal(blob)  # checks the digest
    assert got_meta == metadata and got.keys() == tensors.keys()
    plain = load_file(path)  # an ordinary safetensors file
    for name, t in tensors.items():
        assert torch.equal(got[name], t) and torch.equal(plain[name], t)
    assert list(tmp_path.iterdir()) == [path]  # the temporary folder is gone
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(sealed.SealError, match="SHA-256 does not match"):
        sealed.unseal(bytes(damaged))


def test_a_failed_write_names_the_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    sealed.write_sealed(path, _tensors(), {})
    good = path.read_bytes()

    def full(tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{filename}"')

    monkeypatch.setattr(sealed, "save_file", full)
    with pytest.raises(files.FileError) as caught:
        sealed.write_sealed(path, {"x": torch.zeros(3)}, {})
    assert caught.value.errno == errno.ENOSPC and "free some space" in str(caught.value)
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]


def test_a_temporary_folder_left_by_a_killed_write_is_removed(tmp_path):
    (tmp_path / ".checkpoint.safetensors.abc.tmp").mkdir()
    (tmp_path / ".checkpoint.safetensors.abc.tmp" / ".tmpXYZ123").write_bytes(b"half")
    (tmp_path / ".eval.json.def.tmp").write_text("{")
    removed = rundir.remove_leftovers(tmp_path)
    assert len(removed) == 2 and not list(tmp_path.iterdir())
