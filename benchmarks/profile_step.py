"""Where a training step's time goes, per variant: torch.profiler's self CPU time by operator, side by side.

    .venv/bin/python benchmarks/profile_step.py [--model llama|minilm] [--variants lora,dora,peft_dora]
        [--steps 3] [--threads N] [--layers 4] [--top 12]

All variants are built first and run two warm-up rounds (so that no variant's profile pays for growing the
process's heap); then ``--steps`` rounds profile one step of every variant each, round-robin, so that a change
of machine load hits all variants alike. The table gives milliseconds per step of self CPU time for the
operators that take the most time in any variant, and the total.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from dorafit.bench.measure import keep_freed_memory
from dorafit.bench.models import WorkloadSpec, build_workload, llama_sizes
from dorafit.bench.suite import Trainer


def profile_step(trainer: Trainer, totals: dict[str, float]) -> None:
    """Profile one training step; add each operator's self CPU milliseconds to ``totals``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step()
    for event in prof.key_averages():
        if event.key.startswith("aten::") or "Backward" in event.key or event.key.startswith("Optimizer"):
            totals[event.key] += event.self_cpu_time_total / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama", choices=["llama", "minilm"])
    p.add_argument("--variants", default="lora,dora,peft_dora")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "llama":
        spec = WorkloadSpec(model="llama", sizes=llama_sizes(layers=args.layers))
    else:
        spec = WorkloadSpec(model="minilm", batch=32, seq=128)
    workload = build_workload(spec)
    variants = args.variants.split(",")
    trainers = {v: Trainer(workload, v) for v in variants}
    for _ in range(2):
        for trainer in trainers.values():
            trainer.step()
    per_variant: dict[str, dict[str, float]] = {v: collections.Counter() for v in variants}
    for _ in range(args.steps):
        for v, trainer in trainers.items():
            profile_step(trainer, per_variant[v])
    per_variant = {v: collections.Counter({op: ms / args.steps for op, ms in t.items()})
                   for v, t in per_variant.items()}
    top = sorted({op for t in per_variant.values() for op, _ in t.most_common(args.top)},
                 key=lambda op: -max(t.get(op, 0.0) for t in per_variant.values()))
    print(f"{workload.description}; {torch.get_num_threads()} threads; self CPU ms per step, {args.steps} steps\n")
    print("| operator | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for op in top:
        print(f"| {op} | " + " | ".join(f"{per_variant[v].get(op, 0.0):.1f}" for v in variants) + " |")
    print("| **total (all operators)** | " + " | ".join(f"{sum(per_variant[v].values()):.1f}" for v in variants) + " |")


if __name__ == "__main__":
    main()
