"""``dorafit bench --sections memory``: DoRA's activation memory against LoRA's, with and without checkpointing.

DoRA's magnitude gradient ``dL/dm_j = sum_tokens(g_j * pre_j) / n_j`` needs the layer's pre-scale output for
every token. ``AdapterConfig.magnitude_grad`` chooses how it gets it: ``"save"`` keeps the layer's output
(free where the next operation keeps it anyway, one [tokens, out] tensor more than LoRA elsewhere),
``"recompute"`` keeps nothing more than LoRA and computes ``pre = W0 x + P (Q x)`` again in backward. With
activation checkpointing (transformers' ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=
{"use_reentrant": False})``) each block keeps only its input and recomputes the rest, DoRA's tensor included.

Variants (our adapters, eager, the workload's targets):

    lora, dora                       no checkpointing; DoRA with magnitude_grad="save" (the default)
    dora_recompute                   no checkpointing; magnitude_grad="recompute"
    lora_checkpointed, dora_checkpointed   checkpointing on (DoRA: "save")

Measured per variant, after one warm-up step (so the optimizer state exists already and is not counted):

    saved MiB      activations saved for backward (:class:`SavedTensorCounter`; not shown with checkpointing,
                   whose block inputs are kept by Python references that saved-tensor hooks never see)
    alive MiB      bytes of the tensors the forward pass created that are still alive when it ends: what
                   backward needs, checkpoints included (:class:`LiveTensorBytes`)
    peak MiB       the largest total of tensors created during the step alive at once (forward, backward,
                   optimizer step), from the same tracker: tensor memory only, no allocator slack
    step ms        as in the default section, the five variants interleaved
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import dorafit
from dorafit.train.setup import enable_gradient_checkpointing

from .measure import interleaved_times, median_ms
from .models import Workload, dorafit_config, shared_copy
from .tables import _fmt, ratio_table, table_ratios
from .trainer import MIB, Trainer

# name: (method, magnitude_grad, activation checkpointing)
VARIANTS = {
    "lora": ("lora", "save", False),
    "dora": ("dora", "save", False),
    "dora_recompute": ("dora", "recompute", False),
    "lora_checkpointed": ("lora", "save", True),
    "dora_checkpointed": ("dora", "save", True),
}
# (key, label, section, numerator, denominator, target)
RATIOS = [
    ("dora_vs_lora_saved", "DoRA (save) saved activations / LoRA", "saved", "dora", "lora", None),
    ("dora_recompute_vs_lora_saved", "DoRA (recompute) saved activations / LoRA", "saved", "dora_recompute", "lora",
     1.05),
    ("dora_vs_lora_alive", "DoRA (save) / LoRA: tensors alive after forward", "alive", "dora", "lora", None),
    ("dora_recompute_vs_lora_alive", "DoRA (recompute) / LoRA: tensors alive after forward", "alive",
     "dora_recompute", "lora", None),
    ("checkpointed_dora_vs_lora_alive", "checkpointed DoRA / LoRA: tensors alive after forward", "alive",
     "dora_checkpointed", "lora_checkpointed", 1.02),
    ("dora_vs_lora_peak", "DoRA (save) / LoRA: peak tensor memory", "peak", "dora", "lora", None),
    ("dora_recompute_vs_lora_peak", "DoRA (recompute) / LoRA: peak tensor memory", "peak", "dora_recompute", "lora",
     None),
    ("checkpointed_dora_vs_lora_peak", "checkpointed DoRA / LoRA: peak tensor memory", "peak", "dora_checkpointed",
     "lora_checkpointed", 1.02),
    ("dora_vs_lora_step", "DoRA (save) step / LoRA step", "train", "dora", "lora", None),
    ("dora_recompute_vs_lora_step", "DoRA (recompute) step / LoRA step", "train", "dora_recompute", "lora", None),
    ("dora_recompute_vs_save_step", "DoRA step, recompute / save", "train", "dora_recompute", "dora", None),
    ("checkpointed_dora_vs_lora_step", "checkpointed DoRA step / checkpointed LoRA step", "train",
     "dora_checkpointed", "lora_checkpointed", None),
    ("checkpointed_vs_plain_dora_step", "DoRA step, checkpointed / not", "train", "dora_checkpointed", "dora", None),
]
FIELDS = {"train": "step_ms", "saved": "saved_mib", "alive": "alive_after_forward_mib", "peak": "peak_tensor_mib"}


def build(workload: Workload, name: str):
    """The model of one variant (sharing the frozen tensors of ``workload.base``)."""
    method, magnitude_grad, checkpointing = VARIANTS[name]
    model = shared_copy(workload.base)
    config = dataclasses.replace(dorafit_config(workload, method), magnitude_grad=magnitude_grad)
    dorafit.apply(model, config)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def run_memory(workload: Workload, warmup: int, steps: int, log: Callable) -> dict:
    """Every figure of the memory section for one workload, as a JSON-ready dict."""
    trainers = {name: Trainer(workload, name, model=build(workload, name)) for name in VARIANTS}
    results: dict[str, dict] = {}
    for name, trainer in trainers.items():
        log(f"  memory of {name}")
        method, magnitude_grad, checkpointing = VARIANTS[name]
        loss = trainer.step()  # the first step (every variant starts as the base model); creates the optimizer state
        _, counter = trainer.counted_step()
        _, live, alive = trainer.live_step()
        results[name] = {
            "method": method, "magnitude_grad": magnitude_grad, "checkpointing": checkpointing, "first_loss": loss,
            "saved_mib": None if checkpointing else counter.nbytes / MIB,
            "alive_after_forward_mib": alive / MIB, "peak_tensor_mib": live.peak / MIB,
        }
    log(f"  timing {len(trainers)} memory variants: {warmup} warm-up + {steps} timed rounds")
    times = interleaved_times({n: t.step for n, t in trainers.items()}, warmup, steps, workload.spec.device)
    for name, seconds in times.items():
        results[name].update(step_ms=median_ms(seconds), step_ms_all=[1e3 * s for s in seconds])
    return {"variants": results, "ratios": table_ratios(RATIOS, {s: results for s in FIELDS}, FIELDS)}


def markdown(result: dict) -> list[str]:
    """The memory section's tables."""
    lines = ["#### Activation memory: DoRA's magnitude gradient saved or recomputed, and activation checkpointing",
             "", "| variant | magnitude_grad | checkpointing | step ms | saved for backward MiB | alive after forward "
             "MiB | peak tensor MiB |", "|---|---|---|---:|---:|---:|---:|"]
    for name, r in result["variants"].items():
        lines.append(f"| {name} | {r['magnitude_grad'] if r['method'] == 'dora' else '-'} | "
                     f"{'yes' if r['checkpointing'] else 'no'} | {_fmt(r['step_ms'])} | {_fmt(r['saved_mib'])} | "
                     f"{_fmt(r['alive_after_forward_mib'])} | {_fmt(r['peak_tensor_mib'])} |")
    return lines + [""] + ratio_table(result["ratios"])
