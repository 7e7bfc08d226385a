"""Atomic file and folder writes, with the permissions the umask gives.

A file is written into a temporary folder beside it, fsynced, then renamed over the target; a folder
(:func:`atomic_folder`) is written into a temporary folder beside it, then renamed. A reader (or a run restarted
after kill -9) sees either the old file or the new one, never half of one. Everything written gets the permissions
an ordinary ``open(path, "w")`` or ``mkdir`` would give (0666 / 0777 less the umask, :func:`umask_permissions`), not
the private 0600 / 0700 of temporary files (``mkstemp``, ``mkdtemp``, and transformers' ``save_pretrained``, which
writes ``model.safetensors`` through one). A failed write (full disk, read-only folder) removes its temporary folder
and raises an OSError whose message names the file and says what to do. Temporary files and folders a killed process
left behind (``.NAME.*.tmp``) are found by :func:`stale_temporary_files`. A cache folder that several processes may
want at once is built by :func:`cached_folder`: one builds it, under a lock file, the others wait and use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` (Linux) without changing it: setting it to read it back
    would, for that moment, let files other threads create get every permission bit. Elsewhere it is set and
    restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
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


def umask_permissions(path: str | os.PathLike) -> None:
    """Give ``path``, and for a folder everything under it, the permissions the umask gives a new file or folder:
    0777 less the umask for folders and executable files, 0666 less the umask for other files (links untouched)."""
    mask = current_umask()
    root = Path(path)
    for item in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
        if item.is_symlink():
            continue
        full = 0o777 if item.is_dir() or item.stat().st_mode & 0o111 else 0o666
        os.chmod(item, full & ~mask)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Write the folder ``dest`` all at once: yields a temporary folder beside it to write into; when the block
    ends without an error the folder gets the umask's permissions (:func:`umask_permissions`) and is renamed to
    ``dest``, replacing a folder already there. On an error the temporary folder is removed and ``dest`` is left
    as it was."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        raise io_error(exc, dest, "write") from None
    try:
        yield work
        umask_permissions(work)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(work, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _fsync_dir(dest.parent)


def cached_folder(target: str | os.PathLike, build: Callable[[Path], None], complete: str = "config.json") -> Path:
    """``target``, built by ``build(folder)`` unless it is complete already (holds the file ``complete``).

    Safe when several processes want it at once: the build runs under a lock file beside it (``.NAME.lock``, the
    ``filelock`` package, as the Hugging Face cache uses); a process that finds the lock taken says so, waits,
    and then uses the folder the other built. ``build`` writes into a temporary folder (:func:`atomic_folder`),
    so a build that is killed or fails leaves no half-written ``target``."""
    from filelock import FileLock, Timeout

    target = Path(target)
    if (target / complete).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(target.with_name(f".{target.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process that is building {target}", file=sys.stderr, flush=True)
            lock.acquire()
    except OSError as exc:
        raise io_error(exc, target, "build") from None
    try:
        if not (target / complete).is_file():
            with atomic_folder(target) as work:
                build(work)
    finally:
        lock.release()
    return target


def atomic_write_figure(path: str | os.PathLike, fig) -> None:
    """A matplotlib figure as a PNG (120 dpi), written atomically like :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_bytes(path: str | os.PathLike, data: bytes | list) -> None:
    """``data`` (bytes, or a list of bytes-like pieces written in order) written atomically
    (:func:`atomic_write_with`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for piece in data if isinstance(data, list) else [data]:
                f.write(piece)

    atomic_write_with(path, write)


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` creates the file ``tmp``, of ``path``'s name in a new temporary folder beside ``path``
    (``.NAME.*.tmp``: a library that writes through its own temporary file and a rename, as safetensors'
    ``save_file`` does, leaves that inside it too); the file is then synced and renamed over ``path``, and the
    folder removed. A failure, or a signal, leaves ``path`` as it was and removes the temporary folder; an OSError
    becomes one :class:`FileError` line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    except OSError as exc:
        raise io_error(exc, path, "write") from None
    tmp = work / path.name
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise io_error(exc, path, "write") from None
        raise
    work.rmdir()
    _fsync_dir(path.parent)


def stale_temporary_files(folder: Path) -> list[Path]:
    """Temporary files and folders of atomic writes left in ``folder`` by a process killed while writing."""
    return sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))


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
