"""``dorafit bench --sections compile``: eager and ``torch.compile``d models side by side.

Variants: the frozen ``base``, our ``lora`` and ``dora`` (unmerged, norm detached) and ``peft_dora``, each
run eagerly (``<name>_eager``) and through ``torch.compile(model)`` with its default backend and options
(``<name>_compiled``; Inductor), as separate models sharing the frozen tensors. Measured per variant:

    training step   forward, loss, backward, AdamW step, zero_grad (as the default section), interleaved
                    with the other seven; the first step of a compiled variant compiles it (its time is
                    reported as "compile s" and kept out of the timing)
    eval forward    eval mode, ``torch.no_grad()``, one forward pass, interleaved the same way
    graphs / breaks ``torch._dynamo.explain`` of the training loss and of the eval forward: how many graphs
                    Dynamo makes and how many graph breaks it hits (1 / 0: the whole model is one graph)
    recompiled      graphs Dynamo compiled during the timed rounds (should be 0: no recompilation per
                    layer or per optimizer step)
    saved MiB       activations saved for backward in one training step (:class:`SavedTensorCounter`; it
                    also sees what a compiled graph saves)

Ratios printed: compiled DoRA step / compiled LoRA step (target <= 1.05), compiled unmerged DoRA eval /
compiled LoRA eval (<= 1.05), compiled DoRA step / eager DoRA step (<= 0.9), and others without a target.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .measure import interleaved_times, median_ms
from .models import Workload, build_variant
from .report import _fmt, ratio_table, table_ratios
from .suite import MIB, Trainer

VARIANTS = ("base", "lora", "dora", "peft_dora")
# (key, label, section, numerator, denominator, target)
RATIOS = [
    ("compiled_dora_vs_compiled_lora_step", "compiled DoRA step / compiled LoRA step", "train", "dora_compiled",
     "lora_compiled", 1.05),
    ("compiled_dora_vs_compiled_lora_eval", "compiled unmerged DoRA eval / compiled LoRA eval", "eval",
     "dora_compiled", "lora_compiled", 1.05),
    ("compiled_vs_eager_dora_step", "compiled DoRA step / eager DoRA step", "train", "dora_compiled", "dora_eager",
     0.9),
    ("compiled_vs_eager_lora_step", "compiled LoRA step / eager LoRA step", "train", "lora_compiled", "lora_eager",
     None),
    ("compiled_vs_eager_base_step", "compiled base step / eager base step", "train", "base_compiled", "base_eager",
     None),
    ("compiled_vs_eager_peft_dora_step", "compiled PEFT DoRA step / eager PEFT DoRA step", "train",
     "peft_dora_compiled", "peft_dora_eager", None),
    ("eager_dora_vs_eager_lora_step", "eager DoRA step / eager LoRA step", "train", "dora_eager", "lora_eager", None),
    ("compiled_dora_vs_compiled_peft_dora_step", "compiled DoRA step / compiled PEFT DoRA step", "train",
     "dora_compiled", "peft_dora_compiled", None),
    ("compiled_vs_eager_dora_eval", "compiled DoRA eval / eager DoRA eval", "eval", "dora_compiled", "dora_eager",
     None),
    ("compiled_vs_eager_lora_eval", "compiled LoRA eval / eager LoRA eval", "eval", "lora_compiled", "lora_eager",
     None),
    ("eager_dora_vs_eager_lora_eval", "eager unmerged DoRA eval / eager LoRA eval", "eval", "dora_eager",
     "lora_eager", None),
    ("compiled_dora_vs_compiled_peft_dora_eval", "compiled DoRA eval / compiled PEFT DoRA eval", "eval",
     "dora_compiled", "peft_dora_compiled", None),
    ("compiled_dora_vs_compiled_lora_saved", "compiled DoRA saved activations / compiled LoRA", "saved",
     "dora_compiled", "lora_compiled", None),
    ("eager_dora_vs_eager_lora_saved", "eager DoRA saved activations / eager LoRA", "saved", "dora_eager",
     "lora_eager", None),
]
FIELDS = {"train": "step_ms", "eval": "latency_ms", "saved": "saved_mib"}


def _explain(fn: Callable, *args) -> dict:
    ex = torch._dynamo.explain(fn)(*args)
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
            "break_reasons": sorted({b.reason.splitlines()[0][:200] for b in ex.break_reasons})}


def _graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_compiled(workload: Workload, warmup: int, steps: int, inference_steps: int, log: Callable) -> dict:
    """Every figure of the compile section for one workload, as a JSON-ready dict."""
    device = workload.spec.device
    # eight models share the frozen model's code: let Dynamo keep a compiled entry for each of them
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        torch._dynamo.reset()
        explained = _explain_all(workload, log)
        torch._dynamo.reset()  # what explain traced is not reused below
        train, train_recompiled = _training(workload, warmup, steps, log)
        evaluation, eval_recompiled = _evaluation(workload, warmup, inference_steps, log)
    for name, row in train.items():
        row.update(explained.get(name, {}).get("train", {}))
    for name, row in evaluation.items():
        row.update(explained.get(name, {}).get("eval", {}))
    result = {"train": train, "eval": evaluation,
              "graphs_compiled_while_timing": {"train": train_recompiled, "eval": eval_recompiled}}
    result["ratios"] = table_ratios(RATIOS, {"train": train, "eval": evaluation, "saved": train}, FIELDS)
    return result


def _explain_all(workload: Workload, log: Callable) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in VARIANTS:
        log(f"  explain (graphs, breaks) of {name}")
        model = build_variant(workload, name).train()
        out[name + "_compiled"] = {"train": _explain(workload.loss, model, workload.inputs)}
        model.eval()
        with torch.no_grad():
            out[name + "_compiled"]["eval"] = _explain(workload.forward, model, workload.inputs)
        del model
    return out


def _training(workload: Workload, warmup: int, steps: int, log: Callable) -> tuple[dict[str, dict], int]:
    trainers: dict[str, Trainer] = {}
    results: dict[str, dict] = {}
    for name in VARIANTS:
        trainers[name + "_eager"] = Trainer(workload, name)
        model = build_variant(workload, name)
        trainers[name + "_compiled"] = Trainer(workload, name, model=model, call=torch.compile(model))
    for name, trainer in trainers.items():
        if name.endswith("_compiled"):
            log(f"  compiling {name} (training)")
        seconds = _timed(trainer.step)  # compiles a compiled variant
        loss, counter = trainer.counted_step()
        results[name] = {"first_step_s": seconds, "first_loss": loss, "saved_mib": counter.nbytes / MIB}
    log(f"  timing {len(trainers)} training variants: {warmup} warm-up + {steps} timed rounds")
    before = _graphs_compiled()
    times = interleaved_times({n: t.step for n, t in trainers.items()}, warmup, steps, workload.spec.device)
    recompiled = _graphs_compiled() - before
    for name, seconds in times.items():
        results[name].update(step_ms=median_ms(seconds), step_ms_all=[1e3 * s for s in seconds])
    return results, recompiled


def _evaluation(workload: Workload, warmup: int, steps: int, log: Callable) -> tuple[dict[str, dict], int]:
    def forward(call: Callable) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return workload.forward(call, workload.inputs)

        return run

    fns: dict[str, Callable[[], object]] = {}
    results: dict[str, dict] = {}
    for name in VARIANTS:
        eager = build_variant(workload, name).eval()
        compiled = build_variant(workload, name).eval()
        fns[name + "_eager"], fns[name + "_compiled"] = forward(eager), forward(torch.compile(compiled))
    for name, fn in fns.items():
        if name.endswith("_compiled"):
            log(f"  compiling {name} (eval)")
        results[name] = {"first_call_s": _timed(fn)}
    log(f"  timing {len(fns)} eval variants: {warmup} warm-up + {steps} timed rounds")
    before = _graphs_compiled()
    times = interleaved_times(fns, warmup, steps, workload.spec.device)
    recompiled = _graphs_compiled() - before
    for name, seconds in times.items():
        results[name].update(latency_ms=median_ms(seconds), latency_ms_all=[1e3 * s for s in seconds])
    return results, recompiled


def markdown(result: dict) -> list[str]:
    """The compile section's tables."""
    train, evaluation = result["train"], result["eval"]
    lines = ["#### torch.compile (default backend): eager and compiled, side by side", "",
             "| variant | step ms | first step s | saved MiB | graphs / breaks (training) | eval ms | first eval s "
             "| graphs / breaks (eval) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in train.items():
        e = evaluation.get(name, {})
        lines.append(
            f"| {name} | {_fmt(t['step_ms'])} | {_fmt(t['first_step_s'])} | {_fmt(t['saved_mib'])} | "
            f"{_graphs(t)} | {_fmt(e.get('latency_ms'))} | {_fmt(e.get('first_call_s'))} | {_graphs(e)} |"
        )
    recompiled = result["graphs_compiled_while_timing"]
    lines += ["", f"Graphs compiled during the timed rounds: {recompiled['train']} (training), {recompiled['eval']} "
              "(eval).", ""]
    return lines + ratio_table(result["ratios"])


def _graphs(row: dict) -> str:
    return "" if "graphs" not in row else f"{row['graphs']} / {row['graph_breaks']}"
