"""Image classification: image -> label with an image classifier; loss = cross-entropy; accuracy.

Data: the ``fashion-mnist`` preset, Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*-ubyte.gz``: 60,000 training and 10,000 test images, 28 x 28 grayscale,
10 classes). Two test sets are evaluated:

* ``validation`` - 5,000 images held out of the 60,000 training images by a seeded permutation
  (``--split-seed``), the same for every run, never trained on: the set to choose learning rates and other
  options on;
* ``test`` - the official 10,000 test images, to report once the options are chosen.

By default up to 1,000 images of each are evaluated (``--eval-limit``; the validation images come in permuted
order, so any prefix is a random sample).

Preprocessing (:class:`~dorafit.train.image_models.ImageProcessor`, the model's): gray values / 255, resized
bilinearly to ``--image-size`` (default 224, EfficientNet-Lite0's input size), copied to 3 channels,
normalised with mean 0.5 and std 0.5. The model (``--model efficientnet-lite0``) gets a fresh 10-way head
(``_fc``) that trains in full beside the adapter, as the text classifier's head does.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import image_models
from .base import DataError, TaskData, format_metrics, limited, seeded_split
from .registry import register

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
VALIDATION_SIZE = 5000  # held out of the 60,000 training images
SIDE = 28  # Fashion-MNIST images are 28 x 28


def read_idx(path: Path, header: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file after its ``header`` bytes (16 for images, 8 for labels)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; the fashion-mnist task needs the Debian package "
                        "dataset-fashion-mnist: apt-get install dataset-fashion-mnist")
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


def load_fashion_mnist(split_seed: int, image_size: int, folder: Path = FASHION_MNIST_DIR) -> TaskData:
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


# ---- the task ----------------------------------------------------------------------------------------------
@register
class ImageClassificationTask:
    kind = "image-classification"
    generative = False  # a classifier does not write text
    has_head = True  # a freshly initialised head trains beside the adapter
    presets = {"fashion-mnist": "Fashion-MNIST clothing images, 10 classes"}

    def __init__(self, data: TaskData, processor, cfg):
        self.data, self.processor = data, processor
        self.train = data.train
        self.labels = data.extra["labels"]

    @classmethod
    def claims(cls, path: Path) -> bool:
        return False  # image tasks are presets only (for now)

    @classmethod
    def load_data(cls, spec: str, cfg) -> TaskData:
        if spec != "fashion-mnist":
            raise DataError(f"unknown image task {spec!r}; image tasks: {', '.join(cls.presets)}")
        return load_fashion_mnist(cfg.split_seed, cfg.image_size or image_models.IMAGE_SIZE)

    @classmethod
    def load_model(cls, folder: Path, info: dict):
        return image_models.load_image_classifier(folder, info["labels"], info["image_size"])

    def describe(self) -> str:
        return f"{len(self.labels)} labels, images resized to {self.processor.size}x{self.processor.size}"

    def stored(self) -> dict:
        return {}

    def pixels(self, examples: list) -> Tensor:
        """The model's input (B, 3, S, S) for ``examples``."""
        return self.processor(torch.from_numpy(np.stack([image for image, _ in examples])))  # from (B, 28, 28)

    def batch(self, examples: list) -> dict[str, Tensor]:
        return {"pixel_values": self.pixels(examples), "labels": torch.tensor([y for _, y in examples])}

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        logits = model(batch["pixel_values"])  # (B, classes)
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def predict(self, model, examples: list, device) -> Tensor:
        """Logits (N, classes) for ``examples`` (one batch)."""
        return model(self.pixels(examples).to(device)).float().cpu()

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
