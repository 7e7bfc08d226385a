"""safetensors files sealed by a SHA-256 of all their bytes, stored in the file itself.

:func:`write_sealed` writes tensors and string metadata with one more metadata entry, ``sha256``, first written as
64 zeros; the digest of the whole file (header: names, dtypes, shapes, offsets and metadata; then every tensor
byte) is then written over the zeros, which keeps every offset. :func:`unseal` undoes it: it finds the digest in the
header, writes the zeros back, and checks the digest of the result, so a flipped bit anywhere, in a tensor or in a
digit of the metadata, is detected. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor

from .files import atomic_write_with

KEY = "sha256"
_ZEROS = b"0" * 64
_FIELD = b'"' + KEY.encode() + b'":"'
_BLOCK = 1 << 20  # bytes read at a time for the digest


class SealError(ValueError):
    """A sealed file that is damaged or not sealed; the message says which (the caller names the file)."""


def _header(blob: bytes) -> tuple[int, bytes]:
    if len(blob) < 8:
        raise SealError("it is too short to be a safetensors file")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise SealError("its header length is out of range")
    return n, blob[8 : 8 + n]


def _seal_at(header: bytes) -> int:
    """Where the 64 zeros of the digest start in a header (offset in the header)."""
    at = header.find(_FIELD + _ZEROS)
    if at < 0 or header.find(_FIELD, at + 1) >= 0:
        raise RuntimeError("the seal's place in the safetensors header was not found exactly once")
    return at + len(_FIELD)


def write_sealed(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """The sealed file written atomically (:func:`dorafit.files.atomic_write_with`) without its bytes ever held in
    memory (a checkpoint's optimizer state is twice the adapter): safetensors writes every tensor straight from its
    storage (``save_file``), the file is read back a block at a time for its digest, which is written over the
    zeros in place."""

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata={**metadata, KEY: _ZEROS.decode()})
        except SafetensorError as exc:  # a failed write names its OS error only in the text: "(os error 28)"
            code = re.search(r"\(os error (\d+)\)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
        with open(tmp, "rb+") as f:
            head = f.read(8)
            head += f.read(int.from_bytes(head, "little"))
            start = 8 + _seal_at(_header(head)[1])
            f.seek(0)
            digest = hashlib.sha256()
            while block := f.read(_BLOCK):
                digest.update(block)
            f.seek(start)
            f.write(digest.hexdigest().encode())

    atomic_write_with(path, write)


def is_sealed(blob: bytes) -> bool:
    try:
        return _FIELD in _header(blob)[1]
    except SealError:
        return False


def unseal(blob: bytes) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata without the seal, tensors) of a sealed file's bytes; SealError if any byte differs."""
    _, header = _header(blob)
    at = header.find(_FIELD)
    if at < 0:
        raise SealError("it carries no SHA-256 seal")
    start = 8 + at + len(_FIELD)
    stored = blob[start : start + 64]
    view = memoryview(blob)  # the digest of the file with the zeros back, without a copy of it
    digest = hashlib.sha256(view[:start])
    digest.update(_ZEROS)
    digest.update(view[start + 64 :])
    if digest.hexdigest().encode() != stored:
        raise SealError("its SHA-256 does not match its contents: the file is damaged")
    try:
        metadata = json.loads(header.decode("utf-8")).get("__metadata__", {})
        tensors = load_bytes(blob)
    except Exception as exc:  # noqa: BLE001 - json and safetensors raise several types
        raise SealError(f"it cannot be parsed ({exc})") from None
    metadata.pop(KEY, None)
    return metadata, tensors
