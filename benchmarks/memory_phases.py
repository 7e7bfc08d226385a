"""Where a ``dorafit train`` run's resident memory goes: the run in this process, ``/proc/self/status``'s VmRSS
sampled every 10 ms, each sample counted in the part of the run under way (load, quantization, adapters, each
forward, backward, optimizer step, checkpoint, adapter file, evaluation, and "after" each until the next starts;
each call its own part, numbered: "forward 1", "forward 2", ...).

    .venv/bin/python benchmarks/memory_phases.py TRAIN_ARGS...   # e.g. --model DIR --task FILE --dtype bfloat16

Prints, as JSON on stderr after the run: the process's peak (VmHWM), the highest VmRSS seen in each part, and
VmRSS and VmHWM (MiB) with the time (s) at the start and end of each part (a peak between two samples shows
as a rise of VmHWM within a part). tracemalloc does not see torch's allocations;
the resident set does, libraries' code and the allocator's slack included (Linux only).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time

PERIOD = 0.01
phase = ["import"]
peaks: dict[str, int] = {}
calls: dict[str, int] = {}
marks: list = []
started = time.perf_counter()


def status() -> dict[str, int]:
    """VmRSS and VmHWM in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024
    return out


def sample() -> None:
    while True:
        rss, where = status()["VmRSS"], phase[0]
        peaks[where] = max(peaks.get(where, 0), rss)
        time.sleep(PERIOD)


def rss_hwm() -> tuple[int, int]:
    now = status()
    return now["VmRSS"], now["VmHWM"]


def watch(owner, name: str, label: str) -> None:
    """``owner.name`` counted as part ``label``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        if phase[0].rsplit(" ", 1)[0] == label:  # nested (a model calling its inner model): the outer call counts
            return original(*args, **kwargs)
        calls[label] = calls.get(label, 0) + 1
        part = f"{label} {calls[label]}"  # each call its own part: "forward 1", "forward 2", ...
        phase[0] = part
        marks.append((f"{part} start", *rss_hwm(), round(time.perf_counter() - started, 1)))
        try:
            return original(*args, **kwargs)
        finally:
            marks.append((f"{part} end", *rss_hwm(), round(time.perf_counter() - started, 1)))
            phase[0] = f"{part} after"

    setattr(owner, name, wrapped)


def main() -> int:
    threading.Thread(target=sample, daemon=True).start()
    import torch
    from transformers import PreTrainedModel

    import dorafit.train.checkpoint as checkpoint
    import dorafit.train.quantized_load as quantized_load
    import dorafit.train.runner as runner
    import dorafit.train.setup as setup
    from dorafit.cli import main as cli

    watch(quantized_load, "load_causal_lm", "load")
    watch(setup, "quantize_base", "quantize_base")
    watch(setup, "apply", "adapt")
    watch(PreTrainedModel, "__call__", "forward")
    watch(torch.Tensor, "backward", "backward")
    watch(torch.optim.AdamW, "step", "optimizer")
    watch(checkpoint, "save", "checkpoint")
    watch(runner, "save_snapshot", "snapshot")
    watch(runner, "save_adapter", "save_adapter")
    watch(runner, "evaluate", "evaluate")
    try:
        return cli(["train", *sys.argv[1:]])
    finally:
        time.sleep(2 * PERIOD)
        order = list(dict.fromkeys(label for label in peaks))
        print(json.dumps({"VmHWM": status()["VmHWM"], "part_peaks_mib": {k: peaks[k] for k in order},
                          "marks": marks}), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
