"""Visual instruction tuning: image-chat records with a vision-language model (LLaVA's recipe).

Data: OpenAI ``messages`` (or ShareGPT) records with an ``"images"`` list and one ``<image>`` placeholder per
image in the user turns (:mod:`.record_images`), in a ``.jsonl`` or ``.parquet`` file or a Hub data set; or a
preset. The model: a vision-language model folder (:mod:`dorafit.train.vlm`). Everything else is instruction
tuning (:mod:`.instruction`): the chat template, the loss on the assistant turns only, held-out loss, greedy
generations scored by exact match and ROUGE-L.

Each image becomes the tokens its processor gives it (:class:`dorafit.train.vlm.inputs.ImageInputs`); they count
towards ``--max-length``, are never trained, and are kept whole: a conversation too long for ``--max-length`` loses
its oldest prompt text first, and an image whose tokens no longer fit is dropped with them (a training example left
with no response token is skipped, as for text).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ...chat_format import ChatFormatError, EncodeStats
from .. import models, precision
from ..vlm.inputs import ImageInputs
from . import fashion_vqa
from .base import DataError, TaskData
from .instruction import InstructionTask
from .registry import register


@register
class ImageChatTask(InstructionTask):
    kind = "image-instruction"
    images = True
    has_head = True  # --head multi_modal_projector trains the projector in full (none by default)
    presets: dict[str, str] = dict(fashion_vqa.PRESETS)

    def __init__(self, data, tokenizer, cfg, processor=None):
        if processor is None:
            raise DataError("image-chat records need a vision-language model and its processor")
        self.inputs = ImageInputs(processor)
        self.dtype = precision.torch_dtype(cfg.dtype) if cfg.dtype else None
        super().__init__(data, tokenizer, cfg)

    @classmethod
    def load_data(cls, spec: str, cfg) -> TaskData:
        """A file of image-chat records (as instruction tuning reads them), or a Fashion-MNIST preset
        (:mod:`.fashion_vqa`)."""
        if spec in fashion_vqa.PRESETS:
            train, test_sets, extra = fashion_vqa.load(spec, cfg)
            return TaskData(spec, train, test_sets, max_length=extra["max_length"], duration=extra["duration"],
                            eval_limit=extra["eval_limit"],
                            extra={"format": extra["format"], "max_new_tokens": extra["max_new_tokens"]})
        return super().load_data(spec, cfg)

    @classmethod
    def load_model(cls, folder: Path, info: dict):
        return models.load_vision_language_model(Path(folder))

    # ---- encoding ------------------------------------------------------------------------------------------
    def encode(self, example, train_on_prompt: bool = False, stats: EncodeStats | None = None):
        """The conversation encoded with room for its images' tokens, then each image token expanded; the
        images whose tokens a cut prompt lost are dropped (the oldest first)."""
        extra = self.inputs.extra_tokens(example.images)
        try:
            encoded = self.format.encode(self.inputs.messages(example.messages), max(1, self.max_length - extra),
                                         train_on_prompt, stats)
        except ChatFormatError as exc:
            raise DataError(f"{example.source}: {exc}") from None
        if encoded is None:
            return None
        images = self.inputs.shown(encoded.ids, example.images)
        start = encoded.response_start + self.inputs.extra_tokens(images)
        encoded.ids, encoded.trained = self.inputs.expand(encoded.ids, encoded.trained, images)
        encoded.response_start, encoded.images = start, images
        return encoded

    def prompt(self, example) -> tuple[list[int], list]:
        budget = max(1, self.max_length - self.max_new_tokens)
        ids = self.format.prompt_ids(self.inputs.messages(example.prompt), budget - self.inputs.extra_tokens(
            example.images))
        images = self.inputs.shown(ids, example.images)
        return self.inputs.prompt(ids, images), images

    def image_inputs(self, images: list) -> dict[str, Tensor]:
        return self.inputs.pixels(images, self.dtype)

    def describe(self) -> str:
        count = sum(len(e.images) for e in self.data.train)
        return f"{super().describe()}; {count} training images, image token {self.inputs.image_token!r}"
