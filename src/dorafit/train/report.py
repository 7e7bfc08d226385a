"""What ``dorafit train`` prints: the run's description, progress lines and evaluation results."""

from __future__ import annotations

import os
import sys

from ..inject import trainable_parameter_count
from .distributed import SINGLE, Group
from .loop import LoopState


def describe(setup, total: int, warmup: int, group: Group = SINGLE) -> str:
    from .setup import quantize_backend

    cfg, data, task, model = setup.cfg, setup.data, setup.task, setup.model
    trainable, everything = trainable_parameter_count(model)
    tests = sum(len(v) for v in data.test_sets().values())
    what = (f"{cfg.method} r={cfg.rank} alpha={cfg.alpha:g} on {len(setup.adapted)} modules ({roles(cfg.targets)})"
            if cfg.method != "full" else "full fine-tuning")
    head = f" + head {', '.join(cfg.head)}" if cfg.head and cfg.method != "full" else ""
    epochs = total * cfg.grad_accum * group.world_size * cfg.batch_size / len(task.train)
    batch = f"{cfg.batch_size}x{cfg.grad_accum} examples ({epochs:.2f} epochs)"
    if group.several:
        batch = (f"{cfg.batch_size}x{cfg.grad_accum}x{group.world_size} examples ({epochs:.2f} epochs; batch x "
                 f"accumulation x processes, {group.strategy} over {group.backend})")
    limit = f" (evaluated on up to {cfg.eval_limit} per test set)" if cfg.eval_limit else ""
    return "\n".join(setup.notes + [
        f"model   {cfg.model} ({setup.loaded.folder}), {type(model).__name__}, {cfg.dtype}, on {setup.device}"
        + (f", {len(setup.quantized)} linear layers quantized {cfg.quantize} ({quantize_backend(cfg)})"
           if cfg.quantize else ""),
        f"task    {cfg.task} ({task.kind}): {len(task.train)} training / {tests} test examples{limit}, "
        f"{task.describe()}",
        f"method  {what}{head}: {trainable:,} of {everything:,} parameters trainable "
        f"({100 * trainable / everything:.3f}%)",
        f"steps   {total} of {batch}, lr {cfg.lr:g} {cfg.schedule}, warm-up {warmup}, seed {cfg.seed}"
        + (", gradient checkpointing" if cfg.gradient_checkpointing else "") + (", compiled" if cfg.compile else ""),
    ])


def roles(names: list[str]) -> str:
    """Target names as read: suffixes as given; full module names by their distinct last two parts."""
    if all(name.count(".") <= 1 for name in names):
        return ", ".join(names)
    return ", ".join(dict.fromkeys(".".join(name.split(".")[-2:]) for name in names))


def show_progress() -> bool:
    """Progress bars on a terminal (stderr), or anywhere with DORAFIT_PROGRESS=1."""
    return sys.stderr.isatty() or os.environ.get("DORAFIT_PROGRESS") == "1"


def progress_line(state: LoopState, total: int, window: int) -> str:
    """``step 45/300  loss 0.8123  lr 4.68e-04  1.23 steps/s`` over the last ``window`` steps."""
    recent = state.metrics[-window:]
    start = state.metrics[-window - 1]["seconds"] if len(state.metrics) > window else 0.0
    seconds = recent[-1]["seconds"] - start
    rate = f"{len(recent) / seconds:.2f} steps/s" if seconds > 0 else ""
    loss = sum(r["loss"] for r in recent) / len(recent)
    return f"step {state.step}/{total}  loss {loss:.4f}  lr {recent[-1]['lr']:.2e}  {rate}"
