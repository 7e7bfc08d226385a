"""Run every measurement of one workload: training steps, saved activations, peak memory, inference.

A training step is forward, loss, backward, ``AdamW.step()`` and ``zero_grad(set_to_none=True)`` (the base
variant has nothing to train: forward, loss and backward only). Inference is one forward pass over the
same batch in eval mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Callable

import torch
from torch import nn

from .activation import run_memory
from .compiled import run_compiled
from .generation import run_generation
from .measure import cuda_peak_bytes, interleaved_times, median_ms
from .models import INFERENCE_VARIANTS, Workload, WorkloadSpec, build_variant, build_workload, train_variants
from .trainer import MIB, Trainer, selected


def run_training(workload: Workload, warmup: int, steps: int, peak_steps: int, threads: int, log: Callable,
                 variants: tuple[str, ...] | None = None) -> dict:
    """Per training variant: median step time, saved-for-backward bytes, peak memory, first loss."""
    device = workload.spec.device
    names = selected(train_variants(), variants)
    trainers = {name: Trainer(workload, name) for name in names}
    results: dict[str, dict] = {}
    for name, trainer in trainers.items():
        loss, counter = trainer.counted_step()
        results[name] = {
            "trainable_params": trainer.trainable,
            "first_loss": loss,
            "saved_mib": counter.nbytes / MIB,
            "saved_storages": counter.count,
        }
    log(f"  timing {len(trainers)} training variants: {warmup} warm-up + {steps} timed rounds")
    times = interleaved_times({n: t.step for n, t in trainers.items()}, warmup, steps, device)
    for name, seconds in times.items():
        results[name].update(step_ms=median_ms(seconds), step_ms_all=[1e3 * s for s in seconds])
    if peak_steps and device.startswith("cuda"):
        for name, trainer in trainers.items():
            peak, over = cuda_peak_bytes(lambda: [trainer.step() for _ in range(peak_steps)], device)
            results[name].update(peak_mib=peak / MIB, peak_over_setup_mib=over / MIB)
    del trainers
    gc.collect()
    if peak_steps and not device.startswith("cuda"):
        for name in names:
            log(f"  peak RSS of {name} in a fresh process")
            results[name].update(cpu_peak_in_subprocess(workload.spec, name, peak_steps, threads))
    return results


def run_inference(workload: Workload, warmup: int, steps: int, log: Callable,
                  variants: tuple[str, ...] | None = None) -> dict:
    """Per inference variant: median latency of one forward pass over the batch."""
    models = {name: build_variant(workload, name).eval() for name in selected(INFERENCE_VARIANTS, variants)}

    def forward(model: nn.Module) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return workload.forward(model, workload.inputs)

        return run

    log(f"  timing {len(models)} inference variants: {warmup} warm-up + {steps} timed rounds")
    times = interleaved_times({n: forward(m) for n, m in models.items()}, warmup, steps, workload.spec.device)
    return {n: {"latency_ms": median_ms(s), "latency_ms_all": [1e3 * x for x in s]} for n, s in times.items()}


def cpu_peak_in_subprocess(spec: WorkloadSpec, variant: str, steps: int, threads: int) -> dict:
    """Run :mod:`dorafit.bench.peak` for one variant; its JSON answer (peak RSS in MiB)."""
    cmd = [sys.executable, "-m", "dorafit.bench.peak", json.dumps(spec.to_dict()), variant, str(steps), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory run of {variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


SECTIONS = ("standard", "compile", "memory")


def run_workload(spec: WorkloadSpec, warmup: int, steps: int, inference_steps: int, peak_steps: int, threads: int,
                 log: Callable = print, variants: tuple[str, ...] | None = None,
                 sections: tuple[str, ...] = ("standard",), compile_backend: str = "inductor",
                 generation: dict | None = None) -> dict:
    """Every measurement of one workload, as a JSON-ready dict.

    ``sections``: "standard" (the training and inference variants: keys ``train`` and ``inference``; for a causal
    LM with ``generation`` options also greedy generation, :mod:`dorafit.bench.generation`: key ``generation``),
    "compile" (eager and torch.compile side by side, :mod:`dorafit.bench.compiled`: key ``compile``), "memory"
    (saved or recomputed magnitude gradient, activation checkpointing, :mod:`dorafit.bench.activation`: key
    ``memory``); ``compile_backend``: the compile section's ``torch.compile`` backend; ``generation``: the options
    of :func:`dorafit.bench.generation.run_generation` (``repeats``, ``batch``, ``prompt``, ``new_tokens``).
    """
    log(f"{spec.model}: building")
    workload = build_workload(spec)
    log(f"  {workload.description}")
    result = {"spec": spec.to_dict(), "description": workload.description, "targets": workload.targets}
    if "standard" in sections:
        result["train"] = run_training(workload, warmup, steps, peak_steps, threads, log, variants)
        result["inference"] = run_inference(workload, warmup, inference_steps, log, variants)
        if generation and generation.get("repeats") and hasattr(workload.base, "generate"):
            options = dict(generation)
            result["generation"] = run_generation(workload, warmup, options.pop("repeats"), log, variants, **options)
    if "compile" in sections:
        log(f"{spec.model}: compile section")
        result["compile"] = run_compiled(workload, warmup, steps, inference_steps, log, compile_backend, variants)
    if "memory" in sections:
        log(f"{spec.model}: memory section")
        result["memory"] = run_memory(workload, warmup, steps, log)
    return result
