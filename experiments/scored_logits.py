"""What computing output-layer logits only at the scored positions saves on Gemma-3-270M (262k-word vocabulary).

One DoRA training step (forward + backward, r 8 on q, k, v, up, down) on a batch of commonsense examples, timed
with the logits computed only at the last K positions that hold the response (what ``dorafit train`` does, via
``logits_to_keep``) and at every position (K = 0), interleaved, same batch, same loss. Writes
``experiments/results/scored_logits.json`` and ``.md``.

    .venv/bin/python experiments/scored_logits.py [--batch 4] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dorafit.files import atomic_write_json, atomic_write_text  # noqa: E402
from dorafit.train.options import TrainConfig  # noqa: E402
from dorafit.train.setup import prepare  # noqa: E402
from dorafit.train.tasks.lm import causal_lm_loss  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def timed_step(model, batch, all_positions: bool) -> tuple[float, float]:
    started = time.perf_counter()
    loss = causal_lm_loss(model, batch, all_positions)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = prepare(TrainConfig(model=args.model, task="commonsense", method="dora", steps=1, threads=args.threads))
    task, model = setup.task, setup.model
    model.train()
    scored = task.batch(task.train[: args.batch])
    batch, width = scored["input_ids"].shape
    keep = width - int((scored["labels"] != -100).any(0).nonzero()[0]) + 1
    vocab = model.get_output_embeddings().weight.shape[0]
    timed_step(model, scored, False)  # warm-up
    times = {"scored": [], "all": []}
    losses = {}
    for _ in range(args.reps):
        for name, everywhere in (("scored", False), ("all", True)):
            seconds, losses[name] = timed_step(model, scored, everywhere)
            times[name].append(seconds)
    result = {
        "model": args.model, "batch": batch, "tokens_per_example": width, "scored_positions": keep, "vocab": vocab,
        "reps": args.reps, "threads": args.threads,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()}, "step_s": times, "loss": losses,
        "logits_mb": {"scored": batch * keep * vocab * 4 / 2**20, "all": batch * width * vocab * 4 / 2**20},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg(), "torch": torch.__version__},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "scored_logits.json", result)
    med = result["median_step_s"]
    text = (
        f"# Logits at scored positions only ({args.model}, DoRA step, batch {batch} x {width} tokens)\n\n"
        f"| logits at | positions | logits tensor | median step (s) | loss |\n|---|---|---|---|---|\n"
        f"| response only (dorafit) | {keep} | {result['logits_mb']['scored']:.0f} MB | {med['scored']:.2f} | "
        f"{losses['scored']:.6f} |\n"
        f"| every position | {width} | {result['logits_mb']['all']:.0f} MB | {med['all']:.2f} | {losses['all']:.6f} |\n\n"
        f"{args.reps} interleaved repetitions, {args.threads} thread(s), {os.cpu_count()} cores, load average "
        f"{result['machine']['load_average'][0]:.1f} at the end, torch {torch.__version__}. "
        f"Command: `.venv/bin/python experiments/scored_logits.py --batch {args.batch} --reps {args.reps} "
        f"--threads {args.threads}`.\n"
    )
    atomic_write_text(RESULTS / "scored_logits.md", text)
    print(text)


if __name__ == "__main__":
    main()
