"""Experiment 4: VeRA vs DVoRA (DoRA whose directional update is VeRA's; DoRA paper section 5.4, Table 5).

    python experiments/vera_dvora.py [--seeds N]

all-MiniLM-L6-v2 on the two tasks and budgets of experiments/method_comparison.py (tweets 100 steps, max_length 64;
bbc 30 steps, max_length 32), 3 seeds by default. Shared frozen random projections of rank 256 on q, k, v,
intermediate and output dense (the largest power of two below the 384-wide hidden size; VeRA uses high ranks since
only the scaling vectors train), d initialised to 0.1, b to 0. Learning rate per method and task: the best of the
grid 3e-3, 1e-2, 3e-2 (extended at an edge as in the method comparison) on the same validation split and budget.
LoRA and DoRA (r 8) from experiment 9 (paired_seeds.py: the same settings, 10 seeds) are shown beside them.

--seeds N (default 3) runs seeds 0 .. N-1 on the test set. Once results.json holds the grid's choice, more seeds
reuse that learning rate (and keep its grid record) instead of training the grid again.

Writes experiments/results/vera_dvora/: results.json, results.md, accuracy.png.
Runtime on 2 shared CPU cores (1 torch thread): see results.md (about 30 minutes).
"""

from __future__ import annotations

import argparse
import json

from common import (RESULTS, markdown_table, pct, plot_bars, runtime_seconds, seeds_result, tuning_seconds,
                    write_results)
from method_comparison import TASKS

NAME = "vera_dvora"
VARIANTS = {"vera": {"method": "vera", "rank": 256, "dropout": 0.05},
            "dvora": {"method": "dvora", "rank": 256, "dropout": 0.05}}
GRID = [3e-3, 1e-2, 3e-2]
LABEL = {"vera": "VeRA r256", "dvora": "DVoRA r256", "lora": "LoRA r8 (exp. 9)", "dora": "DoRA r8 (exp. 9)"}
PAPER = {"lora": 5.1, "dora": 5.5, "vera": 4.3, "dvora": 5.0}  # MT-Bench score, LLaMA-7B instruction tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    seeds = range(args.seeds)
    done = RESULTS / NAME / "results.json"
    chosen = json.loads(done.read_text())["results"] if done.is_file() else {}
    lrs = {(task, variant): chosen.get(task, {}).get(variant, {}).get("lr") for task in TASKS for variant in VARIANTS}
    if all(lrs.values()):  # train seed by seed, so that a stopped run still holds whole pairs
        for seed in seeds:
            for (task, variant), lr in lrs.items():
                seeds_result(NAME, variant, task, TASKS[task], VARIANTS[variant], [seed], lr=lr["best"])
    results, runs = {}, []
    for task, setting in TASKS.items():
        for variant, options in VARIANTS.items():
            lr = lrs[task, variant]
            summary, seed_runs = seeds_result(NAME, variant, task, setting, options, seeds,
                                              **({"lr": lr["best"]} if lr else {"grid": GRID}))
            results.setdefault(task, {})[variant] = {**summary, "lr": lr or summary["lr"]}
            runs += seed_runs
    seconds = runtime_seconds(runs)
    tuning = tuning_seconds(NAME)
    if not tuning and done.is_file():  # the grid was trained by an earlier run of this script
        tuning = json.loads(done.read_text())["tuning_seconds"]
    comparison = RESULTS / "paired_seeds" / "results.json"
    earlier = json.loads(comparison.read_text())["results"] if comparison.is_file() else {}
    md = ["# VeRA vs DVoRA (experiment 4)\n\n`python experiments/vera_dvora.py`: all-MiniLM-L6-v2, test accuracy in "
          f"% (mean ± sample std over seeds 0-{len(seeds) - 1}), learning rate per method and task from a validation "
          "grid "
          f"({', '.join(f'{g:g}' for g in GRID)}). The paper's numbers are MT-Bench scores (LLaMA-7B, out of 10).\n"]
    shown = {}
    for task, setting in TASKS.items():
        shown[task] = {**results[task], **{m: earlier[task][m] for m in ("lora", "dora") if m in earlier.get(task, {})}}
        rows = [[LABEL[v], pct(r["mean"], r["std"]), ", ".join(pct(a) for a in r["test_accuracy"]),
                 f"{r['lr']['best']:g}", f"{100 * r['adapter_parameters'] / r['total_parameters']:.4f}",
                 f"{r['adapter_parameters']:,}", PAPER[v]] for v, r in shown[task].items()]
        md.append(f"\n## {task}: {setting['steps']} steps of 16, max_length {setting['max_length']}\n\n")
        md.append(markdown_table(["method", "test acc %", "per seed", "lr", "adapter % params (no head)",
                                  "adapter params", "paper (MT-Bench)"], rows))
    md.append("\nValidation accuracy (%) of the learning-rate grid (seed 0):\n\n")
    md.append(markdown_table(["task", "method", "learning rate: validation accuracy"],
                             [[task, LABEL[v], "; ".join(f"{k}: {pct(a)}" for k, a in results[task][v]["lr"]["grid"].items())]
                              for task in TASKS for v in VARIANTS]))
    md.append(f"\n![accuracy](accuracy.png)\n\nRuntime: {seconds / 60:.1f} min for the {len(runs)} final runs + "
              f"{tuning / 60:.1f} min for the learning-rate grids, on 2 shared CPU cores (1 torch thread).\n")
    plot_bars(shown, LABEL, RESULTS / NAME / "accuracy.png")
    write_results(NAME, {"seeds": list(seeds), "tasks": TASKS, "results": results, "paper_mt_bench": PAPER,
                         "runtime_seconds": seconds, "tuning_seconds": tuning}, "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
