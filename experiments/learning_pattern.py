"""Experiment 5: the learning pattern of full fine-tuning, LoRA and DoRA (DoRA paper section 3, Figure 2).

    python experiments/learning_pattern.py [--seeds 0 1 2]

all-MiniLM-L6-v2 on tweet sentiment, the method comparison's tweets setting (100 steps of 16, max_length 64) and
learning rates (the ones its validation grid picked for full, lora and dora on tweets), adapters on q, k, v,
intermediate and output dense (r 8, alpha 16, dropout 0.05), snapshots every 10 steps; the weight-decomposition
analysis on the query and value weights of all 6 layers (``dorafit analyze`` under the hood), one point per layer
per snapshot. The paper (VL-BART, query/value): correlation of dM on dD FT -0.62, DoRA -0.31, LoRA +0.83.

Writes experiments/results/learning_pattern/: decomposition.png / .csv / summary.json (seed 0, the figure),
results.json and results.md (correlations and slopes per seed next to the paper's, test accuracy).
Runtime on 2 shared CPU cores (1 torch thread): see results.md (about 6 minutes per seed).
"""

from __future__ import annotations

import argparse

from common import RESULTS, ROOT, best_lr, markdown_table, mean_std, pct, runtime_seconds, train_run, write_results

from dorafit import analysis

NAME = "learning_pattern"
METHODS = ("full", "lora", "dora")
# used only if experiments/method_comparison.py has not run yet: the middle of its grids
DEFAULT_LR = {"full": 3e-5, "lora": 1e-3, "dora": 1e-3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                        help="learning rates to use instead of the method comparison's, e.g. full=3e-5")
    parser.add_argument("--name", default=NAME, help="results folder under experiments/results")
    args = parser.parse_args()
    lrs = {m: best_lr("method_comparison", "tweets", m, DEFAULT_LR[m]) for m in METHODS}
    lrs.update({m: float(v) for m, v in (item.split("=", 1) for item in args.lr)})

    per_seed, runs = {}, []
    for seed in args.seeds:
        seed_runs = []
        for method in METHODS:
            adapter = {} if method == "full" else {"rank": 8, "alpha": 16.0, "dropout": 0.05}
            seed_runs.append(train_run(NAME, f"{method}-lr{lrs[method]:g}-{args.steps}steps-s{seed}", task="tweets",
                                       method=method, lr=lrs[method], max_length=64, steps=args.steps,
                                       save_every=args.every, seed=seed, **adapter))
        out = RESULTS / args.name if seed == args.seeds[0] else RESULTS / args.name / f"seed{seed}"
        summary = analysis.analyze_runs([ROOT / r["folder"] for r in seed_runs], out, modules=["query", "value"],
                                        title=f"MiniLM / tweets, {args.steps} steps, query+value of 6 layers, "
                                        f"seed {seed}")
        per_seed[seed] = {m: {**summary["methods"][m], "test_accuracy": r["average"], "lr": lrs[m]}
                          for m, r in zip(METHODS, seed_runs)}
        runs += seed_runs

    rows = []
    for m in METHODS:
        corrs = [per_seed[s][m]["correlation"] for s in args.seeds]
        accs = [per_seed[s][m]["test_accuracy"] for s in args.seeds]
        corr_mean, corr_std = mean_std(corrs)
        rows.append([m, f"{lrs[m]:g}", ", ".join(f"{c:+.2f}" for c in corrs),
                     f"{corr_mean:+.2f}" + (f" ± {corr_std:.2f}" if len(corrs) > 1 else ""),
                     ", ".join(f"{per_seed[s][m]['slope']:.3g}" for s in args.seeds),
                     ", ".join(f"{per_seed[s][m]['within_step_correlation']:+.2f}" for s in args.seeds),
                     ", ".join(f"{per_seed[s][m]['mean_dM'] / per_seed[s][m]['mean_dD']:.2f}" for s in args.seeds),
                     f"{analysis.PAPER_CORRELATIONS[m]:+.2f}", pct(*mean_std(accs)) if len(accs) > 1 else pct(accs[0])])
    seconds = runtime_seconds(runs)
    command = " ".join(["python experiments/learning_pattern.py --seeds", *map(str, args.seeds)]
                       + ([f"--steps {args.steps} --every {args.every}"] if args.steps != 100 or args.every != 10 else [])
                       + (["--lr", *args.lr] if args.lr else []) + ([f"--name {args.name}"] if args.name != NAME else []))
    md = (f"# Learning pattern (experiment 5)\n\n`{command}`: MiniLM on tweets, {args.steps} steps of 16, snapshots every "
          f"{args.every} steps, query+value weights of 6 layers ({args.steps // args.every} snapshots x 12 layers "
          f"= {12 * (args.steps // args.every)} points per method and seed; step 0 left out of the fit).\n\n"
          + markdown_table(["method", "lr", "correlation per seed", "mean", "slope per seed",
                            "within-step correlation per seed", "mean dM / mean dD per seed", "paper correlation",
                            "test accuracy %"], rows)
          + "\nCorrelation and slope: of dM on dD over all points (the paper's measure). Within-step correlation: "
          "the mean over snapshot steps of the correlation across the 12 layers at that step, which leaves out the "
          "growth that all layers share over training. Mean dM / mean dD: how much a method changes magnitudes "
          "for a given change of direction.\n"
          + f"\n![dD vs dM](decomposition.png)\n\nRuntime: {seconds / 60:.1f} min of training runs on 2 shared "
          f"CPU cores (1 torch thread).\n")
    write_results(args.name, {"seeds": args.seeds, "steps": args.steps, "every": args.every, "per_seed": per_seed,
                         "runtime_seconds": seconds,
                         "runs": [{k: r[k] for k in ("folder", "average", "wall_seconds")} for r in runs]}, md)
    print(md)


if __name__ == "__main__":
    main()
