"""The registry of task types: ``--task`` values and stored ``kind`` names resolved to their class."""

from __future__ import annotations

from . import records
from .base import DataError

TASK_TYPES: dict[str, type] = {}
#: kinds that earlier versions of dorafit wrote to config.json, and the task type that reads them now
ALIASES = {"commonsense": "multiple-choice"}


def register(cls: type) -> type:
    """Class decorator: make a task type known by its ``kind`` and its ``presets``."""
    clash = [p for p in cls.presets if p in all_presets()]
    if cls.kind in TASK_TYPES or clash:
        raise ValueError(f"task type {cls.kind!r} or preset {clash} registered twice")
    TASK_TYPES[cls.kind] = cls
    return cls


def all_presets() -> dict[str, type]:
    return {name: cls for cls in TASK_TYPES.values() for name in cls.presets}


def by_kind(kind: str) -> type:
    """The task type stored as ``kind`` in a run folder."""
    kind = ALIASES.get(kind, kind)
    if kind not in TASK_TYPES:
        raise ValueError(f"unknown task kind {kind!r} (known: {', '.join(TASK_TYPES)}); the run was written by "
                         "another version of dorafit")
    return TASK_TYPES[kind]


def task_type(spec: str) -> type:
    """The task type that reads ``--task spec``: a preset's, or the first type that claims the file or folder."""
    presets = all_presets()
    if spec in presets:
        return presets[spec]
    path = records.source(spec)
    if isinstance(path, records.HubDataset) or path.exists():
        for cls in TASK_TYPES.values():
            if cls.claims(path):
                return cls
        if records.is_record_source(path):
            raise DataError(f"no task type reads {path}: {records.describe_fields(path)}; {describe_inputs()}")
        what = "folder" if path.is_dir() else "file"
        raise DataError(f"no task type reads the {what} {path}: {describe_inputs()}")
    raise DataError(f"unknown task {spec!r}: not a preset ({', '.join(presets)}), nor an existing file or folder; "
                    f"{describe_inputs()}")


def describe_inputs() -> str:
    return ("give a .jsonl/.parquet/.csv file of text,label (classification), a .jsonl/.parquet file of "
            "instruction/output, messages or conversations records (instruction tuning; with an \"images\" list: "
            "visual instruction tuning), either of them as a Hugging "
            "Face dataset hf:ORG/NAME[:SPLIT], a commonsense-format folder of <task>/train.json, <task>/test.json "
            "(multiple choice), or a folder of class folders of PNG/JPEG images (image classification)")
