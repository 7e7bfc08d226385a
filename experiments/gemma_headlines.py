"""Experiment 8: generation. LoRA vs DoRA at r 8 and r 16 on Gemma-3-270M writing BBC News headlines
(`bbc-headlines`), scored by ROUGE-L of greedy generations against the real headlines.

    scripts/bootstrap gemma
    python experiments/gemma_headlines.py [--seeds 0 1] [--steps N] [--batch-size B] [--eval-limit K] [--lr X]

Sized for 2 CPU cores (one torch thread per run, so two seeds can train side by side):
  training: the preset's 2,003 training articles (headline = the file's first line, input = the body's first 100
            words, Alpaca prompt, loss on the response only), --steps x --batch-size of them in the seeded order of
            dorafit's loop (default 80 x 4 = 320, 0.16 epochs), max_length 256;
  testing:  the first --eval-limit (default 100) of the 222 held-out articles, greedy, at most 32 new tokens;
            ROUGE-L F1 (rouge-score, Porter stemming) per article, averaged.
Adapters on q, k, v, up, down (the paper's targets), alpha = 2r, dropout 0.05, lr 5e-4 for every variant (the
README demo's rate; no grid: one Gemma run takes about 15 minutes on one core here), linear decay after 6% warm-up.
The seed sets the data order, the adapters' initialisation and dropout; the same seed gives every variant the same
articles in the same order.

Two paired analyses of DoRA - LoRA at each rank:
  over seeds:    the mean ROUGE-L of each run, paired by seed (95% t-interval; wide with few seeds);
  over articles: per article, DoRA's ROUGE-L minus LoRA's averaged over the seeds, with a 95% bootstrap interval
                 over the articles (10,000 resamples): how much the test articles, not the training seeds, vary.

Writes experiments/results/gemma_headlines/: results.json, results.md, rouge_l.png, with the machine.
"""

from __future__ import annotations

import argparse
import json
import random

from common import (ROOT, RESULTS, interval, markdown_table, mean_std, paired_difference, runtime_seconds,
                    train_run, verdict, write_results)
from dorafit.files import atomic_write_figure

NAME = "gemma_headlines"
VARIANTS = {"lora_r8": ("lora", 8), "dora_r8": ("dora", 8), "lora_r16": ("lora", 16), "dora_r16": ("dora", 16)}
LABEL = {"lora_r8": "LoRA r8", "dora_r8": "DoRA r8", "lora_r16": "LoRA r16", "dora_r16": "DoRA r16"}
BOOTSTRAP = 10_000


def per_article(run: dict) -> list[dict]:
    """The run's samples.jsonl: one {"reference", "generated", "rouge_l"} per evaluated article, in test order."""
    path = ROOT / run["folder"] / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bootstrap_ci(values: list[float], reps: int = BOOTSTRAP, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampled with replacement, seeded)."""
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(reps))
    return [means[int(0.025 * reps)], means[int(0.975 * reps) - 1]]


def plot(results: dict, article_diffs: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(results)
    means = [results[v]["mean"] for v in names]
    ax.bar(range(len(names)), means, yerr=[results[v]["std"] for v in names], capsize=4, color="#9ecae1")
    for i, v in enumerate(names):
        ax.plot([i] * len(results[v]["rouge_l"]), results[v]["rouge_l"], "k.", ms=6)
    ax.set_xticks(range(len(names)), [LABEL[v] for v in names])
    ax.set_ylabel("ROUGE-L F1 (mean over articles)")
    ax.set_title(f"Gemma-3-270M / bbc-headlines ({len(results[names[0]]['rouge_l'])} seeds)", fontsize=10)
    ranks = list(article_diffs)
    ax2.boxplot([article_diffs[r]["per_article"] for r in ranks], showmeans=True)
    ax2.set_xticks(range(1, len(ranks) + 1), [f"r {r}" for r in ranks])
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_ylabel("DoRA - LoRA ROUGE-L per article")
    ax2.set_title("per article, averaged over seeds (triangle: mean)", fontsize=10)
    fig.tight_layout()
    atomic_write_figure(path, fig)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="train only these (to split a seed between two processes); results need all four")
    parser.add_argument("--name", default=NAME, help=f"experiment folder for the runs and results (default: {NAME})")
    args = parser.parse_args()

    runs = {v: [] for v in VARIANTS}
    for seed in args.seeds:  # seed by seed, so that a stopped experiment still holds whole seeds
        for variant in args.variants:
            method, r = VARIANTS[variant]
            runs[variant].append(train_run(
                args.name, f"{variant}-s{seed}", model="gemma-3-270m", task="bbc-headlines", method=method, rank=r,
                alpha=2.0 * r, dropout=0.05, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                eval_limit=args.eval_limit, seed=seed))
    if set(args.variants) != set(VARIANTS):
        print(f"trained {', '.join(args.variants)} for seeds {args.seeds}; run again with all variants for the results")
        return

    results = {}
    for variant, seed_runs in runs.items():
        scores = [run["tasks"]["bbc-headlines"]["rouge_l"] for run in seed_runs]
        losses = [run["tasks"]["bbc-headlines"]["loss"] for run in seed_runs]
        mean, std = mean_std(scores)
        results[variant] = {"rouge_l": scores, "mean": mean, "std": std, "loss": losses,
                            "exact_match": [run["tasks"]["bbc-headlines"]["exact_match"] for run in seed_runs],
                            "trainable_parameters": seed_runs[0]["trainable_parameters"],
                            "trainable_share": seed_runs[0]["trainable_share"],
                            "train_seconds": [run["train_seconds"] for run in seed_runs],
                            "folders": [run["folder"] for run in seed_runs]}

    by_seed, by_article = {}, {}
    for r in (8, 16):
        lora, dora = runs[f"lora_r{r}"], runs[f"dora_r{r}"]
        if len(args.seeds) >= 2:
            by_seed[r] = paired_difference(results[f"dora_r{r}"]["rouge_l"], results[f"lora_r{r}"]["rouge_l"])
            by_seed[r]["verdict"] = verdict(by_seed[r]["ci95"])
        diffs = None
        for lo, do in zip(lora, dora):
            a, b = per_article(lo), per_article(do)
            if [x["reference"] for x in a] != [x["reference"] for x in b]:
                raise RuntimeError(f"{lo['folder']} and {do['folder']} were evaluated on different articles")
            d = [y["rouge_l"] - x["rouge_l"] for x, y in zip(a, b)]
            diffs = d if diffs is None else [s + e for s, e in zip(diffs, d)]
        diffs = [d / len(lora) for d in diffs]
        mean = sum(diffs) / len(diffs)
        by_article[r] = {"n": len(diffs), "mean": mean, "ci95": bootstrap_ci(diffs), "per_article": diffs,
                         "dora_ahead": sum(d > 0 for d in diffs), "lora_ahead": sum(d < 0 for d in diffs),
                         "equal": sum(d == 0 for d in diffs)}
        by_article[r]["verdict"] = verdict(by_article[r]["ci95"])

    every = [run for seed_runs in runs.values() for run in seed_runs]
    seeds = ", ".join(str(s) for s in args.seeds)
    md = [f"# Generation: Gemma-3-270M on bbc-headlines (experiment 8)\n\n`python experiments/{NAME}.py --seeds "
          f"{' '.join(str(s) for s in args.seeds)}`: {args.steps} steps of {args.batch_size} articles, lr "
          f"{args.lr:g} for every variant, alpha = 2r, dropout 0.05, on q, k, v, up, down; ROUGE-L F1 of greedy "
          f"generations on the first {args.eval_limit} held-out articles; mean ± sample std over seeds {seeds}.\n\n"]
    md.append(markdown_table(
        ["variant", "ROUGE-L", "per seed", "held-out loss per seed", "trainable params", "trainable %"],
        [[LABEL[v], f"{r['mean']:.4f} ± {r['std']:.4f}", ", ".join(f"{s:.4f}" for s in r["rouge_l"]),
          ", ".join(f"{s:.4f}" for s in r["loss"]), f"{r['trainable_parameters']:,}",
          f"{100 * r['trainable_share']:.3f}"] for v, r in results.items()]))
    md.append("\nDoRA - LoRA, ROUGE-L in points (x 100):\n\n")
    rows = []
    for r in (8, 16):
        a = by_article[r]
        row = [f"r {r}", interval(by_seed[r]) if r in by_seed else "one seed: no interval",
               by_seed[r]["verdict"] if r in by_seed else "-",
               f"{100 * a['mean']:+.2f}, 95% bootstrap CI [{100 * a['ci95'][0]:+.2f}, {100 * a['ci95'][1]:+.2f}]; "
               f"DoRA ahead on {a['dora_ahead']}, LoRA on {a['lora_ahead']}, equal on {a['equal']} of {a['n']}",
               a["verdict"]]
        rows.append(row)
    md.append(markdown_table(["rank", "over seeds (paired by seed)", "verdict", "over articles (mean over seeds)",
                              "verdict"], rows))
    for r in (8, 16):
        lora, dora = per_article(runs[f"lora_r{r}"][0]), per_article(runs[f"dora_r{r}"][0])
        differ = [(x, y) for x, y in zip(lora, dora) if x["generated"] != y["generated"]]
        md.append(f"\nSeed {args.seeds[0]}, r {r}: the {len(differ)} of {len(lora)} articles where LoRA's and DoRA's "
                  "headlines differ (ROUGE-L in brackets):\n\n")
        md.append(markdown_table(["real headline", f"LoRA r{r}", f"DoRA r{r}"],
                                 [[x["reference"], f"{x['generated']} ({x['rouge_l']:.2f})",
                                   f"{y['generated']} ({y['rouge_l']:.2f})"] for x, y in differ]))
    md.append(f"\n![ROUGE-L](rouge_l.png)\n\nRuntime: {runtime_seconds(every) / 60:.1f} min for {len(every)} runs "
              f"(1 torch thread each, 2-core CPU).\n")
    plot(results, by_article, RESULTS / args.name / "rouge_l.png")
    write_results(args.name, {"settings": vars(args), "results": results, "dora_minus_lora_by_seed": by_seed,
                              "dora_minus_lora_by_article": by_article, "runtime_seconds": runtime_seconds(every)},
                  "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
