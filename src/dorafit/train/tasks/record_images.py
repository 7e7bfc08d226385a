"""The images of image-chat records: LLaVA's convention, checked when the records are read.

A record in the OpenAI ``messages`` (or ShareGPT ``conversations``) format carries its images in ``"images"``: a
list, one entry per ``<image>`` placeholder in its user turns, in the order the placeholders appear (LLaVA's own
single ``"image"`` is accepted as a list of one). An entry is

* a path (string), relative to the data file's folder (or absolute);
* an object ``{"bytes": ..., "path": ...}`` (how the ``datasets`` library stores an ``Image`` column in Parquet):
  the bytes if present, else the path;
* a ``PIL.Image`` (rows of a Hub data set with an ``Image`` column).

Every image is opened with Pillow when the records are read, so a missing, unreadable or damaged image, or a
record whose placeholders and images differ in number, is one error naming the record, before anything trains.
Images given as paths are read again (as RGB) when a batch is built, so a large data set is not held in memory.
"""

from __future__ import annotations

import io
from pathlib import Path

from .base import DataError, clip

PLACEHOLDER = "<image>"
IMAGE_KEYS = ("images", "image")


def has_images(record: dict) -> bool:
    return any(key in record for key in IMAGE_KEYS)


def placeholders(messages: list[dict]) -> int:
    """How many ``<image>`` placeholders the conversation's turns hold."""
    return sum(m["content"].count(PLACEHOLDER) for m in messages)


def read_images(record: dict, folder: Path | None, where: str, line: str) -> list:
    """The record's images, each checked with Pillow: paths (resolved against ``folder``) or in-memory images."""
    value = record.get("images", record.get("image"))
    entries = [value] if isinstance(value, (str, dict)) or _is_pil(value) else value
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise DataError(f"{where}: \"images\" must be a list of image paths: {clip(line)}")
    return [_image(entry, folder, where, i, line) for i, entry in enumerate(entries)]


def check_count(messages: list[dict], images: list, where: str, line: str) -> None:
    count = placeholders(messages)
    if count != len(images):
        raise DataError(f"{where}: {count} {PLACEHOLDER} placeholder(s) in the turns but {len(images)} image(s); "
                        f"put one {PLACEHOLDER} where each image goes in the user turns, in the order of \"images\": "
                        f"{clip(line)}")


def load_rgb(image):
    """An RGB ``PIL.Image`` of an entry :func:`read_images` returned (see :func:`to_rgb`)."""
    from PIL import Image

    if isinstance(image, Path):
        with Image.open(image) as opened:
            return to_rgb(opened)
    return to_rgb(image)


def to_rgb(image):
    """An RGB copy of a ``PIL.Image`` as a vision processor expects it: 16-bit (and 32-bit integer) grayscale
    scaled to 8 bits (a plain ``convert("RGB")`` clips it, turning most of the picture white), transparency
    composited onto white (transformers' ``convert_to_rgb``, what its image processors do)."""
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    if image.mode.startswith("I"):
        image = image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


def image_errors() -> tuple:
    """What Pillow raises for data that is not a readable image: an unknown format, damaged or truncated data,
    more pixels than its decompression-bomb limit."""
    from PIL import Image, UnidentifiedImageError

    return UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError


def _is_pil(value) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(value, Image.Image)


def _image(entry, folder: Path | None, where: str, index: int, line: str):
    from PIL import Image

    what = f"{where}: image {index}"
    if _is_pil(entry):
        return entry
    if isinstance(entry, dict) and entry.get("bytes"):
        try:
            with Image.open(io.BytesIO(entry["bytes"])) as image:
                image.load()
                return image.copy()
        except image_errors() as exc:
            raise DataError(f"{what}: its bytes are not a readable image ({exc})") from None
    if isinstance(entry, dict) and isinstance(entry.get("path"), str):
        entry = entry["path"]
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{what} must be a path (a string): {clip(line)}")
    path = Path(entry).expanduser()
    relative_to_file = not path.is_absolute() and folder is not None
    if relative_to_file:
        path = folder / path
    if not path.is_file():
        hint = " (a relative path is read from the data file's folder)" if relative_to_file else ""
        raise DataError(f"{what}: {path} does not exist{hint}")
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated or damaged image fails here, not mid-training
    except image_errors() as exc:
        raise DataError(f"{what}: {path} is not a readable image ({exc}); replace or remove it") from None
    return path.resolve()
