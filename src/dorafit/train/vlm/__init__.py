"""Vision-language models (VLMs): any Hugging Face model folder that transformers loads with
``AutoModelForImageTextToText`` and ``AutoProcessor`` (LLaVA, and others whose processor expands an image
placeholder into image tokens), plus the ``llava-gemma-270m`` preset (:mod:`.llava_gemma`).

A VLM is a vision tower, a multimodal projector and a language model. dorafit adapts the language model:

* default targets: the language model's q, k, v, up and down projections (:mod:`dorafit.train.targets` applied
  to the language model alone, written as full module names so that the vision tower's own ``q_proj`` etc. are
  not matched); the vision tower stays frozen and un-adapted unless ``--targets`` names its modules;
* the projector (``multi_modal_projector``) trains in full beside the adapter when ``--head`` names it, and alone
  with ``--targets none`` (LLaVA's stage 1, feature alignment).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..model_errors import ModelError

PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "multimodal_projector")


def _register_presets() -> None:
    """Import the packaged architectures so that transformers' Auto classes know them."""
    try:
        from . import llava_gemma  # noqa: F401  (registers its vision tower with AutoConfig / AutoModel)
    except ImportError:  # the preset's module is optional: a plain Hugging Face VLM needs none of it
        pass


def _image_text_model_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def is_vlm_folder(folder: Path) -> bool:
    """Whether ``folder``'s config.json names a model type transformers loads as an image-text-to-text model."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    _register_presets()
    return model_type in _image_text_model_types()


def is_vlm(model: nn.Module) -> bool:
    """Whether a loaded model is a vision-language model (it has a vision tower beside its language model)."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None and language_model_name(model) is not None


def language_model_name(model: nn.Module) -> str | None:
    """The full name of the language-model submodule (``model.language_model`` for LLaVA), or None."""
    inner = getattr(getattr(model, "model", None), "language_model", None) or getattr(model, "language_model", None)
    if not isinstance(inner, nn.Module):
        return None
    return next((name for name, module in model.named_modules() if module is inner), None)


def projector_names(model: nn.Module) -> list[str]:
    """The full names of the multimodal projector's modules (what ``--head`` names to train it)."""
    names = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def default_targets(model: nn.Module) -> list[str]:
    """The language model's q, k, v, up and down projections, as full module names."""
    from .. import targets

    prefix = language_model_name(model)
    language_model = model.get_submodule(prefix)
    return [f"{prefix}.{name}" for name in targets.default_targets_names(language_model)]


def load_processor(folder: Path):
    """The folder's processor (tokenizer + image processor), its tokenizer given a pad token (its EOS if none)."""
    from transformers import AutoProcessor

    _register_presets()
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / TypeError for missing files
        raise ModelError(f"cannot load a processor from {folder}: {exc}; a vision-language model folder needs its "
                         "processor (processor.save_pretrained(folder))") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ModelError(f"the processor in {folder} ({type(processor).__name__}) has no tokenizer and image "
                         "processor; a vision-language model needs both")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise ModelError(f"the tokenizer in {folder} has neither a pad nor an eos token")
    return processor


def describe(folder: Path) -> str:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    return ", ".join(config.get("architectures") or [config.get("model_type", "unknown")])
