"""Experiment 9: DoRA r8 vs LoRA r8 over many paired seeds, to tell a small edge from noise.

    python experiments/paired_seeds.py [--seeds N]

The settings of experiment 1 (method_comparison.py: MiniLM, tweets 100 steps of 16 at max_length 64, bbc 30 steps
of 16 at max_length 32, r 8 / alpha 16 / dropout 0.05 on q, k, v, intermediate and output dense), each method at the
learning rate experiment 1's validation grid picked for it, seeds 0 .. N-1 (default 10). Seed s is the same data
order for both methods, so the runs pair by seed; the runs are experiment 1's own folders
(runs/experiments/method_comparison/), so a re-run of experiment 1 reuses seeds 0-2.

Reported per task: the mean paired difference DoRA - LoRA in test accuracy points with its 95% t-interval, the
seeds where each method is ahead, the exact sign test, and the verdict of common.verdict against the smallest
DoRA - LoRA gain the paper reports (common.SMALLEST_PAPER_GAIN, +0.7 points).

Writes experiments/results/paired_seeds/: results.json, results.md, paired.png.
Runtime on 2 CPU cores (1 torch thread): see results.md.
"""

from __future__ import annotations

import argparse

from common import (RESULTS, SMALLEST_PAPER_GAIN, best_lr, interval, markdown_table, paired_difference, pct,
                    seeds_result, verdict, write_results)
from dorafit.files import atomic_write_figure
from method_comparison import NAME as EXPERIMENT_1, TASKS, VARIANTS

NAME = "paired_seeds"
METHODS = ("lora", "dora")


def plot(paired: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paired), figsize=(5.5 * len(paired), 3.6), squeeze=False)
    for ax, (task, p) in zip(axes[0], paired.items()):
        diffs = [100 * d for d in p["per_seed"]]
        ax.plot(range(len(diffs)), diffs, "k.", ms=7, label="seed")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhspan(100 * p["ci95"][0], 100 * p["ci95"][1], color="#9ecae1", alpha=0.5, label="95% CI of the mean")
        ax.axhline(100 * p["mean"], color="#3182bd", lw=1.5, label=f"mean {100 * p['mean']:+.2f}")
        ax.axhline(100 * SMALLEST_PAPER_GAIN, color="#e6550d", lw=1, ls="--", label="paper's smallest gain")
        ax.set_xlabel("seed")
        ax.set_ylabel("DoRA r8 - LoRA r8, test accuracy points")
        ax.set_title(f"MiniLM / {task}: {p['n']} paired seeds", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_figure(path, fig)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 (default 10)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    if not 2 <= args.seeds <= 31:
        parser.error("--seeds must be between 2 and 31 (the t table's range)")
    seeds = range(args.seeds)

    lrs = {(task, method): best_lr(EXPERIMENT_1, task, method, default=3e-3 if task == "tweets" else 1e-3)
           for task in args.tasks for method in METHODS}
    for seed in seeds:  # train seed by seed, so that a stopped experiment still holds whole pairs
        for (task, method), lr in lrs.items():
            seeds_result(EXPERIMENT_1, method, task, TASKS[task], VARIANTS[method], [seed], lr=lr)

    results, paired, runs = {}, {}, []
    for task in args.tasks:
        for method in METHODS:
            summary, seed_runs = seeds_result(EXPERIMENT_1, method, task, TASKS[task], VARIANTS[method], seeds,
                                              lr=lrs[task, method])
            results.setdefault(task, {})[method] = summary
            runs += seed_runs
        paired[task] = paired_difference(results[task]["dora"]["test_accuracy"],
                                         results[task]["lora"]["test_accuracy"])
        paired[task]["verdict"] = verdict(paired[task]["ci95"], SMALLEST_PAPER_GAIN)
    seconds = round(sum(r["wall_seconds"] or 0 for r in runs), 1)

    md = [f"# DoRA vs LoRA over {args.seeds} paired seeds (experiment 9)\n\n`python experiments/{NAME}.py --seeds "
          f"{args.seeds}`: MiniLM, experiment 1's settings and learning rates, DoRA r8 and LoRA r8, seeds 0-"
          f"{args.seeds - 1}; test accuracy in %. Paired difference DoRA - LoRA in points; verdict against the "
          f"paper's smallest gain, +{100 * SMALLEST_PAPER_GAIN:.1f} points.\n\n"]
    rows = []
    for task in args.tasks:
        lora, dora, p = results[task]["lora"], results[task]["dora"], paired[task]
        rows.append([task, f"{dora['lr']['best']:g} / {lora['lr']['best']:g}", pct(lora["mean"], lora["std"]),
                     pct(dora["mean"], dora["std"]), interval(p), p["verdict"]])
    md.append(markdown_table(["task", "lr DoRA / LoRA", "LoRA r8 %", "DoRA r8 %", "DoRA - LoRA (paired by seed)",
                              "verdict"], rows))
    md.append("\nPer seed: test accuracy %, and the difference in points.\n")
    for task in args.tasks:
        lora, dora = results[task]["lora"]["test_accuracy"], results[task]["dora"]["test_accuracy"]
        md.append(f"\n## {task}\n\n")
        md.append(markdown_table(["seed", "LoRA r8", "DoRA r8", "DoRA - LoRA"],
                                 [[s, pct(a), pct(b), f"{100 * (b - a):+.2f}"] for s, a, b in zip(seeds, lora, dora)]))
    md.append(f"\n![paired differences](paired.png)\n\nRuntime: {seconds / 60:.1f} min for {len(runs)} runs "
              f"(1 torch thread each, 2-core CPU).\n")
    plot(paired, RESULTS / NAME / "paired.png")
    write_results(NAME, {"seeds": list(seeds), "tasks": {t: TASKS[t] for t in args.tasks}, "results": results,
                         "dora_minus_lora": paired, "smallest_paper_gain": SMALLEST_PAPER_GAIN,
                         "runtime_seconds": seconds}, "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
