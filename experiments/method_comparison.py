"""Experiment 1: full fine-tuning, LoRA, DoRA, DoRA at half LoRA's rank (the paper's DoRA-dagger) and the reduced
variant (full DoRA on query/key/value, magnitude-only on the other linear layers; paper Table 6) on
all-MiniLM-L6-v2 for two real classification tasks, 3 seeds each.

    python experiments/method_comparison.py

Settings (chosen so the tasks are not saturated; a limited number of training examples):
  tweets  sentiment, 3 classes: 100 steps of 16 (1,600 of the 36,250 training tweets), max_length 64, test 1,908
  bbc     news topic, 5 classes: 30 steps of 16 (480 of 1,780 articles), max_length 32 (headline and first
          sentence), test 445
Adapters on q, k, v, intermediate and output dense (the paper's q,k,v,up,down), r 8 / alpha 16 (DoRA-dagger
r 4 / alpha 8: alpha = 2r as in the paper), dropout 0.05, AdamW, linear decay after 6% warm-up, batch 16; the
classification head (pooler + classifier) trains in full beside every adapter.
Learning rate per method and task: the best of a 3-value grid (full 1e-5, 3e-5, 1e-4; adapters 3e-4, 1e-3,
3e-3) by accuracy on a validation split held out of the training examples (tweets 1,000, bbc 300), seed 0, same
steps; while the best is at an edge of the grid, the next value on the 1-3-10 sequence beyond it is tried too
(at most 2 more; the same rule for every method); then 3 seeds (0, 1, 2) on the test set with that learning rate.

Writes experiments/results/method_comparison/: results.json, results.md, accuracy.png.
Runtime on 2 shared CPU cores (1 torch thread): see results.md (about an hour).
"""

from __future__ import annotations

from common import (RESULTS, markdown_table, pct, plot_bars, runtime_seconds, seeds_result, tuning_seconds,
                    write_results)

NAME = "method_comparison"
SEEDS = (0, 1, 2)
TASKS = {"tweets": {"steps": 100, "max_length": 64, "n_val": 1000},
         "bbc": {"steps": 30, "max_length": 32, "n_val": 300}}
ADAPTER = {"rank": 8, "alpha": 16.0, "dropout": 0.05}
VARIANTS = {
    "full": {"method": "full"},
    "lora": {"method": "lora", **ADAPTER},
    "dora": {"method": "dora", **ADAPTER},
    "dora_half_rank": {"method": "dora", **ADAPTER, "rank": 4, "alpha": 8.0},
    "dora_reduced": {"method": "dora", **ADAPTER, "targets": ["query", "key", "value"],
                     "magnitude_only": ["intermediate.dense", "output.dense"]},
}
GRID = {"full": [1e-5, 3e-5, 1e-4], "adapter": [3e-4, 1e-3, 3e-3]}
LABEL = {"full": "Full FT", "lora": "LoRA r8", "dora": "DoRA r8", "dora_half_rank": "DoRA r4 (half rank)",
         "dora_reduced": "DoRA qkv + magnitude-only rest"}
# the paper's closest numbers: commonsense average of 8 tasks, LLaMA-7B (Tables 1 and 6), trainable share in %
PAPER = {"lora": "74.7 (r32, 0.83%)", "dora": "78.4 (r32, 0.84%)", "dora_half_rank": "77.5 (r16, 0.43%)",
         "dora_reduced": "77.5 (0.39%)", "full": "-"}


def main() -> None:
    results, runs = {}, []
    for task, setting in TASKS.items():
        for variant, options in VARIANTS.items():
            grid = GRID["full" if variant == "full" else "adapter"]
            results.setdefault(task, {})[variant], seed_runs = seeds_result(NAME, variant, task, setting, options,
                                                                            SEEDS, grid=grid)
            runs += seed_runs
    seconds, tuning = runtime_seconds(runs), tuning_seconds(NAME)
    md = ["# Method comparison (experiment 1)\n\n`python experiments/method_comparison.py`: all-MiniLM-L6-v2, "
          "test accuracy in % (mean ± sample std over seeds 0, 1, 2); learning rate picked per method and task on a "
          "validation split of the training data. Trainable share: of all 22.7M parameters, with the classification "
          "head (pooler + classifier, 149k, trained by every method) and without it.\n"]
    for task, setting in TASKS.items():
        rows = []
        for variant in VARIANTS:
            r = results[task][variant]
            total = r["total_parameters"]
            rows.append([LABEL[variant], pct(r["mean"], r["std"]), ", ".join(pct(a) for a in r["test_accuracy"]),
                         f"{r['lr']['best']:g}", f"{100 * r['trainable_share']:.3f}",
                         f"{100 * r['adapter_parameters'] / total:.3f}", PAPER[variant]])
        md.append(f"\n## {task}: {setting['steps']} steps of 16, max_length {setting['max_length']}\n\n")
        md.append(markdown_table(["method", "test acc %", "per seed", "lr", "trainable % (with head)",
                                  "adapter % (no head)", "paper (LLaMA-7B commonsense avg)"], rows))
    md.append("\nValidation accuracy (%) of the learning-rate grid (seed 0):\n\n")
    grid_rows = [[task, LABEL[v]] + [f"{k}: {pct(a)}" for k, a in results[task][v]["lr"]["grid"].items()]
                 for task in TASKS for v in VARIANTS]
    md.append(markdown_table(["task", "method", "learning rate: validation accuracy"],
                             [[t, m, "; ".join(cells)] for t, m, *cells in grid_rows]))
    md.append(f"\n![accuracy](accuracy.png)\n\nRuntime: {seconds / 60:.1f} min for the {len(runs)} final runs + "
              f"{tuning / 60:.1f} min for the learning-rate grids, on 2 shared CPU cores (1 torch thread).\n")
    plot_bars(results, LABEL, RESULTS / NAME / "accuracy.png")
    write_results(NAME, {"seeds": list(SEEDS), "tasks": TASKS, "results": results, "paper": PAPER,
                         "runtime_seconds": seconds, "tuning_seconds": tuning}, "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
