"""MkDocs hooks: make the repository files that the documentation links to part of the site.

The pages in ``docs/`` link to result files outside it as ``../experiments/results/...`` and
``../benchmarks/README.md``, so the links also work when the Markdown is read on a code host. MkDocs only
knows files under ``docs/``; this hook adds the files of :data:`MOUNTED` to the site under ``repo/<path>`` and
rewrites each page's links that leave ``docs/`` (``../``) to point there. A link to a repository file that is
not mounted, or does not exist, is then reported by ``mkdocs build --strict`` like any other broken link.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "repo"
#: repository folders (every file under them) and files that the site carries
MOUNTED = ("experiments/results", "benchmarks/README.md")
_OUTSIDE = re.compile(r"\]\(\.\./")  # a Markdown link or image target that leaves docs/


def on_files(files: Files, config) -> Files:
    for entry in MOUNTED:
        path = ROOT / entry
        for source in sorted(path.rglob("*") if path.is_dir() else [path]):
            if source.is_file():
                uri = f"{PREFIX}/{source.relative_to(ROOT).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(source),
                                            inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """``](../x)`` -> ``](<up to docs root>/repo/x)`` on pages in ``docs/`` (mounted pages keep their links)."""
    if page.file.src_uri.startswith(PREFIX + "/"):
        return markdown
    up = "../" * page.file.src_uri.count("/")
    return _OUTSIDE.sub(f"]({up}{PREFIX}/", markdown)
