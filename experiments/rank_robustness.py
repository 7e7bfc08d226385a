"""Experiment 2: rank robustness, LoRA vs DoRA at r = 4, 8, 16, 32, 64 (DoRA paper Figure 5 / Table 8).

    python experiments/rank_robustness.py
    python experiments/rank_robustness.py --tasks tweets --lr 1e-3 --name rank_robustness_tweets_lr1e-3

all-MiniLM-L6-v2 on the two tasks and budgets of experiments/method_comparison.py (tweets 100 steps, max_length 64;
bbc 30 steps, max_length 32), 3 seeds. alpha = 2r at every rank (the paper's convention, so the LoRA scale
alpha/r = 2 stays fixed), dropout 0.05, adapters on q, k, v, intermediate and output dense. The learning rate of
each method is the one the method comparison's validation grid picked for it at r = 8 on that task, kept fixed
across ranks (the paper, too, keeps its hyper-parameters fixed across ranks); the r = 8 runs are the method
comparison's own. ``--lr`` runs the same sweep at one given learning rate for both methods instead (into the
experiment folder ``--name``), ``--tasks`` on a subset of the tasks.

Writes experiments/results/rank_robustness/: results.json, results.md, accuracy_vs_rank.png.
Runtime on 2 shared CPU cores (1 torch thread): see results.md (about 40 minutes).
"""

from __future__ import annotations

import argparse

from common import RESULTS, best_lr, markdown_table, pct, runtime_seconds, seeds_result, write_results
from method_comparison import TASKS

NAME = "rank_robustness"
SEEDS = (0, 1, 2)
RANKS = (4, 8, 16, 32, 64)
METHODS = ("lora", "dora")
PAPER = {"lora": [39.5, 40.7, 70.9, 74.7, 65.8], "dora": [61.9, 77.9, 77.5, 78.4, 72.1]}  # LLaMA-7B commonsense avg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--lr", type=float, default=None,
                        help="one learning rate for both methods (default: each method's pick at r 8)")
    parser.add_argument("--name", default=NAME, help=f"experiment folder (default: {NAME})")
    parser.add_argument("--only", choices=METHODS, default=None,
                        help="train this method's runs and stop, writing nothing (to share the runs between two "
                             "processes; a run without --only then reads them back and writes the results)")
    args = parser.parse_args()
    tasks = {t: TASKS[t] for t in args.tasks}

    results, runs = {}, []
    for task, setting in tasks.items():
        for method in (args.only,) if args.only else METHODS:
            lr = args.lr or best_lr("method_comparison", task, method, default=1e-3)
            for r in RANKS:
                options = {"method": method, "rank": r, "alpha": 2.0 * r, "dropout": 0.05}
                # r 8 at the picked lr is the method comparison's own LoRA / DoRA setting: its runs are reused
                reuse = r == 8 and args.lr is None
                where, name = ("method_comparison", method) if reuse else (args.name, f"{method}-r{r}")
                summary, seed_runs = seeds_result(where, name, task, setting, options, SEEDS, lr=lr)
                results.setdefault(task, {}).setdefault(method, {})[r] = summary
                runs += seed_runs
    if args.only:
        return
    seconds = runtime_seconds(runs)
    command = "python experiments/rank_robustness.py" + (
        f" --tasks {' '.join(args.tasks)} --lr {args.lr:g} --name {args.name}" if args.lr else "")
    lr_text = (f"learning rate {args.lr:g} for both methods at every rank" if args.lr else
               "learning rate per method from the method comparison's grid at r = 8, fixed across ranks")
    md = [f"# Rank robustness (experiment 2)\n\n`{command}`: all-MiniLM-L6-v2, test accuracy in % (mean ± sample "
          f"std over seeds 0, 1, 2), alpha = 2r, {lr_text}.\n"]
    for task, setting in tasks.items():
        rows = []
        for r in RANKS:
            lo, do = results[task]["lora"][r], results[task]["dora"][r]
            rows.append([r, pct(lo["mean"], lo["std"]), pct(do["mean"], do["std"]),
                         f"{100 * (do['mean'] - lo['mean']):+.2f}", f"{100 * lo['adapter_parameters'] / lo['total_parameters']:.2f}",
                         f"{100 * do['adapter_parameters'] / do['total_parameters']:.2f}",
                         PAPER["lora"][RANKS.index(r)], PAPER["dora"][RANKS.index(r)]])
        lrs = ", ".join(f"{m} {results[task][m][RANKS[0]]['lr']['best']:g}" for m in METHODS)
        md.append(f"\n## {task}: {setting['steps']} steps of 16, max_length {setting['max_length']} (lr: {lrs})\n\n")
        md.append(markdown_table(["r", "LoRA %", "DoRA %", "DoRA - LoRA", "LoRA adapter % params",
                                  "DoRA adapter % params", "paper LoRA", "paper DoRA"], rows))
    md.append(f"\n![accuracy vs rank](accuracy_vs_rank.png)\n\nRuntime: {seconds / 60:.1f} min for {len(runs)} runs "
              "on 2 shared CPU cores (1 torch thread).\n")
    plot(results, RESULTS / args.name / "accuracy_vs_rank.png")
    write_results(args.name, {"seeds": list(SEEDS), "ranks": list(RANKS), "tasks": tasks, "lr": args.lr,
                              "results": results, "paper": PAPER, "runtime_seconds": seconds}, "".join(md))
    print("".join(md))


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dorafit.files import atomic_write_figure

    fig, axes = plt.subplots(1, len(results) + 1, figsize=(5 * (len(results) + 1), 3.6))
    for ax, (task, by_method) in zip(axes, results.items()):
        for method, colour in zip(METHODS, ("tab:orange", "tab:blue")):
            means = [100 * by_method[method][r]["mean"] for r in RANKS]
            stds = [100 * by_method[method][r]["std"] for r in RANKS]
            ax.errorbar(RANKS, means, yerr=stds, marker="o", capsize=3, color=colour, label=method)
        ax.set_title(f"MiniLM / {task} (mean ± std, 3 seeds)", fontsize=9)
    ax = axes[-1]
    for method, colour in zip(METHODS, ("tab:orange", "tab:blue")):
        ax.plot(RANKS, PAPER[method], marker="s", color=colour, label=method)
    ax.set_title("paper: LLaMA-7B commonsense average", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(RANKS, [str(r) for r in RANKS])
        ax.set_xlabel("rank r")
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_figure(path, fig)
    plt.close(fig)


if __name__ == "__main__":
    main()
