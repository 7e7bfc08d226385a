"""Where task records come from: the one reader of ``.jsonl`` and ``.parquet`` files and Hugging Face datasets.

A record is one JSON object (a dict); the task types (text/label classification, Alpaca / messages / ShareGPT
instruction tuning) read records from any of these sources alike:

* ``FILE.jsonl``   - JSON Lines, one object per non-blank line (UTF-8; a byte-order mark is dropped);
* ``FILE.parquet`` - one record per row, read with pyarrow; a column is a field, a null cell a missing field (so
  an Alpaca table with an ``input`` column may leave it null), nested columns (lists of structs, e.g.
  ``messages``) become lists of dicts, as in JSON;
* ``hf:ORG/NAME[@REVISION][:SPLIT]`` or ``hf:ORG/NAME[@REVISION]:CONFIG:SPLIT`` - a split (default ``train``) of a
  data set on the Hugging Face Hub, loaded with ``datasets.load_dataset`` through its cache
  (:func:`dorafit.train.hub.load_dataset_split`); a local file or folder of the same spelling wins.

Each record comes with where it was found (``file.jsonl: line 3``, ``file.parquet: row 3``), which every error
message about it names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .base import DataError, clip

SUFFIXES = (".jsonl", ".parquet")
HUB_PREFIX = "hf:"
PARQUET_BATCH_ROWS = 1024


class Record(NamedTuple):
    position: str  # "line 3" or "row 3"
    where: str  # "file.jsonl: line 3"
    data: dict
    text: str  # the record as written (a JSON line) or as JSON (a row), for error messages


@dataclass(frozen=True)
class HubDataset:
    """``hf:ORG/NAME[@REVISION][:SPLIT]`` or ``hf:ORG/NAME[@REVISION]:CONFIG:SPLIT``."""

    repo: str
    revision: str | None
    config: str | None
    split: str

    @property
    def name(self) -> str:
        return self.repo.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        config = f":{self.config}" if self.config else ""
        return f"{HUB_PREFIX}{self.repo}{at}{config}:{self.split}"


Source = Path | HubDataset


def parse_hub(spec: str) -> HubDataset:
    """The :class:`HubDataset` of ``hf:...``; a DataError saying the form if it is not one."""
    from .. import hub

    repo_part, *rest = spec[len(HUB_PREFIX):].split(":")
    parsed = hub.parse_model_id(repo_part)
    if parsed is None or len(rest) > 2 or not all(rest):
        raise DataError(f"--task {spec!r}: a Hugging Face dataset is written hf:ORG/NAME[@REVISION][:SPLIT] or "
                        "hf:ORG/NAME[@REVISION]:CONFIG:SPLIT (e.g. hf:tatsu-lab/alpaca:train)")
    config, split = (None, rest[0] if rest else "train") if len(rest) < 2 else rest
    return HubDataset(parsed[0], parsed[1], config, split)


def source(spec: str | Path) -> Source:
    """What ``--task`` / ``--eval-file`` names: an existing path, a Hub dataset (``hf:...``), else the path."""
    path = Path(spec).expanduser()
    if not path.exists() and str(spec).startswith(HUB_PREFIX):
        return parse_hub(str(spec))
    return path


def name(src: Source) -> str:
    """The data's name (a run's test set): the file's stem or the data set's name."""
    return src.name if isinstance(src, HubDataset) else src.stem


def is_record_source(src: Source) -> bool:
    """A Hub data set or a .jsonl / .parquet file that exists."""
    return isinstance(src, HubDataset) or src.is_file() and src.suffix.lower() in SUFFIXES


def require_file(src: Source) -> Source:
    """``src`` itself if it is a Hub data set or an existing file; a DataError if it is a folder or missing."""
    if isinstance(src, Path) and src.is_dir():
        raise DataError(f"data file {src} is a folder; give a file (.jsonl, .parquet)")
    if isinstance(src, Path) and not src.is_file():
        raise DataError(f"data file {src} does not exist")
    return src


def records(src: Source) -> Iterator[Record]:
    """Every record of the source, in order; a DataError naming the file and line (row) of a bad one, or the file
    if it holds none."""
    if isinstance(src, HubDataset):
        rows = _hub_rows(src)
    elif require_file(src).suffix.lower() == ".parquet":
        rows = _parquet_rows(src)
    elif src.suffix.lower() == ".jsonl":
        rows = _jsonl_records(src)
    else:
        raise DataError(f"data file {src} must end in {' or '.join(SUFFIXES)}")
    count = 0
    for record in rows:
        count += 1
        yield record
    if not count:
        raise DataError(f"{src}: no examples")


def first_record(src: Source) -> dict | None:
    """The first record of a record source, None if it is not one; a DataError if it cannot be read."""
    return next(records(src)).data if is_record_source(src) else None


def fields(src: Source) -> list[str]:
    """The columns of a Parquet file or data set, or the fields of a JSON Lines file's first record."""
    if isinstance(src, HubDataset):
        from .. import hub

        return list(hub.load_dataset_split(src).column_names)
    if src.suffix.lower() == ".parquet":
        return _parquet_file(src).schema_arrow.names
    return list(first_record(src) or {})


def describe_fields(src: Source) -> str:
    """``its columns are a, b`` / ``its first record has the fields a, b``: for an error message."""
    found = fields(src)
    listed = ", ".join(found) or "(none)"
    jsonl = isinstance(src, Path) and src.suffix.lower() == ".jsonl"
    return f"its first record has the fields {listed}" if jsonl else f"its columns are {listed}"


def field_error(src: Source, record: Record, expected: str) -> DataError:
    """A record without the fields a task needs: with the table's columns (Parquet, data set), or the record (JSON
    Lines, whose records may differ)."""
    if record.position.startswith("row"):
        return DataError(f"{record.where}: expected {expected}; {describe_fields(src)}")
    return DataError(f"{record.where}: expected {expected}: {clip(record.text)}")


# ---- the readers ------------------------------------------------------------------------------------------------
def utf8_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The file's lines (a UTF-8 byte-order mark dropped, as spreadsheets write one); a DataError naming the line
    and column of a byte that is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if encoding != "utf-8":
        return data.decode(encoding).splitlines(keepends=True)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.splitlines(keepends=True)
    for number, raw in enumerate(lines, 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: line {number}, column {exc.start + 1}: byte 0x{raw[exc.start]:02x} is not UTF-8 "
                            "text; save the file as UTF-8") from None
    return [raw.decode("utf-8") for raw in lines]


def _jsonl_records(path: Path) -> Iterator[Record]:
    for number, line in enumerate(utf8_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}): {clip(line)}") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object: {clip(line)}")
        yield Record(f"line {number}", where, record, line)


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _row_record(src: Source, number: int, row: dict) -> Record:
    """A table row as a record: null cells are left out, as a missing field of a JSON object."""
    record = {key: value for key, value in row.items() if value is not None}
    return Record(f"row {number}", f"{src}: row {number}", record, json.dumps(record, default=str))


def _parquet_rows(path: Path) -> Iterator[Record]:
    number = 0
    for batch in _parquet_file(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield _row_record(path, number, row)


def _hub_rows(src: HubDataset) -> Iterator[Record]:
    from .. import hub

    for number, row in enumerate(hub.load_dataset_split(src), 1):
        yield _row_record(src, number, row)
