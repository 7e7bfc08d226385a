"""safetensors files sealed by a SHA-256 of all their bytes, stored in the file itself.

:func:`seal` serialises tensors and string metadata with one more metadata entry, ``sha256``, first written as 64
zeros; the digest of that whole byte string (header: names, dtypes, shapes, offsets and metadata; then every tensor
byte) is then written over the zeros, which keeps every offset. :func:`unseal` undoes it: it finds the digest in the
header, writes the zeros back, and checks the digest of the result, so a flipped bit anywhere, in a tensor or in a
digit of the metadata, is detected. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json

from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

KEY = "sha256"
_ZEROS = b"0" * 64
_FIELD = b'"' + KEY.encode() + b'":"'


class SealError(ValueError):
    """A sealed file that is damaged or not sealed; the message says which (the caller names the file)."""


def _header(blob: bytes) -> tuple[int, bytes]:
    if len(blob) < 8:
        raise SealError("it is too short to be a safetensors file")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise SealError("its header length is out of range")
    return n, blob[8 : 8 + n]


def seal(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    return b"".join(sealed_pieces(tensors, metadata))


def sealed_pieces(tensors: dict[str, Tensor], metadata: dict[str, str]) -> list:
    """The sealed file as three pieces to write in order (views of one serialised copy: a checkpoint's bytes are
    held once, not copied to patch in the digest)."""
    blob = save_bytes(tensors, metadata={**metadata, KEY: _ZEROS.decode()})
    _, header = _header(blob)
    at = header.find(_FIELD + _ZEROS)
    if at < 0 or header.find(_FIELD, at + 1) >= 0:
        raise RuntimeError("the seal's place in the safetensors header was not found exactly once")
    digest = hashlib.sha256(blob).hexdigest().encode()
    start = 8 + at + len(_FIELD)
    view = memoryview(blob)
    return [view[:start], digest, view[start + 64 :]]


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
    zeroed = blob[:start] + _ZEROS + blob[start + 64 :]
    if hashlib.sha256(zeroed).hexdigest().encode() != stored:
        raise SealError("its SHA-256 does not match its contents: the file is damaged")
    try:
        metadata = json.loads(header.decode("utf-8")).get("__metadata__", {})
        tensors = load_bytes(blob)
    except Exception as exc:  # noqa: BLE001 - json and safetensors raise several types
        raise SealError(f"it cannot be parsed ({exc})") from None
    metadata.pop(KEY, None)
    return metadata, tensors
