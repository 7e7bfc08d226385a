"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target.

A reader (or a run restarted after kill -9) sees either the old file or the new one, never half of one. The file
gets the permissions an ordinary ``open(path, "w")`` would give (0666 less the umask), not the temporary file's
private 0600. A failed write (full disk, read-only folder) removes its temporary file and raises an OSError whose
message names the file and says what to do. Temporary files a killed process left behind (``.NAME.*.tmp``) are
found by :func:`stale_temporary_files`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FileError(OSError):
    """An OSError whose text is a whole sentence for the user (the path, what failed, what to do)."""

    def __str__(self) -> str:
        return self.strerror


def io_error(exc: OSError, path, doing: str) -> FileError:
    """An OSError whose message names the path and the remedy (for the one-line ``error:`` report)."""
    if isinstance(exc, FileError):
        return exc
    why = exc.strerror or str(exc)
    remedy = {errno.ENOSPC: "free some space on that disk or choose another folder",
              errno.EDQUOT: "free some space on that disk or choose another folder",
              errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
              errno.EACCES: "you lack permission there: choose another folder or change its permissions",
              errno.EPERM: "you lack permission there: choose another folder or change its permissions"}
    hint = remedy.get(exc.errno, "check the path and the disk")
    return FileError(exc.errno, f"cannot {doing} {path}: {why}; {hint}")


def atomic_write_figure(path: str | os.PathLike, fig) -> None:
    """A matplotlib figure as a PNG (120 dpi), written atomically like :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise io_error(exc, path, "write") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise io_error(exc, path, "write") from None
        raise
    _fsync_dir(path.parent)


def stale_temporary_files(folder: Path) -> list[Path]:
    """Temporary files of :func:`atomic_write_bytes` left in ``folder`` by a process killed while writing."""
    return sorted(p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file())


def check_writable(folder: Path) -> None:
    """An OSError naming the folder unless a file can be created (and removed) in it now, or, if it does not
    exist yet, in the nearest folder above it that does (nothing is left behind)."""
    probe_in = Path(folder).absolute()
    while not probe_in.exists() and probe_in.parent != probe_in:
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe_in} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=TEMP_SUFFIX, dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise io_error(exc, folder, "write to") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
