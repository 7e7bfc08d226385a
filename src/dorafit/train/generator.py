"""A causal LM ready to write text, from a run folder, a merged folder or any local model folder.

Used by ``dorafit generate`` and ``dorafit chat``:

* a run folder: the base model (quantized as the run's was) with the run's adapter kept unmerged (eval mode:
  DoRA's norm cached), prompted
  with the chat template the run was trained with (its task type's :meth:`chat_format`); a full fine-tuning
  run's ``RUN/model``;
* a model folder (``dorafit merge`` output, or any ``save_pretrained`` folder): the model, prompted with its
  tokenizer's chat template if it has one (a merged run's folder carries the template it was trained with).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..chat_format import ChatFormat
from ..io import load_adapter
from . import rundir
from .models import LoadedModel, load_generative_model, resolve_model
from . import precision
from .quantized_load import LoadOptions, loading
from .setup import hold_in_dtype, load_options, pick_device, quantize_base, stored_config
from .tasks import by_kind
from .vlm.inputs import ImageInputs


@dataclass
class Generator:
    loaded: LoadedModel
    format: ChatFormat | None  # None: prompts are plain text
    source: str  # what was loaded, for the user
    _images: ImageInputs | None = None

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def images(self) -> ImageInputs | None:
        """How images become this model's inputs; None for a text-only model."""
        if self.loaded.processor is None:
            return None
        if self._images is None:
            self._images = ImageInputs(self.loaded.processor)
        return self._images

    def prompt(self, messages: list[dict] | None, images: list = (), room: int | None = None,
               text: str | None = None) -> list[int]:
        """The prompt tokens of ``messages`` rendered by the chat format (or of ``text`` as it is), at most
        ``room`` of them (the oldest cut), each ``<image>`` placeholder expanded into ``images``' tokens (one
        per placeholder, in order; an error if they differ in number, if the cut would lose an image, or if the
        model reads no images)."""
        ids, shown = self.prompt_shown(messages, images, room, text)
        if len(shown) != len(images):
            raise ValueError(f"the prompt does not fit the model's context with its {len(images)} image(s); "
                             "shorten it or lower --max-new-tokens")
        return ids

    def prompt_shown(self, messages: list[dict] | None, images: list = (), room: int | None = None,
                     text: str | None = None) -> tuple[list[int], list]:
        """(:meth:`prompt`'s tokens, the images they show): where the cut removed the oldest images' placeholders,
        those images are left out, as training does with a conversation too long for ``--max-length`` (a chat
        whose early turns no longer fit)."""
        images = list(images)
        if images and self.images is None:
            raise ValueError(f"{self.source} reads text only; images need a vision-language model (a run of an "
                             "image-chat task, or a folder of one)")
        extra = self.images.extra_tokens(images) if images else 0
        budget = max(1, room - extra) if room else None
        if text is not None:
            text = self.images.text(text) if self.images else text
            ids = self.tokenizer(text)["input_ids"]
            ids = ids[-budget:] if budget and len(ids) > budget else ids
        else:
            ids = self.format.prompt_ids(self.images.messages(messages) if self.images else messages, budget)
        if self.images is None:
            return ids, []
        shown = self.images.shown(ids, images)
        return self.images.prompt(ids, shown), shown

    def image_inputs(self, images: list) -> dict:
        """The model inputs of ``images`` (pixels in the model's dtype); {} for none."""
        if not images:
            return {}
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        return self.images.pixels(images, dtype)


def load_generator(path: str, device: str = "auto", dtype: str | None = None) -> Generator:
    """``dtype``: of the model's weights (default: the run's ``--dtype``; a model folder: ``auto``)."""
    folder = Path(path).expanduser()
    where = pick_device(device)
    if rundir.is_run_folder(folder):
        gen = _from_run(folder, where, dtype)
    else:
        with loading(LoadOptions(precision.torch_dtype(precision.resolve(dtype or "auto", where, "lora")))):
            loaded = load_generative_model(resolve_model(path))
        own = loaded.tokenizer.chat_template
        gen = Generator(loaded, ChatFormat(loaded.tokenizer, "model", own) if own else None, f"model {loaded.folder}")
    gen.model.to(where).eval()
    return gen


def _from_run(run_dir: Path, device, dtype: str | None) -> Generator:
    cfg, resolved = stored_config(run_dir)
    cfg = dataclasses.replace(cfg, dtype=dtype or cfg.dtype)
    task_cls = by_kind(resolved.get("kind", "classification"))
    if cfg.method == "full":
        folder = run_dir / rundir.MODEL
        if not (folder / "config.json").is_file():
            raise ValueError(f"{run_dir} has no trained model yet ({rundir.MODEL}/ is missing); finish it with "
                             f"dorafit train --resume {run_dir}")
    else:
        folder = resolve_model(cfg.model)
        if not (run_dir / rundir.ADAPTER).is_dir():
            raise ValueError(f"{run_dir} has no trained adapter yet ({rundir.ADAPTER}/ is missing); finish it with "
                             f"dorafit train --resume {run_dir}")
    if not task_cls.generative:
        raise ValueError(f"{run_dir} is a run of the {task_cls.kind} task, not a generative one: its model does not write text, "
                         "so it cannot generate or chat (dorafit eval evaluates it)")
    options = load_options(cfg, device, quantize=cfg.method != "full")  # the base as the run trained on it
    with loading(options):
        loaded = task_cls.load_model(folder, resolved)
    loaded.model.to(device)  # quantized where it will run, as in training
    fmt = task_cls.chat_format(loaded.tokenizer, resolved)
    if cfg.method != "full":
        loaded.model.requires_grad_(False)
        hold_in_dtype(loaded.model, options.dtype, cfg.head)
        quantize_base(loaded.model, cfg)
        load_adapter(loaded.model, run_dir / rundir.ADAPTER)
        what = f"run {run_dir}: {cfg.method} adapter (unmerged) on {cfg.model}"
    else:
        what = f"run {run_dir}: fully fine-tuned {cfg.model}"
    return Generator(loaded, fmt, what)

