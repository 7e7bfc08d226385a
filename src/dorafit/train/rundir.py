"""The run folder and the files in it, each written atomically.

    RUN/config.json              the resolved options ("config") and what they resolved to ("resolved")
    RUN/metrics.jsonl            one row per optimizer step: step, loss, lr, seconds, tokens_per_s
    RUN/eval.json                the task's metrics per test set, before and after training, parameter counts
    RUN/samples-before.jsonl     generative tasks: (prompt, reference, generated) per evaluated example, before
    RUN/samples.jsonl            ... and after training
    RUN/tensorboard/             with --log tensorboard: TensorBoard event files
    RUN/adapter/                 the adapter (dorafit.save_adapter format); RUN/model/ for --method full
    RUN/loss.png                 the loss curve
    RUN/checkpoint.safetensors   the resumable state (see dorafit.train.checkpoint)
    RUN/snapshots/step-N/        with --save-every: the adapter (full: the --targets weights) at step N
    RUN/.lock                    held (flock) by the process training the run, so that no second one joins in
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..files import atomic_write_figure, atomic_write_json, atomic_write_text

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
ADAPTER = "adapter"
MODEL = "model"
PLOT = "loss.png"
SNAPSHOTS = "snapshots"


LOCK = ".lock"


def lock(run_dir: Path):
    """Take the run folder's lock (released by :func:`unlock` or when the process ends, even by kill -9).

    Returns the open lock file; a ValueError if another process holds it. No-op (None) where flock is missing.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ValueError(f"{run_dir} is being trained by another process (pid {holder}); wait for it to end or stop "
                         f"it, then continue with --resume {run_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def unlock(handle) -> None:
    if handle is not None:
        handle.close()  # closing the file releases the flock


@contextlib.contextmanager
def locked(run_dir: Path):
    """The run folder's lock, held for the block. A folder the block created and left holding nothing but the
    lock file (a new run that failed before writing anything) is removed again."""
    created = not run_dir.exists()
    handle = lock(run_dir)
    try:
        yield
    finally:
        unlock(handle)
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            with contextlib.suppress(OSError):
                (run_dir / LOCK).unlink()
                run_dir.rmdir()


def write_config(run_dir: Path, config: dict, resolved: dict) -> None:
    atomic_write_json(run_dir / CONFIG, {"config": config, "resolved": resolved})


def read_config(run_dir: Path) -> tuple[dict, dict]:
    path = run_dir / CONFIG
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a dorafit run folder (no {CONFIG}); give the folder a `dorafit train` "
                         "run wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["config"], data["resolved"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is damaged ({exc!r}); the run cannot be used") from None


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_eval(run_dir: Path, result: dict) -> None:
    atomic_write_json(run_dir / EVAL, result)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what a process killed while writing left behind: temporary files of atomic writes in the run folder
    and its adapter / snapshot folders, and half-written model folders (``.model.*``). Returns what was removed."""
    import shutil

    from ..files import stale_temporary_files

    removed = []
    folders = [run_dir, run_dir / ADAPTER, *sorted((run_dir / SNAPSHOTS).glob("step-*"))]
    for folder in folders:
        if folder.is_dir():
            for path in stale_temporary_files(folder):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    for path in run_dir.glob(f".{MODEL}.*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def samples_file(run_dir: Path, when: str) -> Path:
    return run_dir / ("samples.jsonl" if when == "after" else f"samples-{when}.jsonl")


def write_samples(run_dir: Path, when: str, samples: list[dict]) -> Path:
    """The generated samples of the evaluation ``when`` ("before" or "after" training), one JSON object a line."""
    path = samples_file(run_dir, when)
    atomic_write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return path


def plot_loss(run_dir: Path, rows: list[dict], title: str) -> Path | None:
    """Loss per step (thin) and its moving average over ~4% of the steps (thick), as a PNG."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(rows) // 25)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    if window > 1:
        ax.plot(steps, smooth, lw=1.8, label=f"mean of {window} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / PLOT
    atomic_write_figure(path, fig)
    return path


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a run folder (its config.json holds "config" and "resolved", unlike a model's)."""
    try:
        data = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "resolved" in data and "config" in data
