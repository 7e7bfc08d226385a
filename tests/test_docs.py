"""The documentation: README.md short and its links alive, and the MkDocs site building in strict mode (a broken link
or anchor, a page missing from the navigation or an API entry whose object is gone fails the build).

The site build reads the sources (mkdocstrings' griffe parses them; nothing is imported) and takes a few seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import dorafit

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def readme_links() -> list[str]:
    return [t for t in LINK.findall(README.read_text(encoding="utf-8")) if not re.match(r"[a-z]+:", t)]


def test_readme_is_short_and_starts_with_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert commands[:2] == ["scripts/bootstrap train && .venv/bin/dorafit train",
                            "scripts/bootstrap test && .venv/bin/python -m pytest -n 2"]


def test_readme_links_point_at_files_that_exist():
    links = readme_links()
    assert any(t.startswith("docs/") for t in links)
    missing = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_the_api_reference_has_an_entry_for_every_public_name():
    entries = re.findall(r"^::: dorafit\.(\w+)\.(\w+)$", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert {name for _, name in entries} == set(dorafit.__all__)
    assert all(dorafit._EXPORTS[name] == module for module, name in entries)  # where `import dorafit` finds it


def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    assert (site / "api" / "index.html").is_file() and (site / "vision" / "index.html").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert all(f'id="dorafit.{dorafit._EXPORTS[name]}.{name}"' in api for name in dorafit.__all__)  # rendered from the docstrings
    assert list((site / "repo" / "experiments" / "results").rglob("*.png"))  # the result plots come along
