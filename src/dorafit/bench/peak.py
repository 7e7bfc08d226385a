"""Peak resident memory of one training variant, measured in this (fresh) process on CPU.

    python -m dorafit.bench.peak SPEC_JSON VARIANT STEPS THREADS

Builds the workload and the variant (a quantized variant then lets go of the float weights its quantized
layers replaced, so its resident set is that of a model loaded quantized), notes the resident set (model
weights, adapters, optimizer), resets the kernel's peak mark, runs STEPS training steps, and prints one JSON line:
``{"peak_mib": VmHWM, "peak_over_setup_mib": VmHWM minus the resident set before the steps}``.
The process uses glibc's default malloc settings, so freed tensors go back to the OS and the peak mark
follows what is alive (plus fragmentation).
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from .measure import peak_rss_bytes, reset_peak_rss, rss_bytes
from .models import QUANTIZED_VARIANTS, WorkloadSpec, build_workload
from .trainer import MIB, Trainer


def main(argv: list[str]) -> int:
    spec_json, variant, steps, threads = argv
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    workload = build_workload(WorkloadSpec(**json.loads(spec_json)))
    trainer = Trainer(workload, variant)
    if variant in QUANTIZED_VARIANTS:  # the float weights the quantized copy replaced are no longer needed
        workload.base = None
        gc.collect()
    setup = rss_bytes()
    reset_peak_rss()
    for _ in range(int(steps)):
        trainer.step()
    peak = peak_rss_bytes()
    print(json.dumps({"peak_mib": peak / MIB, "peak_over_setup_mib": (peak - setup) / MIB}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
