"""Experiment: the DoRA paper's visual instruction tuning (LLaVA) at CPU scale. LoRA r8 vs DoRA r8 in LLaVA's stage
2 on the `llava-gemma-270m` preset (EfficientNet-Lite0 + projector + Gemma-3-270M) answering questions about
Fashion-MNIST images (`fashion-mnist-vqa`), after one shared stage 1.

    scripts/bootstrap gemma,vision      # and Fashion-MNIST: apt-get install dataset-fashion-mnist
    python experiments/llava_vqa.py [--seeds 0 1 2] [--stage1-steps N] [--steps N] [--batch-size B] [--eval-limit K]

LLaVA's recipe (Liu et al. 2023), scaled down to a 2-core CPU (one torch thread per run, two runs side by side):
  stage 1, once:  feature alignment: only the projector trains (`--targets none --head multi_modal_projector`),
                  on `fashion-mnist-captions` ("<image>\\nDescribe the image." -> "A photo of a sneaker."),
                  --stage1-steps x --batch-size captions, lr --stage1-lr; then `dorafit merge` folds it into a
                  model folder that stage 2 starts from;
  stage 2:        visual instruction tuning on `fashion-mnist-vqa` (what the item is, whether it is worn on the
                  feet, its category), LoRA r8 or DoRA r8 (alpha 16, dropout 0.05) on the language model's default
                  targets (q, k, v, up, down of Gemma's 18 layers) + the projector trained in full
                  (`--head multi_modal_projector`); the vision tower frozen; --steps x --batch-size questions.
  learning rate:  per method, the better of --grid (default 3e-4, 1e-3) by the exact match of the class name on the
                  VALIDATION set (Fashion-MNIST training images held out of training), seed 0; ties to the smaller.
  seeds:          the chosen rate with --seeds (seed 0's run is the grid's); a seed sets the data order, the
                  adapter's initialisation and dropout, the same for both methods (paired).
  testing:        the first --eval-limit questions of the official test images (items 1/2, feet 1/4, category
                  1/4), greedy, at most 12 new tokens. Headline: exact match of the generated class name on the
                  `item` questions ("What is this item?" -> "ankle boot"); also exact match per question kind,
                  over all questions, and ROUGE-L F1 (rouge-score, Porter stemming) over all questions.

Compared as the other experiments are: DoRA - LoRA per seed, the 95% paired t-interval, and the verdict
(common.verdict, with the paper's LLaVA gain of +0.7 points as the smallest claimed edge).

Writes experiments/results/llava_vqa/: results.json, results.md, with the machine and runtime.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from common import (ROOT, RUNS, SMALLEST_PAPER_GAIN, THREADS, interval, markdown_table, mean_std,
                    paired_difference, runtime_seconds, train_run, verdict, write_results)
from dorafit.train.tasks.fashion_vqa import question_kind

NAME = "llava_vqa"
METHODS = {"lora": "LoRA r8", "dora": "DoRA r8"}
PRESET = "llava-gemma-270m"
HEAD = ["multi_modal_projector"]


def samples(run: dict) -> list[dict]:
    """The run's generations after training (samples.jsonl): test_set, prompt, reference, generated, rouge_l."""
    path = ROOT / run["folder"] / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scores(run: dict, test_set: str) -> dict:
    """Exact match per question kind and over all questions, and ROUGE-L over all, on ``test_set``."""
    rows = [s for s in samples(run) if s["test_set"] == test_set]
    if not rows:
        raise RuntimeError(f"{run['folder']} has no samples of the {test_set!r} set")
    out = {"n": len(rows), "rouge_l": sum(s["rouge_l"] for s in rows) / len(rows)}
    exact = lambda s: " ".join(s["generated"].split()) == " ".join(s["reference"].split())  # noqa: E731
    out["exact_match"] = sum(map(exact, rows)) / len(rows)
    out["starts_with_reference"] = sum(s["generated"].strip().startswith(s["reference"]) for s in rows) / len(rows)
    for kind in sorted({question_kind(s["prompt"]) for s in rows}):
        of_kind = [s for s in rows if question_kind(s["prompt"]) == kind]
        out[f"{kind}_exact_match"] = sum(map(exact, of_kind)) / len(of_kind)
        out[f"{kind}_n"] = len(of_kind)
    return out


def percents(by_lr: dict) -> str:
    return ", ".join(f"{lr}: {100 * v:.1f}%" for lr, v in by_lr.items())


def in_parallel(jobs: list[tuple[str, dict]], workers: int) -> list[dict]:
    """train_run(NAME, name, **options) for each job, ``workers`` processes at a time; results in job order."""
    if workers == 1 or len(jobs) == 1:
        return [train_run(NAME, name, **options) for name, options in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_run, NAME, name, **options) for name, options in jobs]
        return [f.result() for f in futures]


def stage1(args) -> tuple[dict, str]:
    """The projector-only run on captions, and the folder its merge wrote."""
    run = train_run(NAME, "stage1-projector", model=PRESET, task="fashion-mnist-captions", targets=[],
                    head=HEAD, lr=args.stage1_lr, steps=args.stage1_steps, batch_size=args.batch_size,
                    eval_limit=args.stage1_eval_limit, seed=0)
    merged = RUNS / NAME / "stage1-merged"
    if not (merged / "config.json").is_file():
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "dorafit", "merge", str(ROOT / run["folder"]), "--out", str(merged),
                        "--threads", str(THREADS), "--check", "4"], check=True)
        run["merge_seconds"] = round(time.monotonic() - started, 1)
    return run, str(merged)


def stage2_options(args, merged: str, method: str, lr: float, seed: int) -> dict:
    return {"model": merged, "task": "fashion-mnist-vqa", "method": method, "rank": 8, "alpha": 16.0,
            "dropout": 0.05, "head": HEAD, "lr": lr, "steps": args.steps, "batch_size": args.batch_size,
            "eval_limit": args.eval_limit, "seed": seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="paired seeds; 0 is the grid's")
    parser.add_argument("--grid", type=float, nargs="+", default=[3e-4, 1e-3], help="stage 2 learning rates")
    parser.add_argument("--steps", type=int, default=16, help="stage 2 steps")
    parser.add_argument("--stage1-steps", type=int, default=50)
    parser.add_argument("--stage1-lr", type=float, default=1e-3)
    parser.add_argument("--stage1-eval-limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-limit", type=int, default=48, help="questions per held-out set (validation, test)")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side (one torch thread each)")
    args = parser.parse_args()
    if 0 not in args.seeds:
        parser.error("--seeds must include 0 (the learning-rate grid's seed)")
    started = time.monotonic()

    first, merged = stage1(args)
    stage1_scores = scores(first, "test")
    print(f"{NAME}: stage 1 (projector only): caption exact match {100 * stage1_scores['exact_match']:.1f}%",
          flush=True)

    grid_jobs = [(f"{method}-lr{lr:g}-s0", stage2_options(args, merged, method, lr, 0))
                 for lr in sorted(args.grid) for method in METHODS]
    grid_runs = dict(zip([name for name, _ in grid_jobs], in_parallel(grid_jobs, args.workers)))
    chosen, grid = {}, {}
    for method in METHODS:
        validation = {lr: scores(grid_runs[f"{method}-lr{lr:g}-s0"], "validation")["item_exact_match"]
                      for lr in sorted(args.grid)}
        grid[method] = {f"{lr:g}": v for lr, v in validation.items()}
        chosen[method] = max(validation, key=lambda lr: (validation[lr], -lr))
        print(f"{NAME}: {METHODS[method]}: validation class-name exact match {grid[method]} -> lr "
              f"{chosen[method]:g}", flush=True)

    seed_jobs = [(f"{method}-lr{chosen[method]:g}-s{seed}", stage2_options(args, merged, method, chosen[method], seed))
                 for seed in args.seeds if seed != 0 for method in METHODS]
    seed_runs = dict(zip([name for name, _ in seed_jobs], in_parallel(seed_jobs, args.workers)))
    runs = {method: [grid_runs[f"{method}-lr{chosen[method]:g}-s0"] if seed == 0 else
                     seed_runs[f"{method}-lr{chosen[method]:g}-s{seed}"] for seed in args.seeds] for method in METHODS}

    results = {}
    for method, method_runs in runs.items():
        per_seed = [scores(r, "test") for r in method_runs]
        results[method] = {key: [s[key] for s in per_seed] for key in per_seed[0]}
        results[method].update(lr=chosen[method], grid_validation_item_exact_match=grid[method],
                               trainable_parameters=method_runs[0]["trainable_parameters"],
                               trainable_share=method_runs[0]["trainable_share"],
                               train_seconds=[r["train_seconds"] for r in method_runs],
                               folders=[r["folder"] for r in method_runs])
    paired = {}
    for metric, smallest in (("item_exact_match", SMALLEST_PAPER_GAIN), ("exact_match", SMALLEST_PAPER_GAIN),
                             ("rouge_l", 0.0)):
        paired[metric] = paired_difference(results["dora"][metric], results["lora"][metric])
        paired[metric]["verdict"] = verdict(paired[metric]["ci95"], smallest)

    every = [first, *grid_runs.values(), *seed_runs.values()]
    total_minutes = (time.monotonic() - started) / 60
    md = [f"# Visual instruction tuning: LLaVA stage 2, LoRA r8 vs DoRA r8 ({PRESET}, fashion-mnist-vqa)\n\n",
          f"`python experiments/{NAME}.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps} "
          f"--stage1-steps {args.stage1_steps} --batch-size {args.batch_size} --eval-limit {args.eval_limit}`\n\n",
          f"Stage 1 (projector only, {args.stage1_steps} steps of {args.batch_size} captions, lr {args.stage1_lr:g}): "
          f"caption exact match {100 * stage1_scores['exact_match']:.1f}% on {stage1_scores['n']} test captions "
          f"({100 * stage1_scores['starts_with_reference']:.1f}% begin with the right caption: without training the "
          "language model, the model often goes on writing after it). "
          f"Stage 2: {args.steps} steps of {args.batch_size} questions from the merged stage-1 model; learning rate "
          f"per method the better of {', '.join(f'{lr:g}' for lr in sorted(args.grid))} on the validation set "
          f"(seed 0, class-name exact match): LoRA {chosen['lora']:g} ({percents(grid['lora'])}), DoRA "
          f"{chosen['dora']:g} ({percents(grid['dora'])}). Test: the first {args.eval_limit} questions of the official test images "
          f"({results['lora']['item_n'][0]} of them `item` questions).\n\n"]
    header = ["variant", "class name EM %", "per seed", "feet EM %", "category EM %", "all EM %", "ROUGE-L",
              "trainable params"]
    rows = []
    for method, r in results.items():
        m = {k: mean_std(r[k]) for k in ("item_exact_match", "feet_exact_match", "category_exact_match",
                                          "exact_match", "rouge_l")}
        rows.append([METHODS[method], f"{100 * m['item_exact_match'][0]:.1f} ± {100 * m['item_exact_match'][1]:.1f}",
                     ", ".join(f"{100 * v:.1f}" for v in r["item_exact_match"]),
                     f"{100 * m['feet_exact_match'][0]:.1f}", f"{100 * m['category_exact_match'][0]:.1f}",
                     f"{100 * m['exact_match'][0]:.1f}", f"{m['rouge_l'][0]:.4f}", f"{r['trainable_parameters']:,}"])
    md.append(markdown_table(header, rows))
    md.append("\nDoRA - LoRA (paired by seed):\n\n")
    md.append(markdown_table(["metric", "difference", "verdict"], [
        ["class-name exact match", interval(paired["item_exact_match"]), paired["item_exact_match"]["verdict"]],
        ["exact match, all questions", interval(paired["exact_match"]), paired["exact_match"]["verdict"]],
        ["ROUGE-L (x 100)", interval(paired["rouge_l"]), paired["rouge_l"]["verdict"]]]))
    md.append(f"\nRuntime: {runtime_seconds(every) / 60:.1f} min of training runs ({len(every)} runs, their wall "
              f"times added up; {args.workers} side by side, 1 torch thread each; this call {total_minutes:.1f} min, "
              "runs already finished are read back).\n")
    write_results(NAME, {"settings": vars(args), "stage1": {**stage1_scores, "folder": first["folder"]},
                         "results": results, "dora_minus_lora": paired, "wall_minutes": round(total_minutes, 1),
                         "runtime_seconds": runtime_seconds(every)}, "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
