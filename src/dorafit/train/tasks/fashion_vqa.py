"""Image-chat data from Fashion-MNIST: captions (LLaVA stage 1) and questions with answers (LLaVA stage 2).

Two presets of the image-chat task type, built from Fashion-MNIST's files (:mod:`.images`: ``--fashion-mnist-dir``,
``$DORAFIT_FASHION_MNIST`` or the Debian package ``dataset-fashion-mnist``):

* ``fashion-mnist-captions`` - feature alignment: the user turn is ``"<image>\\n"`` + one of
  :data:`CAPTION_PROMPTS`, the assistant's a caption naming the item: ``"A photo of an ankle boot."``;
* ``fashion-mnist-vqa`` - visual instruction tuning: ``"<image>\\n"`` + a question of one of three kinds, the
  assistant's the short answer:

  - ``item`` (half of the examples): what the item is, answered by its class name (:data:`NAMES`,
    e.g. ``"ankle boot"``): the headline metric is the exact match of these answers;
  - ``feet`` (a quarter): whether it is worn on the feet, ``"yes"`` (sandal, sneaker, ankle boot) or ``"no"``;
  - ``category`` (a quarter): its category, one of :data:`CATEGORIES` (the question lists them).

  Each kind has a few phrasings (:data:`QUESTIONS`), drawn at random.

Every image gives one conversation (one turn each way). The three sets follow
:func:`.images.load_fashion_mnist`: ``train`` = the 55,000 training images not held out, ``validation`` = the 5,000
training images held out by ``--split-seed`` (to choose learning rates on), ``test`` = the official 10,000 test
images (to report once). Phrasings and question kinds are drawn by a ``random.Random`` seeded from the split seed
and the set's name, so a given seed always gives the same data. In the held-out sets the kinds repeat in the
pattern item, feet, item, category, so any prefix (``--eval-limit``) holds them in the training proportions.

Images are 28 x 28 RGB PIL images in memory (the gray image in all three channels): the model's processor resizes
them. :func:`write_jsonl` writes a preset as JSONL + PNG files, the image-chat record format::

    {"messages": [{"role": "user", "content": "<image>\\nWhat is this item?"},
                  {"role": "assistant", "content": "ankle boot"}],
     "images": ["images/test-00000.png"]}

with image paths relative to the JSONL file. ``kind`` (the question kind, :func:`question_kind`) is an extra field
that readers ignore and that lets an experiment score each kind on its own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from ...files import atomic_write_text
from .base import DataError
from .conversations import Example
from .images import fashion_mnist_dir, read_fashion_mnist, validation_split

PRESETS = {
    "fashion-mnist-captions": "Fashion-MNIST images with a caption naming the item (LLaVA stage 1, feature alignment)",
    "fashion-mnist-vqa": "questions about Fashion-MNIST images: what the item is, whether it is worn on the feet, "
                         "its category (LLaVA stage 2, visual instruction tuning)",
}

#: Fashion-MNIST's ten classes (label order) as a person names them: the answer to an ``item`` question.
NAMES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
#: The caption's noun phrase, with its article.
PHRASES = ["a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker",
           "a bag", "an ankle boot"]
CATEGORIES = ["tops", "bottoms", "dresses", "outerwear", "footwear", "bags"]
CATEGORY = ["tops", "bottoms", "tops", "dresses", "outerwear", "footwear", "tops", "footwear", "bags", "footwear"]
FEET = {5, 7, 9}  # sandal, sneaker, ankle boot

CAPTION_PROMPTS = ["Describe the image.", "What does this picture show?", "Write a short caption for this image.",
                   "Describe this photo briefly."]
CAPTION = "A photo of {}."  # one caption per class: its exact match is the class-name accuracy
QUESTIONS = {
    "item": ["What is this item?", "What piece of clothing or accessory is shown?", "Name the item in the picture.",
             "What is in the image? Answer with the item's name."],
    "feet": ["Is this worn on the feet? Answer yes or no.", "Would you wear this on your feet? Answer yes or no.",
             "Is this item footwear? Answer yes or no."],
    "category": [f"Which category is this item in: {', '.join(CATEGORIES[:-1])} or {CATEGORIES[-1]}?",
                 f"Pick the item's category ({', '.join(CATEGORIES)})."],
}
HELD_OUT_KINDS = ["item", "feet", "item", "category"]  # the held-out sets' repeating pattern
MAX_NEW_TOKENS = 12  # the longest answer ("A photo of a pair of trousers.") is 8 Gemma tokens


def answer(kind: str, label: int) -> str:
    """The answer to a question of ``kind`` about an image of class ``label``."""
    if kind == "item":
        return NAMES[label]
    if kind == "feet":
        return "yes" if label in FEET else "no"
    if kind == "category":
        return CATEGORY[label]
    raise ValueError(f"unknown question kind {kind!r}; one of {', '.join(QUESTIONS)}")


def _image(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(pixels), mode="L").convert("RGB")


def _example(pixels: np.ndarray, user: str, reply: str, source: str) -> Example:
    messages = [{"role": "user", "content": f"<image>\n{user}"}, {"role": "assistant", "content": reply}]
    return Example(messages, source, [_image(pixels)])


def question_kind(prompt: str) -> str:
    """The kind (``item``, ``feet``, ``category``; ``caption`` for a caption prompt) of the question in ``prompt``
    (a user turn of these presets, or a rendered prompt holding one); a ValueError otherwise."""
    for kind, phrasings in {**QUESTIONS, "caption": CAPTION_PROMPTS}.items():
        if any(q in prompt for q in phrasings):
            return kind
    raise ValueError(f"not a question of the Fashion-MNIST image-chat presets: {prompt[-80:]!r}")


def captions(images: np.ndarray, labels: np.ndarray, ids, rng: random.Random, where: str) -> list[Example]:
    """One caption conversation per image ``ids``: a random prompt of :data:`CAPTION_PROMPTS`, the :data:`CAPTION`."""
    return [_example(images[i], rng.choice(CAPTION_PROMPTS), CAPTION.format(PHRASES[labels[i]]), f"{where} image {i}")
            for i in ids]


def questions(images: np.ndarray, labels: np.ndarray, ids, rng: random.Random, where: str,
              held_out: bool) -> list[Example]:
    """One question per image ``ids``: kinds drawn item 1/2, feet 1/4, category 1/4 (training) or in the pattern
    :data:`HELD_OUT_KINDS` (held out); phrasings drawn at random."""
    out = []
    for n, i in enumerate(ids):
        kind = HELD_OUT_KINDS[n % len(HELD_OUT_KINDS)] if held_out else rng.choice(HELD_OUT_KINDS)
        out.append(_example(images[i], rng.choice(QUESTIONS[kind]), answer(kind, int(labels[i])),
                            f"{where} image {i}"))
    return out


def build(name: str, split_seed: int = 0, folder: str | Path | None = None, train_size: int | None = None,
          eval_size: int | None = None) -> tuple[list[Example], dict[str, list[Example]]]:
    """(train, {"validation": ..., "test": ...}) of the preset ``name`` (:data:`PRESETS`).

    ``split_seed`` picks the validation images and seeds the phrasings; ``train_size`` / ``eval_size`` keep the
    first examples of the (permuted) training set / of each held-out set (default: all: 55,000 / 5,000, 10,000).
    ``folder``: Fashion-MNIST's files (:func:`.images.fashion_mnist_dir`)."""
    if name not in PRESETS:
        raise DataError(f"unknown Fashion-MNIST image-chat preset {name!r}; one of {', '.join(PRESETS)}")
    files = fashion_mnist_dir(None if folder is None else str(folder))
    images, labels = read_fashion_mnist("train", files)
    test_images, test_labels = read_fashion_mnist("t10k", files)
    train_ids, val_ids = validation_split(len(labels), split_seed)
    sets = {"train": (images, labels, train_ids[:train_size]),
            "validation": (images, labels, val_ids[:eval_size]),
            "test": (test_images, test_labels, range(len(test_labels))[:eval_size])}
    built = {}
    for part, (xs, ys, ids) in sets.items():
        rng = random.Random(f"{name}/{part}/{split_seed}")
        where = f"{name} {part}"
        built[part] = captions(xs, ys, ids, rng, where) if name == "fashion-mnist-captions" else \
            questions(xs, ys, ids, rng, where, held_out=part != "train")
    train = built.pop("train")
    return train, built


#: What a training run's preset holds (:func:`load`): a seeded sample of each set, since a CPU run sees a few
#: thousand examples and the task encodes every example it is given; :func:`build` gives all of them.
LOAD_SIZES = {"train": 10_000, "eval": 2_000}


def load(name: str, cfg) -> tuple[list[Example], dict[str, list[Example]], dict]:
    """The preset ``name`` for a training run: ``(train, test_sets, extra)``.

    Reads ``cfg.split_seed`` and ``cfg.fashion_mnist_dir`` (as the ``fashion-mnist`` task does). ``train``: the
    first 10,000 of the permuted training images; ``test_sets``: ``{"validation": [...], "test": [...]}``, the
    first 2,000 of each (:data:`LOAD_SIZES`). ``extra`` holds the task's defaults: ``max_new_tokens``,
    ``max_length`` (tokens of a conversation, its image tokens included), ``eval_limit`` (examples per held-out
    set), ``duration`` (``("steps", n)``) and the record ``format``."""
    train, test_sets = build(name, cfg.split_seed, getattr(cfg, "fashion_mnist_dir", None), LOAD_SIZES["train"],
                             LOAD_SIZES["eval"])
    extra = {"max_new_tokens": MAX_NEW_TOKENS, "max_length": 64, "eval_limit": 200, "duration": ("steps", 300),
             "format": "messages"}
    return train, test_sets, extra


def write_jsonl(folder: str | Path, name: str, split_seed: int = 0, train_size: int | None = 1000,
                eval_size: int | None = 200, fashion_mnist: str | Path | None = None) -> dict[str, Path]:
    """The preset ``name`` as files in ``folder``: ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (image-chat
    records, one a line, plus the question ``kind``) and their images as ``images/<set>-<n>.png`` (28 x 28 RGB),
    paths relative to the JSONL files. Returns ``{set: path of its JSONL file}``."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    train, held_out = build(name, split_seed, fashion_mnist, train_size, eval_size)
    paths = {}
    for part, examples in {"train": train, **held_out}.items():
        lines = []
        for n, example in enumerate(examples):
            relative = [f"images/{part}-{n:05d}" + (f"-{k}" if k else "") + ".png" for k in range(len(example.images))]
            for image, path in zip(example.images, relative):
                image.save(folder / path)
            kind = question_kind(example.messages[0]["content"])
            lines.append(json.dumps({"messages": example.messages, "images": relative, "kind": kind}))
        paths[part] = folder / f"{part}.jsonl"
        atomic_write_text(paths[part], "\n".join(lines) + "\n")
    return paths
