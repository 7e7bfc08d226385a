"""The registry of image model families, as :mod:`dorafit.train.tasks.registry` is for task types.

A family is one class (one file in this package) registered with :func:`register`::

    name                          how messages name it ("efficientnet-lite0", "transformers image classifier")
    presets                       --model names it owns -> a function returning the preset's folder
    claims(folder)                does this family load the model in this folder?
    describe(folder)              one line on the folder's model, for messages
    load(folder, labels, size)    (model in float32 and eval mode, ImageProcessor, head module names): a model
                                  with len(labels) outputs; a fresh head where the folder's has other classes
    default_size(folder)          the input size the model was trained at (--image-size when not given)
    owns(model)                   is this loaded model one of the family's?
    default_targets(model)        the adapter targets when --targets is not given

Loaders look families up through :func:`family_of_folder` and :func:`family_of_model`; nothing outside this
package names a family.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..model_errors import ModelError

FAMILIES: list[type] = []


def register(cls: type) -> type:
    """Class decorator: make an image model family known (looked up in registration order)."""
    if cls in FAMILIES or any(p in preset_folders() for p in cls.presets):
        raise ValueError(f"image model family {cls.name!r} or one of its presets registered twice")
    FAMILIES.append(cls)
    return cls


def preset_folders() -> dict:
    """--model preset -> the function returning its folder, over every family."""
    return {name: folder for cls in FAMILIES for name, folder in cls.presets.items()}


def family_of_folder(folder: Path) -> type | None:
    folder = Path(folder)
    return next((cls for cls in FAMILIES if folder.is_dir() and cls.claims(folder)), None)


def family_of_model(model: nn.Module) -> type | None:
    return next((cls for cls in FAMILIES if cls.owns(model)), None)


def is_image_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an image classifier some family loads."""
    return family_of_folder(folder) is not None


def load_image_classifier(folder: Path, labels: list[str], image_size: int | None = None):
    """(model, processor, head) of the folder's image classifier with ``len(labels)`` outputs, at ``image_size``
    (default: the model's own input size). The caller seeds torch first: a fresh head follows from the seed."""
    family = family_of_folder(folder)
    if family is None:
        raise ModelError(f"{folder} holds no image classifier: an image task needs --model "
                         f"{' or '.join(preset_folders())}, a Hugging Face image classification model folder "
                         "(config.json of e.g. a ViT or ConvNeXt *ForImageClassification, with its weights), or a "
                         "folder that dorafit merge wrote from an image run")
    return family.load(Path(folder), list(labels), image_size or family.default_size(Path(folder)))


def default_image_size(folder: Path) -> int | None:
    family = family_of_folder(folder)
    return family.default_size(Path(folder)) if family else None


def pick_targets(model: nn.Module, table: list[list[str]]) -> list[str] | None:
    """The first row of ``table`` whose every name ends some module's name (the suffixes ``--targets`` takes)."""
    names = [name for name, _ in model.named_modules()]
    for row in table:
        if all(any(n == t or n.endswith("." + t) for n in names) for t in row):
            return list(row)
    return None


def freeze_batch_norm(model: nn.Module) -> None:
    """Keep the model's batch-norm layers in eval mode whatever ``train()`` says, in place: their running
    statistics belong to the frozen base (an adapter file does not hold them, so a reloaded run would
    evaluate with other ones), and micro-batches of a few images are too small to re-estimate them. The model's
    class is swapped for a subclass of the same name (so ``save_pretrained`` records the same architecture)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    cls = type(model)
    if getattr(cls, "_dorafit_frozen_batch_norm", False):
        return
    model.__class__ = type(cls.__name__, (FrozenBatchNorm, cls), {"__module__": cls.__module__})


class FrozenBatchNorm:
    """Mixin: ``train()`` leaves every batch-norm layer in eval mode (frozen statistics)."""

    _dorafit_frozen_batch_norm = True

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self
