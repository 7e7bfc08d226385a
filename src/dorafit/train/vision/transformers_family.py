"""Hugging Face image classifiers: any local folder that ``AutoModelForImageClassification`` loads (ViT, DeiT,
BEiT, ConvNeXt, ConvNeXt V2, Swin, ResNet, ... : the model types of transformers'
``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``).

Loading: ``AutoModelForImageClassification.from_pretrained(folder, num_labels=len(labels), id2label, label2id,
ignore_mismatched_sizes=True)`` in float32, without a network. Where the folder's classifier has another number
of classes (an ImageNet checkpoint) it is replaced by a fresh one, seeded by the caller's ``torch.manual_seed``;
that classifier (the modules whose weights the folder lacked or could not fill) is the head that trains in full
beside the adapter. Batch-norm statistics stay the pretrained ones (:func:`.registry.freeze_batch_norm`).

Preprocessing: :class:`~.processor.ImageProcessor` at ``--image-size`` (default: ``config.json``'s
``image_size``, else 224), normalised with the ``image_mean`` / ``image_std`` of the folder's
``preprocessor_config.json`` (0.5 / 0.5 without one). Images are resized to a square, not cropped. Models with
learnt position embeddings (ViT) need the size they were trained at.

Default adapter targets, the DoRA paper's choice (attention q, k, v and the feed-forward up and down
projections) where the model has them: ViT-style ``q_proj, k_proj, v_proj, fc1, fc2`` (transformers 5 names);
for ConvNeXt the pointwise convolutions ``pwconv1, pwconv2`` (Linear layers: its feed-forward up and down).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..model_errors import ModelError
from .processor import HF_PREPROCESSOR_FILE, ImageProcessor
from .registry import freeze_batch_norm, pick_targets, register

DEFAULT_SIZE = 224
#: rows tried in order; the first whose every name is a module name suffix is the default --targets
DEFAULT_TARGETS = [
    ["q_proj", "k_proj", "v_proj", "fc1", "fc2"],  # ViT, DeiT, ... (transformers 5)
    ["pwconv1", "pwconv2"],  # ConvNeXt, ConvNeXt V2
    ["query", "key", "value"],  # attention of older-style vision transformers (BEiT, Swin)
]


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _image_model_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def _head(model: nn.Module, info: dict) -> list[str]:
    """The modules owning the weights the folder lacked or could not fill (a classifier for other classes)."""
    keys = list(info.get("missing_keys") or []) + [k[0] if isinstance(k, tuple) else k
                                                   for k in info.get("mismatched_keys") or []]
    modules = dict(model.named_modules())
    owners = {key.rsplit(".", 1)[0] for key in keys if "." in key}
    names = [n for n in owners if n in modules]
    outer = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    return sorted(outer, key=list(modules).index)


@register
class TransformersImageClassifier:
    name = "transformers image classifier"
    presets: dict = {}

    @staticmethod
    def claims(folder: Path) -> bool:
        config = _json(folder / "config.json")
        architectures = config.get("architectures") or []
        return (any(str(a).endswith("ForImageClassification") for a in architectures)
                or config.get("model_type") in _image_model_types() and not architectures)

    @staticmethod
    def describe(folder: Path) -> str:
        config = _json(folder / "config.json")
        return ", ".join(config.get("architectures") or [str(config.get("model_type"))])

    @staticmethod
    def default_size(folder: Path) -> int:
        size = _json(folder / "config.json").get("image_size")
        return int(size[0] if isinstance(size, (list, tuple)) else size or DEFAULT_SIZE)

    @staticmethod
    def load(folder: Path, labels: list[str], image_size: int) -> tuple[nn.Module, ImageProcessor, list[str]]:
        import torch
        from transformers import AutoModelForImageClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the head it re-initialises is reported by dorafit (the run's "head")
        hf_logging.disable_progress_bar()
        try:
            model, info = AutoModelForImageClassification.from_pretrained(
                folder, local_files_only=True, dtype=torch.float32, output_loading_info=True,
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"the model in {folder} cannot be loaded for image classification: {exc}") from None
        freeze_batch_norm(model)
        hf_config = _json(folder / HF_PREPROCESSOR_FILE) or None
        mean = tuple((hf_config or {}).get("image_mean") or (0.5, 0.5, 0.5))
        std = tuple((hf_config or {}).get("image_std") or (0.5, 0.5, 0.5))
        if len(mean) != 3 or len(std) != 3:
            raise ModelError(f"{folder / HF_PREPROCESSOR_FILE}: image_mean and image_std must have 3 values (RGB)")
        processor = ImageProcessor(image_size, mean, std, hf_config)
        return model.eval(), processor, _head(model, info)

    @staticmethod
    def owns(model: nn.Module) -> bool:
        return getattr(model, "main_input_name", None) == "pixel_values" and hasattr(model, "config")

    @staticmethod
    def default_targets(model: nn.Module) -> list[str] | None:
        return pick_targets(model, DEFAULT_TARGETS)
