"""Images into a vision-language model's inputs: placeholder tokens expanded, pixels batched.

A conversation is rendered and tokenized as text, each image standing as the processor's image token (LLaVA:
``<image>``; records write ``<image>`` whatever the model's token is). :meth:`ImageInputs.expand` then replaces
each image token by the tokens the processor gives that image (LLaVA: the image token repeated once per visual
feature, e.g. 9 for a 3 x 3 feature map), and :meth:`ImageInputs.pixels` batches the images as the processor's
image processor prepares them. The model puts the projected image features in place of those tokens, in order, so
the expanded ids and the pixels of one batch list the images in the same order.
"""

from __future__ import annotations

from pathlib import Path

from ..tasks.base import DataError
from ..tasks.record_images import PLACEHOLDER, load_rgb, placeholders


#: image sizes whose token expansion :meth:`ImageInputs.tokens` keeps at once
MAX_SIZES = 1024


class ImageInputs:
    """How one processor turns images into tokens and pixels."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", None) or PLACEHOLDER
        ids = self.tokenizer(self.image_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise DataError(f"the processor's image token {self.image_token!r} is {len(ids)} tokens of its tokenizer, "
                            "not one; add it as a special token (tokenizer.add_special_tokens) and save the processor")
        self.image_token_id = ids[0]
        self._tokens_by_size: dict[tuple, list[int]] = {}

    def text(self, content: str) -> str:
        """A turn's text with each ``<image>`` placeholder written as the processor's image token."""
        return content if self.image_token == PLACEHOLDER else content.replace(PLACEHOLDER, self.image_token)

    def messages(self, messages: list[dict]) -> list[dict]:
        return [{**m, "content": self.text(m["content"])} for m in messages]

    def tokens(self, image) -> list[int]:
        """The tokens that stand for ``image`` in the model's input (computed once per image size; an image file's
        size is read from its header, its pixels only decoded for a size not seen before)."""
        key = image_size(image)
        if key not in self._tokens_by_size:
            if len(self._tokens_by_size) >= MAX_SIZES:  # a server meets endless sizes: keep the memo bounded
                self._tokens_by_size.clear()
            out = self.processor(text=[self.image_token], images=[load_rgb(image)], add_special_tokens=False)
            self._tokens_by_size[key] = list(out["input_ids"][0])
        return self._tokens_by_size[key]

    def extra_tokens(self, images: list) -> int:
        """How many tokens expanding these images adds to the text's."""
        return sum(len(self.tokens(image)) - 1 for image in images)

    def count(self, ids: list[int]) -> int:
        return sum(1 for i in ids if i == self.image_token_id)

    def shown(self, ids: list[int], images: list) -> list:
        """The images whose tokens ``ids`` still holds, a prompt cut from its start having lost the others' (the
        last ones); an error if ``ids`` holds more image tokens than there are images."""
        shown = self.count(ids)
        if shown > len(images):
            raise ValueError(f"the prompt holds {shown} image token(s) ({self.image_token!r}) but {len(images)} "
                             f"image(s) are given; put one {PLACEHOLDER} where each image goes")
        return images[len(images) - shown:] if shown else []

    def expand(self, ids: list[int], flags: list[bool], images: list) -> tuple[list[int], list[bool]]:
        """``ids`` (and per-token ``flags``) with the k-th image token replaced by the k-th image's tokens (their
        flags False: image tokens are never trained)."""
        if self.count(ids) != len(images):
            raise DataError(f"{self.count(ids)} image token(s) in the text but {len(images)} image(s)")
        out_ids, out_flags, k = [], [], 0
        for token, flag in zip(ids, flags):
            if token == self.image_token_id:
                expansion = self.tokens(images[k])
                out_ids += expansion
                out_flags += [False] * len(expansion)
                k += 1
            else:
                out_ids.append(token)
                out_flags.append(flag)
        return out_ids, out_flags

    def pixels(self, images: list, dtype=None) -> dict:
        """The image processor's tensors (``pixel_values``, ...) of ``images`` in order, floating ones in ``dtype``
        (the model's; default: as the processor makes them); {} for none."""
        if not images:
            return {}
        out = self.processor.image_processor(images=[load_rgb(i) for i in images], return_tensors="pt")
        return {key: value.to(dtype) if dtype is not None and value.is_floating_point() else value
                for key, value in out.items()}

    def prompt(self, ids: list[int], images: list) -> list[int]:
        """Prompt tokens with their image tokens expanded (:meth:`expand` without flags)."""
        return self.expand(ids, [False] * len(ids), images)[0]


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or an image file (from its header)."""
    if isinstance(image, Path):
        from PIL import Image

        with Image.open(image) as opened:
            return opened.size
    return image.size


def with_placeholders(text: str, count: int) -> str:
    """``text`` with ``count`` ``<image>`` placeholders in front (LLaVA's convention), unless it places them itself;
    an error if it holds some, but not one per image."""
    found = text.count(PLACEHOLDER)
    if found == 0:
        return PLACEHOLDER * count + ("\n" if count else "") + text
    _check_count(found, count)
    return text


def messages_with_placeholders(messages: list[dict], count: int) -> list[dict]:
    """:func:`with_placeholders` for a conversation: ``count`` placeholders in front of its last turn unless its
    turns place them; an error if they hold some, but not one per image."""
    found = placeholders(messages)
    if found == 0:
        return [*messages[:-1], {**messages[-1], "content": with_placeholders(messages[-1]["content"], count)}]
    _check_count(found, count)
    return messages


def _check_count(found: int, count: int) -> None:
    if found != count:
        raise ValueError(f"the prompt holds {found} {PLACEHOLDER} placeholder(s) but {count} image(s) are given; "
                         f"put one {PLACEHOLDER} where each image goes, or none (the images then come first)")
