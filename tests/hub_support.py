"""Fake Hugging Face caches for the tests, laid out as huggingface_hub and datasets write them after an online
download, so that ``HF_HUB_OFFLINE=1`` finds them without a network:

* a model: ``HUB_CACHE/models--ORG--NAME/snapshots/<commit>/`` (a save_pretrained folder) + ``refs/<branch>``;
* a data set: ``DATASETS_CACHE/ORG___NAME/default/0.0.0/<commit>/`` (``NAME-<split>.arrow`` + dataset_info.json),
  written by datasets' own Parquet builder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def cache_model(hub_cache: Path, repo: str, make, commit: str = COMMIT_A, ref: str | None = "main") -> Path:
    """``make(folder)`` writes the model into the snapshot of ``commit``; ``refs/<ref>`` points at it."""
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    make(snapshot)
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


def cache_dataset(datasets_cache: Path, repo: str, splits: dict[str, list[dict]], work: Path,
                  commit: str = COMMIT_A) -> Path:
    """The prepared copy datasets keeps of a Hub data set ``repo`` with these splits (rows as dicts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = [str(work / f"{split}.parquet")]
        pq.write_table(pa.Table.from_pylist(rows), files[split][0])
    name = repo.split("/")[1]
    builder = Parquet(cache_dir=str(work / "build"), dataset_name=name, data_files=files)
    builder.download_and_prepare()
    target = datasets_cache / repo.replace("/", "___") / "default" / "0.0.0" / commit
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)
    return target


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """HF_HOME for this process: huggingface_hub's and datasets' caches under it, offline (their settings are read
    when they are imported, so they are set on the modules too). The HF_HOME path is returned."""
    import datasets
    from huggingface_hub import constants

    from dorafit.train import hub

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    hub.load_dataset_split.cache_clear()
    yield home
    hub.load_dataset_split.cache_clear()


def offline_env(home: Path) -> dict[str, str]:
    """The environment of a subprocess that reads the caches under ``home`` only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
