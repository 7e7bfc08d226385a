"""The training loop: AdamW, gradient accumulation, warm-up + linear/cosine decay (:func:`lr_factor`), gradient
clipping.

Everything random is a function of (seed, position), never of how the run got there, so a run resumed from a
checkpoint at step s repeats an uninterrupted run exactly:

* data order: epoch e visits the training examples in ``randperm(n)`` drawn from seed (seed, e); micro-batch m is
  the ``m % batches_per_epoch``-th slice of epoch ``m // batches_per_epoch`` (the last slice may be smaller);
* dropout: before optimizer step s, torch's generator is seeded with (seed, s).

The loss of a step is the mean of its micro-batches' losses: L = (1/k) sum_i L_i for k = ``grad_accum``.

Under torchrun (see :mod:`dorafit.train.distributed`) W processes share one data order: process r runs
micro-batches ``(s k + i) W + r`` of step s, the step's loss is the mean of all k W micro-batch losses (what one
process computes with ``grad_accum`` = k W), and dropout is seeded with (seed, s, r).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers.frozen import FrozenInputGrads
from .distributed import SINGLE, Group

_DATA, _STEP = 1, 2  # stream ids that keep the data-order and per-step seeds apart


def derived_seed(*key: int) -> int:
    """A 63-bit seed that is a fixed function of the integers in ``key`` (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class DataOrder:
    """Which training examples micro-batch m holds; a pure function of (seed, m)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.batches_per_epoch = math.ceil(n / batch_size)
        self._perm: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, _DATA, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def indices(self, micro_batch: int) -> list[int]:
        epoch, j = divmod(micro_batch, self.batches_per_epoch)
        return self.epoch_order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]


def total_steps(n: int, batch_size: int, grad_accum: int, epochs: float | None, steps: int | None) -> int:
    if steps is not None:
        return steps
    return max(1, math.ceil(epochs * math.ceil(n / batch_size) / grad_accum))


def warmup_steps(warmup: float, total: int) -> int:
    """``warmup`` < 1 is a share of ``total``; otherwise a number of steps."""
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """The multiple of ``--lr`` that (0-based) step ``step`` trains with.

    Warm-up, the first ``warmup`` steps: ``(step + 1) / (warmup + 1)``, a linear rise that starts above 0 (the
    first step trains at ``lr / (warmup + 1)``; a rise from 0, as transformers' schedulers have it, would spend the
    first step at learning rate 0) and reaches ``lr`` at step ``warmup``. Then ``constant``: 1; ``linear``:
    ``1 - p``; ``cosine``: ``(1 + cos(pi p)) / 2``, with ``p = (step - warmup) / (total - warmup)`` the share of
    the decay done (transformers' linear and cosine decays)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - done)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * done)))
    raise ValueError(f"unknown schedule {schedule!r}; choose linear, cosine or constant")


def make_scheduler(optimizer, schedule: str, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler setting each step's learning rate to ``lr * lr_factor(step, ...)`` (:func:`lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule, warmup, total))


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"the loss became {loss} at step {step + 1}")
        self.step, self.loss = step, loss


@dataclass
class LoopState:
    step: int  # optimizer steps done
    seconds: float  # training wall time so far (across resumes)
    metrics: list[dict]  # one row per step


def run(
    model: nn.Module,
    task,
    optimizer,
    scheduler,
    state: LoopState,
    total: int,
    *,
    seed: int,
    batch_size: int,
    grad_accum: int,
    max_grad_norm: float,
    device: torch.device,
    after_step: Callable[[LoopState], None],
    progress: bool = True,
    group: Group = SINGLE,
    scaler: torch.amp.GradScaler | None = None,
) -> LoopState:
    """Train from ``state.step`` to ``total`` steps; ``after_step`` is called after each (checkpoints, snapshots).

    Raises :class:`NonFiniteLoss` before applying a step whose loss is NaN or infinite (in every process).
    ``scaler`` (float16, see :mod:`dorafit.train.precision`): gradients of the scaled loss, unscaled before
    clipping; a step whose gradients overflowed is skipped and the scale lowered (the row's ``loss_scale``).
    """
    order = DataOrder(len(task.train), batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    products = FrozenInputGrads(model)  # bfloat16 input gradients on a CPU without bfloat16 instructions
    model.train()
    bar = tqdm(total=total, initial=state.step, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        while state.step < total:
            step = state.step
            torch.manual_seed(derived_seed(seed, _STEP, step, *([group.rank] if group.several else [])))
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss_sum, tokens = 0.0, 0
            for k in range(grad_accum):
                micro_batch = (step * grad_accum + k) * group.world_size + group.rank
                examples = [task.train[i] for i in order.indices(micro_batch)]
                batch = {key: v.to(device) for key, v in task.batch(examples).items()}
                with group.no_sync(model, last=k == grad_accum - 1), products:
                    loss = task.loss(model, batch) / grad_accum
                    (loss if scaler is None else scaler.scale(loss)).backward()
                loss_sum += float(loss.detach())
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(examples)
            if group.several:  # every process logs (and checks) the step's global loss
                loss_sum, tokens = group.sum([loss_sum, tokens])
                loss_sum, tokens = loss_sum / group.world_size, int(tokens)
            if not math.isfinite(loss_sum):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(step, loss_sum)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if scaler is None:
                optimizer.step()
            else:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            state.step += 1
            state.seconds += elapsed
            state.metrics.append({"step": state.step, "loss": loss_sum, "lr": lr, "seconds": round(state.seconds, 3),
                                  "tokens_per_s": round(tokens / elapsed, 1)})
            if scaler is not None:
                state.metrics[-1]["loss_scale"] = scale
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            after_step(state)
    finally:
        bar.close()
    return state
