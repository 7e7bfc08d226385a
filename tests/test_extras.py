"""The install extras do what scripts/bootstrap says they do: every job's extra brings the training tool, the
serving extra the openai client the serving example uses, and the script offers exactly the extras there are."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
BOOTSTRAP = (ROOT / "scripts" / "bootstrap").read_text()


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\s]", r, maxsplit=1)[0] for r in requirements}


def test_every_job_extra_brings_the_training_tool():
    for extra in ("quant", "serve", "gemma", "vision", "test"):
        assert "dorafit[train]" in EXTRAS[extra], extra


def test_serve_brings_the_openai_client():
    assert "openai" in _names(EXTRAS["serve"])


def test_the_script_offers_exactly_the_extras_there_are():
    offered = re.search(r"case \"\$one\" in ([\w|]+)\)", BOOTSTRAP).group(1).split("|")
    assert sorted(offered) == sorted(EXTRAS)
    described = re.findall(r"^#   scripts/bootstrap (\w+) ", BOOTSTRAP, flags=re.M)
    assert sorted(described) == sorted(EXTRAS)
