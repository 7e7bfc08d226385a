"""Models and data sets named by their Hugging Face Hub id, fetched through ``huggingface_hub`` / ``datasets``.

``--model ORG/NAME[@REVISION]`` is downloaded with :func:`huggingface_hub.snapshot_download` into the standard
Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``), with the token from the usual places (``HF_TOKEN``, ``hf auth
login``); with ``HF_HUB_OFFLINE=1`` only the cache is read. ``REVISION`` is a branch, tag or commit (default
``main``). Only what transformers reads from a model folder's top level is fetched: the JSON configs, tokenizer
files and ``*.safetensors`` weights (``*.bin`` weights only where a repository has no safetensors), not its
sub-folders (``original/``, ``onnx/``, ...) or other formats.

A training run stores the commit it trained on (``ORG/NAME@<commit>``, :func:`pinned`), so that ``eval``,
``generate``, ``serve`` and ``merge`` load the very same weights later, whatever the branch has become.

Every failure is a :class:`HubError` whose message names the id and says how to get it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

#: ORG/NAME[@REVISION]: the Hub's repository id rules (letters, digits, ``-_.``), a revision without spaces
MODEL_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?$")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "tokenizer*"]
LEGACY_WEIGHTS = ["*.bin"]  # PyTorch pickles: only for a repository without safetensors
NOT_THESE = ["*/*"]  # sub-folders: other formats and originals (original/, onnx/, gguf/) that transformers ignores
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message says why and what to do."""


def parse_model_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo id, revision or None)`` if ``spec`` is spelled ``ORG/NAME[@REVISION]``, else None."""
    match = MODEL_ID.match(spec)
    if not match or ".." in match["repo"] or match["repo"].endswith((".git", ".")):
        return None
    return match["repo"], match["revision"]


def is_model_id(spec: str) -> bool:
    return parse_model_id(spec) is not None


def cache_folder() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_hint(repo: str, revision: str | None, repo_type: str = "model") -> str:
    """The command that puts ``repo`` into the cache (run once where the Hub can be reached): ``hf download`` for
    a model; for a data set ``datasets.load_dataset``, whose prepared copy is what it reads offline."""
    if repo_type == "dataset":
        at = f", revision={revision!r}" if revision else ""
        return f"python -c \"import datasets; datasets.load_dataset('{repo}'{at})\""
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def explain(exc: Exception, what: str, repo: str, revision: str | None, repo_type: str = "model",
            cache: str | None = None) -> HubError:
    """One sentence for a failed look-up of ``repo``: not cached while offline, unreachable, private or gated, no
    such repository or revision."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    cache = cache or cache_folder()
    hint = download_hint(repo, revision, repo_type)
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    if isinstance(exc, IncompleteSnapshotError):
        return HubError(f"the cached copy of {what} {repo}{at} in {cache} is incomplete (an interrupted "
                        f"download?); complete it where the Hub can be reached: {hint}")
    if isinstance(exc, (LocalEntryNotFoundError, ConnectionError)):
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hugging Face Hub cannot be reached"
        return HubError(f"{what} {repo}{at} is not in the Hugging Face cache ({cache}) and {why}; "
                        f"download it once where the Hub can be reached (`{hint}`, or run this command there "
                        "without HF_HUB_OFFLINE=1), with the same HF_HOME")
    if isinstance(exc, GatedRepoError):
        return HubError(f"{what} {repo} is gated: accept its terms at {page}, then log in (`hf auth login` or "
                        "HF_TOKEN=...) and retry")
    if isinstance(exc, RepositoryNotFoundError) or (
            isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", None) == 401):
        return HubError(f"the Hugging Face Hub has no {what} {repo}, or it is private and no valid token was sent: "
                        "check the spelling, or log in (`hf auth login` or HF_TOKEN=...)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{what} {repo} has no revision {revision!r} (a branch, tag or commit); see {page}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HubError(f"cannot download {what} {repo}{at} from the Hugging Face Hub: {first}")


def _snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=NOT_THESE))
    except OSError as exc:  # the Hub's HTTP errors, a missing cache entry and connection errors are all OSErrors
        raise explain(exc, "model", repo, revision) from None


def model_folder(spec: str) -> Path:
    """The cached snapshot folder of ``ORG/NAME[@REVISION]``, downloaded first unless it is there."""
    repo, revision = parse_model_id(spec)
    folder = _snapshot(repo, revision, MODEL_FILES)
    if not any(folder.glob("*.safetensors")):
        folder = _snapshot(repo, revision, MODEL_FILES + LEGACY_WEIGHTS)
    if not (folder / "config.json").is_file():
        raise HubError(f"{repo} (snapshot {folder}) has no config.json: it is not a transformers model repository")
    return folder


def repo_of(spec: str) -> str | None:
    """The repository id of a Hub id that names no local path (``org/name@v2`` -> ``org/name``), else None."""
    parsed = parse_model_id(spec)
    return parsed[0] if parsed and not Path(spec).expanduser().exists() else None


def revision_of(spec: str) -> str | None:
    """The revision of a Hub id that names no local path (``org/name@<commit>`` -> ``<commit>``), else None."""
    parsed = parse_model_id(spec)
    return parsed[1] if parsed and repo_of(spec) else None


def pinned(spec: str, folder: Path) -> str:
    """``ORG/NAME@<commit>`` of a resolved ``spec`` (its snapshot folder is named by the commit), so that a run
    folder names exactly the weights it trained on; ``spec`` itself if it is not a Hub id."""
    parsed = parse_model_id(spec)
    if parsed is None or folder.parent.name != "snapshots" or not COMMIT.match(folder.name):
        return spec
    return f"{parsed[0]}@{folder.name}"


# ---- data sets ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def load_dataset_split(src):
    """The split ``src`` (a :class:`dorafit.train.tasks.records.HubDataset`) as a ``datasets.Dataset``, through
    ``datasets.load_dataset`` and its cache (``HF_HOME/datasets``: offline, the split as last prepared there)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(src.repo, src.config, split=src.split, revision=src.revision)
    except DatasetNotFoundError as exc:  # not on the Hub, private or gated, or no such revision
        first = str(exc).strip().splitlines()[0]
        raise HubError(f"dataset {src.repo}: {first} Check the spelling, or log in (`hf auth login` or HF_TOKEN=...)"
                       ) from None
    except OSError as exc:  # ConnectionError: not cached and offline or unreachable
        raise explain(exc, "dataset", src.repo, src.revision, "dataset", datasets.config.HF_DATASETS_CACHE) from None
    except ValueError as exc:  # datasets: an unknown split or config
        first = str(exc).strip().splitlines()[0]
        raise HubError(f"dataset {src.repo}: {first} (write hf:ORG/NAME:SPLIT or hf:ORG/NAME:CONFIG:SPLIT)") from None
