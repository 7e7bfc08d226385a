"""Why a bfloat16 base trains slower than a float32 one on a CPU without bfloat16 instructions: the three products
of a frozen linear layer in a training step, timed in float32 and bfloat16.

    .venv/bin/python benchmarks/bf16_matmul_cpu.py [--tokens 64] [--threads 2]

For a layer of TinyLlama-1.1B's MLP (W: [5632, 2048]) and a batch of ``--tokens`` tokens x: the forward
``x W^T`` (F.linear), the weight-shaped product ``g^T x`` (what a trainable weight's gradient costs), and the
input gradient ``g W`` (what backward computes through every frozen layer, so that earlier adapters get their
gradients), and that input gradient as dorafit computes it in training on such a CPU
(:func:`dorafit.layers.frozen.blockwise_matmul`: W's rows upcast to float32 a block of 16 MiB at a time, float32
accumulation, one rounding at the end; bfloat16 only) with its largest difference from torch's bfloat16 product.
Median of 3 after one warm-up call. Prints a Markdown table and the CPU's vector-instruction flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from dorafit.layers.frozen import blockwise_matmul  # noqa: E402


def timed(fn) -> float:
    fn()
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return ", ".join(f"{f}: {'yes' if f in flags else 'no'}" for f in wanted)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x32, w32, g32 = torch.randn(args.tokens, 2048), torch.randn(5632, 2048), torch.randn(args.tokens, 5632)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.tokens} tokens; CPU flags: {cpu_flags()}\n")
    print("| dtype | forward x W^T ms | g^T x ms | input gradient g W ms | g W in float32 row blocks ms |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        x, w, g = x32.to(dtype), w32.to(dtype), g32.to(dtype)
        times = [timed(lambda: torch.nn.functional.linear(x, w)), timed(lambda: g.T @ x), timed(lambda: g @ w)]
        blocks = f"{1000 * timed(lambda: blockwise_matmul(g, w)):.0f}" if dtype == torch.bfloat16 else "-"
        print(f"| {str(dtype).removeprefix('torch.')} | " + " | ".join(f"{1000 * t:.0f}" for t in times)
              + f" | {blocks} |")
    w, g = w32.bfloat16(), g32.bfloat16()
    ours, theirs = blockwise_matmul(g, w).bfloat16().float(), (g @ w).float()
    exact = g.double() @ w.double()
    print(f"\nbfloat16 g W, largest |difference|: row blocks vs torch {(ours - theirs).abs().max():.3g}; against the "
          f"float64 product: torch {(theirs - exact).abs().max():.3g}, row blocks {(ours - exact).abs().max():.3g} "
          f"(largest |g W| {exact.abs().max():.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
