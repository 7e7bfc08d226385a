"""``dorafit bench --sections compile``: eager and ``torch.compile``d models side by side.

Variants: the frozen ``base``, our ``lora`` and ``dora`` (unmerged, norm detached) and ``peft_dora``, each
run eagerly (``<name>_eager``) and through ``torch.compile`` with its default options and backend (Inductor;
``--compile-backend`` chooses another) (``<name>_compiled``), as separate models sharing the frozen tensors.
Here ``base`` multiplies the input embeddings by a trainable scalar (1.0) so that backward runs through every
layer: the default section's ``enable_input_require_grads`` hook breaks the graph at the embeddings.
Measured per variant:

    training step   forward, loss, backward, AdamW step, zero_grad (as the default section), interleaved
                    with the other variants; the first step of a compiled variant compiles it (its time is
                    reported as "first step s" and kept out of the timing)
    eval forward    eval mode, ``torch.no_grad()``, one forward pass, interleaved the same way
    graphs / breaks ``torch._dynamo.explain`` of the training loss and of the eval forward: how many graphs
                    Dynamo makes and how many graph breaks it hits (1 / 0: the whole model is one graph)
    compiled while timed   graphs Dynamo compiled during the variant's timed calls (0: no recompilation
                    per layer or per optimizer step)
    saved MiB       activations saved for backward in one training step (:class:`SavedTensorCounter`; it
                    also sees what a compiled graph saves)

Ratios printed: compiled DoRA step / compiled LoRA step (target <= 1.05), compiled unmerged DoRA eval /
compiled LoRA eval (<= 1.05), compiled DoRA step / eager DoRA step (<= 0.9), and others without a target.
"""

from __future__ import annotations

import functools
import time
import types
from typing import Callable

import torch
from torch import nn

from .measure import interleaved_times, median_ms
from .models import DTYPES, Workload, build_variant, shared_copy
from .tables import _fmt, ratio_table, table_ratios
from .trainer import MIB, Trainer, selected

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


class _CompileCounter:
    """Wraps one variant's function; counts the graphs Dynamo compiles during its calls (should stay 0)."""

    def __init__(self, fn: Callable[[], object]):
        self.fn, self.graphs = fn, 0

    def __call__(self) -> object:
        before = _graphs_compiled()
        out = self.fn()
        self.graphs += _graphs_compiled() - before
        return out


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_compiled(workload: Workload, warmup: int, steps: int, inference_steps: int, log: Callable,
                 backend: str = "inductor", variants: tuple[str, ...] | None = None) -> dict:
    """Every figure of the compile section for one workload, as a JSON-ready dict.

    ``variants``: a subset of lora, dora, peft_dora (``dorafit bench --variants``; the base always runs).
    """
    names = selected(VARIANTS, variants)
    # the models share the frozen model's code (explain, training, eval): let Dynamo keep an entry for each
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        torch._dynamo.reset()
        explained = _explain_all(workload, names, log)
        torch._dynamo.reset()  # what explain traced is not reused below
        train = _training(workload, names, warmup, steps, log, backend)
        evaluation = _evaluation(workload, names, warmup, inference_steps, log, backend)
    for name, row in train.items():
        row.update(explained.get(name, {}).get("train", {}))
    for name, row in evaluation.items():
        row.update(explained.get(name, {}).get("eval", {}))
    result = {"backend": backend, "train": train, "eval": evaluation}
    result["ratios"] = table_ratios(RATIOS, {"train": train, "eval": evaluation, "saved": train}, FIELDS)
    return result


def _build(workload: Workload, name: str) -> nn.Module:
    """The variant's model; ``base`` with a trainable scalar on its input embeddings (see the module docstring)."""
    if name != "base":
        return build_variant(workload, name)
    model = shared_copy(workload.base)
    embeddings = model.get_input_embeddings()
    one = torch.ones((), device=workload.spec.device, dtype=DTYPES[workload.spec.dtype])
    embeddings.input_scale = nn.Parameter(one)
    embeddings.register_forward_hook(lambda module, args, out: out * module.input_scale)
    return model


def _call(model: nn.Module, *args, **kwargs):
    return model(*args, **kwargs)


def _compiled(model: nn.Module, name: str, backend: str) -> Callable:
    """``torch.compile`` of ``model``'s call, through a top-level function of this variant's own.

    Dynamo keeps its compiled entries per code object. Compiling the eight models directly would put all their
    entries on the one code object of the model class's forward, where a partial graph of one model (PEFT's,
    which breaks the graph inside its layers) can pass the guards of another model's call and make Dynamo run
    that model layer by layer. A copy of :func:`_call`'s code named after the variant gives each variant its
    own entries; the model's own forward is traced into the graph as with ``torch.compile(model)``.
    """
    code = _call.__code__.replace(co_name=f"call_{name}", co_qualname=f"call_{name}")
    call = types.FunctionType(code, _call.__globals__, f"call_{name}")
    return torch.compile(functools.partial(call, model), backend=backend)


def _explain_all(workload: Workload, names: tuple[str, ...], log: Callable) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in names:
        log(f"  explain (graphs, breaks) of {name}")
        model = _build(workload, name).train()
        out[name + "_compiled"] = {"train": _explain(workload.loss, model, workload.inputs)}
        model.eval()
        with torch.no_grad():
            out[name + "_compiled"]["eval"] = _explain(workload.forward, model, workload.inputs)
        del model
    return out


def _training(workload: Workload, names: tuple[str, ...], warmup: int, steps: int, log: Callable,
              backend: str) -> dict[str, dict]:
    trainers: dict[str, Trainer] = {}
    results: dict[str, dict] = {}
    for name in names:
        trainers[name + "_eager"] = Trainer(workload, name, model=_build(workload, name))
        model = _build(workload, name)
        call = _compiled(model, name + "_train", backend)
        trainers[name + "_compiled"] = Trainer(workload, name, model=model, call=call)
    for name, trainer in trainers.items():
        if name.endswith("_compiled"):
            log(f"  compiling {name} (training)")
        seconds = _timed(trainer.step)  # compiles a compiled variant
        loss, counter = trainer.counted_step()
        results[name] = {"first_step_s": seconds, "first_loss": loss, "saved_mib": counter.nbytes / MIB}
    log(f"  timing {len(trainers)} training variants: {warmup} warm-up + {steps} timed rounds")
    counted = {n: _CompileCounter(t.step) for n, t in trainers.items()}
    times = interleaved_times(counted, warmup, steps, workload.spec.device)
    for name, seconds in times.items():
        results[name].update(step_ms=median_ms(seconds), step_ms_all=[1e3 * s for s in seconds],
                             graphs_compiled_while_timing=counted[name].graphs)
    return results


def _evaluation(workload: Workload, names: tuple[str, ...], warmup: int, steps: int, log: Callable,
                backend: str) -> dict[str, dict]:
    def forward(call: Callable) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return workload.forward(call, workload.inputs)

        return run

    fns: dict[str, Callable[[], object]] = {}
    results: dict[str, dict] = {}
    for name in names:
        eager = _build(workload, name).eval()
        compiled = _build(workload, name).eval()
        fns[name + "_eager"] = forward(eager)
        fns[name + "_compiled"] = forward(_compiled(compiled, name + "_eval", backend))
    for name, fn in fns.items():
        if name.endswith("_compiled"):
            log(f"  compiling {name} (eval)")
        results[name] = {"first_call_s": _timed(fn)}
    log(f"  timing {len(fns)} eval variants: {warmup} warm-up + {steps} timed rounds")
    counted = {n: _CompileCounter(fn) for n, fn in fns.items()}
    times = interleaved_times(counted, warmup, steps, workload.spec.device)
    for name, seconds in times.items():
        results[name].update(latency_ms=median_ms(seconds), latency_ms_all=[1e3 * s for s in seconds],
                             graphs_compiled_while_timing=counted[name].graphs)
    return results


def markdown(result: dict) -> list[str]:
    """The compile section's tables."""
    train, evaluation = result["train"], result["eval"]
    lines = [f"#### torch.compile (backend {result['backend']}): eager and compiled, side by side", "",
             "| variant | step ms | first step s | saved MiB | graphs / breaks / compiled while timed (training) "
             "| eval ms | first eval s | graphs / breaks / compiled while timed (eval) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in train.items():
        e = evaluation.get(name, {})
        lines.append(
            f"| {name} | {_fmt(t['step_ms'])} | {_fmt(t['first_step_s'])} | {_fmt(t['saved_mib'])} | "
            f"{_graphs(t)} | {_fmt(e.get('latency_ms'))} | {_fmt(e.get('first_call_s'))} | {_graphs(e)} |"
        )
    return lines + [""] + ratio_table(result["ratios"])


def _graphs(row: dict) -> str:
    if "graphs" not in row:
        return ""
    return f"{row['graphs']} / {row['graph_breaks']} / {row['graphs_compiled_while_timing']}"
