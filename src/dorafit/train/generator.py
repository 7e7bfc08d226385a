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
from .models import LoadedModel, load_causal_lm, resolve_model
from . import precision
from .quantized_load import LoadOptions, loading
from .setup import hold_in_dtype, load_options, pick_device, quantize_base, stored_config
from .tasks import by_kind


@dataclass
class Generator:
    loaded: LoadedModel
    format: ChatFormat | None  # None: prompts are plain text
    source: str  # what was loaded, for the user

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def load_generator(path: str, device: str = "auto", dtype: str | None = None) -> Generator:
    """``dtype``: of the model's weights (default: the run's ``--dtype``; a model folder: ``auto``)."""
    folder = Path(path).expanduser()
    where = pick_device(device)
    if rundir.is_run_folder(folder):
        gen = _from_run(folder, where, dtype)
    else:
        with loading(LoadOptions(precision.torch_dtype(precision.resolve(dtype or "auto", where, "lora")))):
            loaded = load_causal_lm(resolve_model(path))
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
        loaded = load_causal_lm(folder)
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

