"""One benchmark variant's training step (:class:`Trainer`), and which variants a run selects: what the sections
(:mod:`.suite`, :mod:`.compiled`, :mod:`.activation`) and the peak-memory subprocess (:mod:`.peak`) share."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .measure import LiveTensorBytes, SavedTensorCounter, model_storages
from .models import Workload, build_variant

MIB = 2**20


class Trainer:
    """One variant's model, its AdamW optimizer (None for the frozen base) and its training step."""

    def __init__(self, workload: Workload, variant: str, model: nn.Module | None = None,
                 call: Callable[..., object] | None = None):
        """``model``: train this module instead of building ``variant``'s; ``call``: what the loss calls in its
        place (its ``torch.compile`` wrapper, say)."""
        self.workload = workload
        self.model = (build_variant(workload, variant) if model is None else model).train()
        self.call = self.model if call is None else call
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step(self) -> float:
        torch.manual_seed(self.workload.spec.seed)  # the same dropout masks (if the model has dropout) in every variant
        loss = self.workload.loss(self.call, self.workload.inputs)
        self._finish(loss)
        return loss.item()

    def counted_step(self) -> tuple[float, SavedTensorCounter]:
        """A step whose forward pass runs under a :class:`SavedTensorCounter`."""
        torch.manual_seed(self.workload.spec.seed)
        with SavedTensorCounter(exclude=model_storages(self.model)) as counter:
            loss = self.workload.loss(self.call, self.workload.inputs)
        self._finish(loss)
        return loss.item(), counter

    def live_step(self) -> tuple[float, LiveTensorBytes, int]:
        """A step run under :class:`LiveTensorBytes`: (loss, the tracker, bytes alive when the forward pass ends).

        What is alive then is what backward needs (plus the loss): with activation checkpointing too, where
        ``saved_tensors_hooks`` do not see the tensors the checkpoints keep; the tracker's ``peak`` covers the
        whole step (forward, backward, optimizer step, zero_grad).
        """
        torch.manual_seed(self.workload.spec.seed)
        with LiveTensorBytes() as live:
            loss = self.workload.loss(self.call, self.workload.inputs)
            held = live.alive_bytes()
            self._finish(loss)
            value = loss.item()
            del loss
        return value, live, held

    def _finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def selected(all_variants: tuple[str, ...], variants: tuple[str, ...] | None) -> tuple[str, ...]:
    """The variants of ``all_variants`` to run: every one if ``variants`` is None, else the frozen base (the
    reference of every ratio) and those named in ``variants`` (``dora`` brings ``dora_merged`` with it)."""
    if variants is None:
        return all_variants
    return tuple(v for v in all_variants if v == "base" or v.removesuffix("_merged") in variants)
