"""Peak resident memory of DoRA training on Gemma-3-270M: the float32 base against the base quantized with
``--quantize`` (nf4 and int8), each a real ``dorafit train`` run in a fresh process.

    .venv/bin/python benchmarks/gemma_qdora_memory.py [--steps 3] [--batch-size 2] [--threads 2]

Each run trains DoRA (the default targets q, k, v, up, down) on the bbc-headlines task for a few steps without
the before-training evaluation and evaluates one example; the figure is the process's peak resident set (the
kernel's ru_maxrss of the child), which includes the model, the optimizer, activations and the library code.
Beside it, the prepared model's own tensor bytes (parameters and buffers, quantized and adapted).
Needs the gemma and quant extras (``scripts/bootstrap gemma,quant``). Writes
``benchmarks/results/gemma-qdora-memory-<date>.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dorafit.bench.report import load_average, machine  # noqa: E402
from dorafit.files import atomic_write_json  # noqa: E402

VARIANTS = {"float32": [], "nf4": ["--quantize", "nf4"], "int8": ["--quantize", "int8"]}


def peak_of(args: list[str]) -> tuple[float, float]:
    """(peak resident MiB, seconds) of one ``dorafit train`` in a fresh process; ru_maxrss of that child alone
    (this process waits for one child at a time and starts from the maximum so far)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dorafit", "train", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"dorafit train {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise SystemExit("this run's peak was below an earlier one's: run the variants in increasing order of memory "
                         "or one per process (ru_maxrss of children is a running maximum)")
    return after / 1024, seconds


def model_tensor_mib(variant: str) -> float:
    """The prepared (quantized, adapted) model's parameter and buffer bytes, each storage once, in MiB."""
    from dorafit.train.options import TrainConfig
    from dorafit.train.setup import prepare

    quantize = VARIANTS[variant][1] if VARIANTS[variant] else None
    model = prepare(TrainConfig(model="gemma-3-270m", task="bbc-headlines", method="dora", quantize=quantize)).model
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values()) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # one variant in this fresh process: print its peak
        with tempfile.TemporaryDirectory() as tmp:
            common = ["--model", "gemma-3-270m", "--task", "bbc-headlines", "--method", "dora", "--steps",
                      str(args.steps), "--batch-size", str(args.batch_size), "--no-eval-before", "--eval-limit", "1",
                      "--max-new-tokens", "4", "--threads", str(args.threads), "--out", str(Path(tmp) / "run")]
            peak, seconds = peak_of(common + VARIANTS[args.variant])
        print(json.dumps({"peak_mib": peak, "seconds": seconds, "tensor_mib": model_tensor_mib(args.variant)}))
        return 0
    meta = {**machine(), "load_average_start": load_average(),
            "command": " ".join(["benchmarks/gemma_qdora_memory.py", *sys.argv[1:]])}
    results = {}
    for name in VARIANTS:  # each in its own process: ru_maxrss of children only grows
        print(f"{name} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
                               "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    meta["load_average_end"] = load_average()
    record = {"meta": meta, "steps": args.steps, "batch_size": args.batch_size, "results": results}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = ROOT / "benchmarks" / "results" / f"gemma-qdora-memory-{stamp}.json"
    atomic_write_json(path, record)
    base = results["float32"]["peak_mib"]
    lines = [f"DoRA on Gemma-3-270M, bbc-headlines, {args.steps} steps of {args.batch_size}; {meta['cpu']}, "
             f"{args.threads} threads, {meta['date_utc']} UTC", "",
             "| base | peak resident MiB | / float32 | model tensors MiB | wall s |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['peak_mib']:.0f} | {r['peak_mib'] / base:.3f} | {r['tensor_mib']:.0f} | "
                     f"{r['seconds']:.0f} |")
    print("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
