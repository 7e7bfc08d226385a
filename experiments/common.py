"""What the experiment scripts share: one training run (cached), learning-rate selection on a validation split,
statistics, and writing results (JSON + Markdown) with the machine they ran on.

Runs go to ``runs/experiments/<experiment>/<run>/`` (git-ignored) through dorafit's own training tool
(:func:`dorafit.train.runner.train`); a run whose folder already holds a finished ``eval.json`` is read back instead
of trained again, so an interrupted experiment continues where it stopped. Every run uses one torch thread: the
machine has 2 cores shared with other work, where two threads per process thrash (measured: 4.5 s vs 0.7 s per
MiniLM step under load).

Learning rates are chosen per method on a validation split carved out of the task's TRAINING examples (never the
test set): the same grid size, steps and seed for every method; the test set is only used for the final runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dorafit.files import atomic_write_figure, atomic_write_json, atomic_write_text  # noqa: E402
from dorafit.train.options import TrainConfig  # noqa: E402
from dorafit.train.tasks import task_type  # noqa: E402

RUNS = ROOT / "runs" / "experiments"
RESULTS = ROOT / "experiments" / "results"
THREADS = 1
WALL = "experiment_wall.json"  # per run folder: wall seconds of the call that trained it


def machine() -> dict:
    """Where and with what the experiment ran."""
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True,
                           text=True).stdout.split("\n")
    return {"host": platform.node(), "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": THREADS,
            "torch": torch.__version__, "python": platform.python_version(), "git_commit": commit,
            "uncommitted_src_changes_at_write": [line[3:] for line in dirty if line.strip()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "note": "2 CPU cores shared with other engineers' jobs at the same time; timings are indicative"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- runs ----------------------------------------------------------------------------------------------------
def finished(folder: Path) -> dict | None:
    """The eval.json of a finished run (one with an after-training result), else None."""
    path = folder / "eval.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if "step" in result else None


def train_run(experiment: str, name: str, **options) -> dict:
    """Train (or read back) one run; returns its eval.json plus ``wall_seconds``, ``config`` and ``folder``."""
    from dorafit.train.runner import train

    folder = RUNS / experiment / name
    options = {"eval_before": False, "threads": THREADS, "checkpoint_every": 10_000, **options}
    result = finished(folder)
    if result is None:
        if (folder / "config.json").is_file():  # interrupted: drop it and start clean (runs are short)
            import shutil

            shutil.rmtree(folder)
        print(f"\n=== {experiment}/{name}: {options}", flush=True)
        started = time.monotonic()
        code = train(TrainConfig(out=str(folder), **options), dict(options))
        if code != 0:
            raise RuntimeError(f"run {folder} failed with exit code {code}")
        atomic_write_json(folder / WALL, {"wall_seconds": round(time.monotonic() - started, 1)})
        result = finished(folder)
    wall = json.loads((folder / WALL).read_text())["wall_seconds"] if (folder / WALL).is_file() else None
    config = json.loads((folder / "config.json").read_text())
    differ = {k: (v, config["config"][k]) for k, v in options.items() if k not in ("threads", "out")
              and config["config"][k] != (list(v) if isinstance(v, tuple) else v)}
    if differ:
        raise RuntimeError(f"{folder} was trained with other options than asked now: {differ}; remove the folder")
    return {**result, "wall_seconds": wall, "config": config["config"], "resolved": config["resolved"],
            "folder": str(folder.relative_to(ROOT))}


def adapter_only_parameters(run: dict) -> int:
    """Trainable parameters minus the classification head's (pooler + classifier), from the saved adapter file."""
    from safetensors import safe_open

    if run["config"]["method"] == "full":
        return run["trainable_parameters"]
    head = tuple(f"{h}." for h in run["config"]["head"] or [])
    with safe_open(str(ROOT / run["folder"] / "adapter" / "adapter.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith(head))


# ---- validation split for learning-rate selection -------------------------------------------------------------
def validation_files(task: str, n_val: int, seed: int = 0) -> tuple[str, str]:
    """(train.jsonl, val.jsonl) from the preset's training split: ``n_val`` examples held out by ``seed``."""
    folder = RUNS / "data" / f"{task}-val{n_val}-seed{seed}"
    train_path, val_path = folder / "train.jsonl", folder / "val.jsonl"
    if not val_path.is_file():
        data = task_type(task).load_data(task, TrainConfig(task=task))
        rows = list(data.train)
        random.Random(seed).shuffle(rows)
        labels = data.extra["labels"]
        write = lambda path, part: atomic_write_text(  # noqa: E731
            path, "".join(json.dumps({"text": t, "label": labels[y]}) + "\n" for t, y in part))
        write(train_path, rows[n_val:])
        write(val_path, rows[:n_val])
    return str(train_path), str(val_path)


def select_lr(experiment: str, name: str, grid: list[float], task: str, n_val: int, extend: int = 2,
              **options) -> dict:
    """Train ``name`` once per learning rate on the training split minus ``n_val`` validation examples (seed 0)
    and return {"best": lr, "grid": {lr: validation accuracy}}. Ties go to the smaller lr.

    The grid is on the 1-3-10 sequence (1e-4, 3e-4, 1e-3, ...); while the best value is at an edge of it, the
    next value of the sequence beyond that edge is tried, at most ``extend`` times: the same rule for every method.
    """
    train_file, val_file = validation_files(task, n_val)
    grid, scores = sorted(grid), {}

    def score(lr: float) -> float:
        run = train_run(experiment, f"lr-{name}-{task}-{lr:g}", task=train_file, eval_file=val_file, lr=lr, seed=0,
                        **options)
        return run["average"]

    for lr in grid:
        scores[lr] = score(lr)
    for _ in range(extend):
        best = max(grid, key=lambda lr: (scores[lr], -lr))
        if best not in (grid[0], grid[-1]):
            break
        lr = one_three_ten(best, up=best == grid[-1])
        grid = sorted([*grid, lr])
        scores[lr] = score(lr)
    best = max(grid, key=lambda lr: (scores[lr], -lr))
    return {"best": best, "grid": {f"{lr:g}": scores[lr] for lr in grid}, "validation_examples": n_val}


def one_three_ten(x: float, up: bool) -> float:
    """The neighbour of ``x`` on the 1-3-10 sequence: 1e-3 -> 3e-3 (up) or 3e-4 (down); 3e-3 -> 1e-2 or 1e-3."""
    exponent = math.floor(math.log10(x) + 1e-9)
    ones = round(x / 10**exponent) == 1
    if up:
        return float(f"{(3 if ones else 10) * 10**exponent:.1g}")
    return float(f"{(0.3 if ones else 1) * 10**exponent:.1g}")


def seeds_result(experiment: str, name: str, task: str, setting: dict, options: dict, seeds, lr: float | None = None,
                 grid: list[float] | None = None) -> tuple[dict, list[dict]]:
    """Test accuracy of ``options`` on ``task`` over ``seeds``, at ``lr`` or at the best of ``grid`` (select_lr).

    ``setting`` holds the task's steps, max_length and n_val. Returns (summary, runs).
    """
    common = {"steps": setting["steps"], "max_length": setting["max_length"]}
    chosen = {"best": lr} if grid is None else select_lr(experiment, name, grid, task, setting["n_val"], **common,
                                                         **options)
    runs = [train_run(experiment, f"{name}-{task}-lr{chosen['best']:g}-s{seed}", task=task, lr=chosen["best"],
                      seed=seed, **common, **options) for seed in seeds]
    accs = [r["average"] for r in runs]
    mean, std = mean_std(accs)
    summary = {"lr": chosen, "test_accuracy": accs, "mean": mean, "std": std,
               "trainable_parameters": runs[0]["trainable_parameters"],
               "total_parameters": runs[0]["total_parameters"], "trainable_share": runs[0]["trainable_share"],
               "adapter_parameters": adapter_only_parameters(runs[0]),
               "train_seconds": [r["train_seconds"] for r in runs], "options": {**common, **options}}
    print(f"{experiment}: {task} {name}: lr {chosen['best']:g}, test {pct(mean, std)}", flush=True)
    return summary, runs


def tuning_seconds(experiment: str) -> float:
    """Wall seconds of an experiment's learning-rate grid runs (folders named lr-*)."""
    return round(sum(json.loads(p.read_text())["wall_seconds"] for p in (RUNS / experiment).glob(f"lr-*/{WALL}")), 1)


def best_lr(experiment: str, task: str, variant: str, default: float) -> float:
    """The learning rate another experiment's grid picked (its results.json), or ``default`` if it has not run."""
    path = RESULTS / experiment / "results.json"
    if not path.is_file():
        print(f"note: {path} missing; using lr {default:g} for {variant} on {task}", flush=True)
        return default
    return json.loads(path.read_text())["results"][task][variant]["lr"]["best"]


# ---- statistics and output -------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std 0 for a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# the smallest DoRA - LoRA gain the paper reports, accuracy as a fraction: +0.7 points (Table 4, LLaVA-1.5-7B visual
# instruction tuning, 67.6 vs 66.9; its LLM gains are +1.0 to +4.4)
SMALLEST_PAPER_GAIN = 0.007
# two-sided 95% quantiles of Student's t, t(0.975, df), df = 1..30 (standard tables)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Paired comparison of ``a`` against ``b`` (same seeds, same order): d_i = a_i - b_i.

    mean d, its 95% t-interval mean +- t(0.975, n-1) * sd(d) / sqrt(n), the seeds where each is ahead, and the
    exact two-sided sign test p = min(1, 2 * P(Binomial(wins + losses, 1/2) <= min(wins, losses))) (ties left out).
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired difference needs two equal lists of at least 2 values, got {len(a)} and {len(b)}")
    if len(a) - 1 > len(T95):
        raise ValueError(f"the t table stops at {len(T95) + 1} pairs; got {len(a)}")
    diffs = [x - y for x, y in zip(a, b)]
    n, (mean, sd) = len(diffs), mean_std(diffs)
    half = T95[n - 2] * sd / math.sqrt(n)
    ahead, behind = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    decided = ahead + behind
    tail = sum(math.comb(decided, k) for k in range(min(ahead, behind) + 1)) / 2**decided if decided else 1.0
    return {"n": n, "per_seed": diffs, "mean": mean, "sd": sd, "t": T95[n - 2], "ci95": [mean - half, mean + half],
            "a_ahead": ahead, "b_ahead": behind, "ties": n - decided, "sign_test_p": min(1.0, 2 * tail)}


def verdict(ci95: list[float], smallest_claimed: float = 0.0) -> str:
    """What a 95% interval of A - B (say DoRA - LoRA) says of the claim "A is ahead".

    "reproduced": the whole interval is above 0. "not reproduced": it is not above 0 and its top is below
    ``smallest_claimed`` (the smallest gain the paper reports on that scale): an edge as large as the paper's is
    excluded. "undecided at this scale": the interval holds both no edge and the paper's.
    """
    low, high = ci95
    if low > 0:
        return "reproduced"
    if high < smallest_claimed or high < 0:
        return "not reproduced"
    return "undecided at this scale"


def interval(paired: dict, scale: float = 100, unit: str = "points") -> str:
    """'+0.30 points, 95% CI [-0.12, +0.72], ahead on 7 of 10 seeds, behind on 2, 1 tied, sign test p 0.18'."""
    low, high = paired["ci95"]
    ties = f", {paired['ties']} tied" if paired["ties"] else ""
    return (f"{scale * paired['mean']:+.2f} {unit}, 95% CI [{scale * low:+.2f}, {scale * high:+.2f}], ahead on "
            f"{paired['a_ahead']} of {paired['n']} seeds, behind on {paired['b_ahead']}{ties}, sign test p "
            f"{paired['sign_test_p']:.2g}")


def pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def runtime_seconds(runs: list[dict]) -> float:
    return round(sum(r["wall_seconds"] or 0 for r in runs), 1)


def write_results(experiment: str, data: dict, markdown: str) -> Path:
    """experiments/results/<experiment>/results.json and results.md; returns the folder."""
    folder = RESULTS / experiment
    atomic_write_json(folder / "results.json", {"experiment": experiment, "machine": machine(), **data})
    atomic_write_text(folder / "results.md", markdown)
    return folder


def plot_bars(results: dict, labels: dict, path) -> None:
    """One panel per task: mean test accuracy per method with the seed-to-seed std as error bar, seeds as dots."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.8), squeeze=False)
    for ax, (task, by_variant) in zip(axes[0], results.items()):
        names = list(by_variant)
        means = [100 * by_variant[v]["mean"] for v in names]
        stds = [100 * by_variant[v]["std"] for v in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#9ecae1")
        for i, v in enumerate(names):
            ax.plot([i] * len(by_variant[v]["test_accuracy"]), [100 * a for a in by_variant[v]["test_accuracy"]],
                    "k.", ms=5)
        low = min(100 * a for v in names for a in by_variant[v]["test_accuracy"])
        ax.set_ylim(low - 3, max(m + s for m, s in zip(means, stds)) + 1.5)
        ax.set_xticks(range(len(names)), [labels[v] for v in names], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"MiniLM / {task} ({len(by_variant[names[0]]['test_accuracy'])} seeds)", fontsize=10)
    fig.tight_layout()
    atomic_write_figure(path, fig)
    plt.close(fig)
