"""Images in chat requests: OpenAI's content parts read into a vision-language model's prompt and pixels.

A message's ``content`` may be a list of parts, in order: ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` (``detail`` is accepted and ignored). The text
is the parts joined in order, each image part written as the processor's image token, and a ``"\\n"`` between an
image part and a text part that follows it (LLaVA's ``<image>\\nQuestion`` convention, which ``dorafit generate
--image`` writes too). The chat format renders and tokenizes that text; :meth:`ImageReader.prompt` then expands
each image token into that image's tokens (:class:`dorafit.train.vlm.inputs.ImageInputs`) and prepares the pixels.

An image's URL is

* ``data:[MEDIA-TYPE];base64,DATA``: decoded with the standard library, opened with Pillow;
* ``http://`` or ``https://``: refused unless the server allows remote images (``--allow-remote-images``); then
  fetched with the standard library, at most ``max_bytes`` bytes within ``timeout_s`` seconds.

An image larger than ``max_pixels`` (width x height, read from its header before its pixels are decoded) is
refused. Every failure is one 400 naming the part (``messages[i].content[j]``), and the server stays up.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..train.tasks.record_images import image_errors, to_rgb
from .errors import ApiError

DEFAULT_MAX_PIXELS = 4096 * 4096
REMOTE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ImageOptions:
    """What the server accepts as request images."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height of one decoded image
    allow_remote: bool = False  # fetch http(s):// URLs
    max_bytes: int = 4 * 1024 * 1024  # of one fetched image (a data: URL is bounded by the body limit)
    timeout_s: float = REMOTE_TIMEOUT_S  # to fetch one remote image


@dataclass(frozen=True)
class ImagePart:
    """One ``image_url`` part: its URL and where it stands in the request (for error messages)."""

    url: str
    param: str  # "messages[i].content[j]"


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, "invalid_image")


def content_text(content: list, i: int, image_token: str | None, model: str) -> tuple[str, list[ImagePart]]:
    """Message ``i``'s list of content parts as text (each image part as ``image_token``, see the module
    docstring) and its image parts; a 400 naming the part for a malformed one, and for an image part when
    ``image_token`` is None (a text-only model, named ``model``)."""
    text, parts, after_image = [], [], False
    for j, part in enumerate(content):
        param = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(("\n" if after_image else "") + part["text"])
            after_image = False
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else None
            if not isinstance(url, str) or not url:
                raise _bad(param, "an image_url part must be {\"type\": \"image_url\", \"image_url\": {\"url\": "
                                  "\"data:image/png;base64,...\"}}")
            if image_token is None:
                raise ApiError(400, f"{param}: the model '{model}' reads text only; images need a vision-language "
                                    "model", param, "invalid_image")
            text.append(image_token)
            parts.append(ImagePart(url, param))
            after_image = True
        else:
            raise ApiError(400, f"{param}: a content part must be {{\"type\": \"text\", \"text\": ...}} or "
                                f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}", param,
                           "invalid_value")
    return "".join(text), parts


class ImageReader:
    """Reads request images for one vision-language model (``inputs``: its processor's :class:`ImageInputs`;
    ``dtype``: of its floating weights, for the pixels)."""

    def __init__(self, inputs, options: ImageOptions, dtype=None):
        self.inputs, self.options, self.dtype = inputs, options, dtype

    @property
    def image_token(self) -> str:
        return self.inputs.image_token

    def read(self, parts: list[ImagePart]) -> list:
        """The parts' images as RGB ``PIL.Image`` s, in order (blocking: remote ones are fetched)."""
        return [self._decode(self._bytes(part), part.param) for part in parts]

    def prompt(self, ids: list[int], images: list, param: str = "messages") -> tuple[list[int], dict]:
        """(the prompt's ids with each image token expanded into its image's tokens, the pixel inputs); a 400 if
        the text holds image tokens of its own (the count differs from the images')."""
        found = self.inputs.count(ids)
        if found != len(images):
            raise ApiError(400, f"'{param}' holds {found} image token(s) ({self.image_token!r}) but the request has "
                                f"{len(images)} image_url part(s); send each image as an image_url part of a chat "
                                f"message, and no {self.image_token!r} in the text", param, "invalid_value")
        if not images:
            return ids, {}
        return self.inputs.prompt(ids, images), self.inputs.pixels(images, self.dtype)

    # ---- one image -------------------------------------------------------------------------------------------
    def _bytes(self, part: ImagePart) -> bytes:
        url = part.url
        if url.startswith("data:"):
            header, comma, payload = url.partition(",")
            if not comma or not header.endswith(";base64"):
                raise _bad(part.param, "a data: URL must be data:image/...;base64,<base64 data>")
            try:
                return base64.b64decode("".join(payload.split()), validate=True)  # base64's line breaks allowed
            except (binascii.Error, ValueError):
                raise _bad(part.param, "the data: URL's data is not valid base64") from None
        if url.startswith(("http://", "https://")):
            if not self.options.allow_remote:
                raise _bad(part.param, "remote image URLs are not fetched by this server; send the image inline as "
                                       "a data:image/...;base64 URL (or start the server with --allow-remote-images)")
            return self._fetch(url, part.param)
        raise _bad(part.param, "an image URL must be a data:image/...;base64 URL"
                   + (" or an http(s):// URL" if self.options.allow_remote else ""))

    def _fetch(self, url: str, param: str) -> bytes:
        limit = self.options.max_bytes
        try:
            with urllib.request.urlopen(url, timeout=self.options.timeout_s) as response:  # noqa: S310 - http(s)
                data = response.read(limit + 1)
        except urllib.error.HTTPError as exc:
            raise _bad(param, f"fetching {url} failed: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _bad(param, f"fetching {url} failed: {reason}") from None
        if len(data) > limit:
            raise _bad(param, f"the image at {url} is larger than the server's limit of {limit} bytes")
        return data

    def _decode(self, data: bytes, param: str):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > self.options.max_pixels:
                    raise _bad(param, f"the image is {width} x {height} pixels, more than this server's limit of "
                                      f"{self.options.max_pixels} (--max-image-pixels)")
                image.load()  # every pixel decoded: a truncated image fails here
                return to_rgb(image)
        except image_errors() as exc:
            raise _bad(param, f"not a readable image ({exc})") from None
