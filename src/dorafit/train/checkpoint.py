"""Resumable checkpoints: one safetensors file, written atomically, never unpickled.

``RUN/checkpoint.safetensors`` holds

* ``param/<name>``        every trainable parameter (adapter tensors and head; all weights for ``full``),
* ``optim/<i>/<key>``     the AdamW state of trainable parameter i (``exp_avg``, ``exp_avg_sq``, ``step``),

and, in the safetensors header's metadata, a JSON ``state``: the step reached, the cumulative training seconds,
the metrics rows so far, the optimizer's param groups and parameter names, and the LR scheduler's state dict.
One file replaced by rename is atomic: a run killed at any moment leaves the previous checkpoint or the new one.

No random-number state is stored: data order and dropout are functions of (seed, step) (see
:mod:`dorafit.train.loop`), so the step number is the whole data position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from ..files import atomic_write_bytes

FILE = "checkpoint.safetensors"
FORMAT = "dorafit-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume; the message says why."""


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, in the model's order (the optimizer's order too)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save(run_dir: Path, model, optimizer, scheduler, step: int, seconds: float, metrics: list[dict]) -> Path:
    params = trainable(model)
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    state = {
        "format": FORMAT,
        "step": step,
        "seconds": seconds,
        "metrics": metrics,
        "param_names": list(params),
        "param_groups": opt_state["param_groups"],
        "scheduler": scheduler.state_dict(),
    }
    blob = save_safetensors_bytes(tensors, metadata={"state": json.dumps(state)})
    path = run_dir / FILE
    atomic_write_bytes(path, blob)
    return path


def load(run_dir: Path, model, optimizer, scheduler) -> dict:
    """Restore parameters, optimizer and scheduler from ``RUN/checkpoint.safetensors``; returns its state dict."""
    path = run_dir / FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} cannot be read ({exc}); start the run again without --resume") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dorafit checkpoint (format {state.get('format')!r})")
    params = trainable(model)
    if state["param_names"] != list(params):
        raise CheckpointError(f"{path} was written for other trainable parameters than this run has; "
                              "the run's config or the model folder changed since")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    groups = state["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    return state


def exists(run_dir: Path) -> bool:
    return (run_dir / FILE).is_file()
