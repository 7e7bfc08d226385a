"""Image classification: image -> label with an image classifier; loss = cross-entropy; accuracy.

Data: a folder of class folders of PNG / JPEG images (:mod:`.image_folder`), or the ``fashion-mnist`` preset:
Fashion-MNIST's four ``*-ubyte.gz`` files (60,000 training and 10,000 test images, 28 x 28 grayscale, 10
classes) from ``--fashion-mnist-dir``, else the folder in ``$DORAFIT_FASHION_MNIST``, else the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). A folder that torchvision's
``FashionMNIST(root, download=True)`` filled is accepted as it is (``root`` or ``root/FashionMNIST/raw``).
Fashion-MNIST has two test sets:

* ``validation`` - 5,000 images held out of the 60,000 training images by a seeded permutation
  (``--split-seed``), the same for every run, never trained on: the set to choose learning rates and other
  options on;
* ``test`` - the official 10,000 test images, to report once the options are chosen.

By default up to 1,000 images of each are evaluated (``--eval-limit``; the validation images come in permuted
order, so any prefix is a random sample).

Preprocessing (:class:`~dorafit.train.vision.ImageProcessor`, the model's): pixel values / 255, resized
bilinearly to ``--image-size`` (default: the model's input size, 224 for EfficientNet-Lite0), gray copied to 3
channels, normalised with the model's mean and std. The model (``--model efficientnet-lite0`` or a Hugging Face
image classifier folder, :mod:`dorafit.train.vision`) gets a fresh head for the task's classes that trains in full
beside the adapter, as the text classifier's head does.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import vision
from ..models import LoadedModel
from .base import DataError, TaskData, format_metrics, limited, seeded_split
from .image_folder import is_image_folder, load_image_folder
from .registry import register

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # the Debian package's
FASHION_MNIST_ENV = "DORAFIT_FASHION_MNIST"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
VALIDATION_SIZE = 5000  # held out of the 60,000 training images
SIDE = 28  # Fashion-MNIST images are 28 x 28


def fashion_mnist_dir(option: str | None = None) -> Path:
    """Where Fashion-MNIST's files are: ``option`` (``--fashion-mnist-dir``), else ``$DORAFIT_FASHION_MNIST``,
    else the Debian package's folder; the ``FashionMNIST/raw`` folder inside it if torchvision made one."""
    folder = Path(option or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR).expanduser()
    raw = folder / "FashionMNIST" / "raw"
    return raw if raw.is_dir() else folder


def read_idx(path: Path, header: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file after its ``header`` bytes (16 for images, 8 for labels)."""
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; the fashion-mnist task needs Fashion-MNIST's four *-ubyte.gz files: give their "
            f"folder with --fashion-mnist-dir DIR (or ${FASHION_MNIST_ENV}=DIR), fill one with torchvision where the "
            "network allows it (python -c \"import torchvision; torchvision.datasets.FashionMNIST('DIR', "
            "download=True)\"), or install the Debian package: apt-get install dataset-fashion-mnist")
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def read_fashion_mnist(split: str, folder: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the ``train`` or ``t10k`` files."""
    images = read_idx(folder / f"{split}-images-idx3-ubyte.gz", 16)
    labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz", 8)
    if images.size != labels.size * SIDE * SIDE or labels.size == 0 or labels.max() >= len(FASHION_MNIST_LABELS):
        raise DataError(f"{folder}: the {split} files do not hold {labels.size} images of {SIDE}x{SIDE} with labels "
                        f"0-9 ({images.size} pixel bytes); reinstall dataset-fashion-mnist")
    return images.reshape(-1, SIDE, SIDE), labels


def validation_split(n: int, seed: int, size: int = VALIDATION_SIZE) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of ``n`` training images: a permutation by ``seed``, its first
    ``size`` indices held out."""
    return seeded_split(list(range(n)), size / n, seed)


def load_fashion_mnist(split_seed: int, image_size: int | None, folder: Path = FASHION_MNIST_DIR) -> TaskData:
    """Fashion-MNIST as (28 x 28 uint8 image, label) examples: 55,000 training, 5,000 validation, 10,000 test."""
    images, labels = read_fashion_mnist("train", folder)
    test_images, test_labels = read_fashion_mnist("t10k", folder)
    train_ids, val_ids = validation_split(len(labels), split_seed)

    def examples(xs, ys, ids) -> list:
        return [(xs[i], int(ys[i])) for i in ids]  # (view of one image, label): no pixels copied

    return TaskData(
        "fashion-mnist", examples(images, labels, train_ids),
        {"validation": examples(images, labels, val_ids),
         "test": examples(test_images, test_labels, range(len(test_labels)))},
        max_length=SIDE * SIDE,  # pixels per image; an image task reads no tokens
        duration=("steps", 300), eval_limit=1000,
        extra={"labels": list(FASHION_MNIST_LABELS), "image_size": image_size},
    )


def _logits(output) -> Tensor:
    """A model's class scores: transformers models return an output object, EfficientNet the tensor."""
    return getattr(output, "logits", output)


# ---- the task ----------------------------------------------------------------------------------------------
@register
class ImageClassificationTask:
    kind = "image-classification"
    generative = False  # a classifier does not write text
    has_head = True  # a freshly initialised head trains beside the adapter
    presets = {"fashion-mnist": "Fashion-MNIST clothing images, 10 classes"}  # and folders of class folders

    def __init__(self, data: TaskData, processor, cfg):
        self.data, self.processor = data, processor
        self.train = data.train
        self.labels = data.extra["labels"]

    @classmethod
    def claims(cls, path: Path) -> bool:
        return is_image_folder(path)

    @classmethod
    def load_data(cls, spec: str, cfg) -> TaskData:
        """The preset, or a folder of class folders; ``extra["image_size"]`` is ``--image-size`` (``None``: the
        model's, filled in by :meth:`load_model`)."""
        if spec == "fashion-mnist":
            return load_fashion_mnist(cfg.split_seed, cfg.image_size, fashion_mnist_dir(cfg.fashion_mnist_dir))
        data = load_image_folder(Path(spec).expanduser(), cfg.eval_file, cfg.test_size, cfg.split_seed)
        data.extra["image_size"] = cfg.image_size
        return data

    @classmethod
    def load_model(cls, folder: Path, info: dict) -> LoadedModel:
        """The folder's image classifier (a family of :mod:`dorafit.train.vision`) for ``info["labels"]``;
        ``info["image_size"]``, if ``None``, becomes the model's own input size."""
        info["image_size"] = info.get("image_size") or vision.default_image_size(folder)
        model, processor, head = vision.load_image_classifier(folder, info["labels"], info["image_size"])
        return LoadedModel(model, processor, folder, head)

    def describe(self) -> str:
        return f"{len(self.labels)} labels, images resized to {self.processor.size}x{self.processor.size}"

    def stored(self) -> dict:
        return {}

    def pixels(self, examples: list) -> Tensor:
        """The model's input (B, 3, S, S) for ``examples``: image files are decoded now (RGB, resized to S x S),
        Fashion-MNIST's arrays (28 x 28 gray) are resized by the processor."""
        size = self.processor.size
        images = [vision.read_image(x, size) if isinstance(x, Path) else x for x, _ in examples]
        return self.processor(torch.from_numpy(np.stack(images)))

    def batch(self, examples: list) -> dict[str, Tensor]:
        return {"pixel_values": self.pixels(examples), "labels": torch.tensor([y for _, y in examples])}

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        logits = _logits(model(batch["pixel_values"]))  # (B, classes)
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def predict(self, model, examples: list, device) -> Tensor:
        """Logits (N, classes) for ``examples`` (one batch)."""
        return _logits(model(self.pixels(examples).to(device))).float().cpu()

    def check_outputs(self, model, examples: list, device) -> Tensor:
        return self.predict(model, examples, device)

    @torch.no_grad()
    def evaluate(self, model, device, limit: int | None, batch_size: int, progress: bool) -> dict:
        """Accuracy (argmax of the logits) on the validation and the test set (not averaged: they serve different
        purposes)."""
        per_set = {}
        for name, examples in self.data.test_sets().items():
            examples = limited(examples, limit)
            correct = 0
            for start in tqdm(range(0, len(examples), batch_size), desc=f"eval {name}", leave=False,
                              disable=not (progress and len(examples) > batch_size)):
                chunk = examples[start : start + batch_size]
                logits = self.predict(model, chunk, device)  # (B, classes)
                correct += int((logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
            per_set[name] = {"accuracy": correct / len(examples), "correct": correct, "n": len(examples)}
        return {"tasks": per_set}

    def format_result(self, result: dict, before: dict | None = None) -> str:
        return format_metrics(result, before, ("accuracy",))
