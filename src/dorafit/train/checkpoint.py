"""Resumable checkpoints: one safetensors file, written atomically, never unpickled.

``RUN/checkpoint.safetensors`` holds

* ``param/<name>``        every trainable parameter (adapter tensors and head; all weights for ``full``),
* ``optim/<i>/<key>``     the AdamW state of trainable parameter i (``exp_avg``, ``exp_avg_sq``, ``step``),

and, in the safetensors header's metadata, a JSON ``state``: the step reached, the cumulative training seconds,
the metrics rows so far, the optimizer's param groups and parameter names, and the LR scheduler's state dict.
One file replaced by rename is atomic: a run killed at any moment leaves the previous checkpoint or the new one.
Every byte of it (tensors, names, shapes, the state) is covered by a SHA-256 stored in the file (:mod:`dorafit.sealed`);
a damaged checkpoint, or one holding NaN or infinite values, is refused with a message that names the file and
how to go on.

No random-number state is stored: data order and dropout are functions of (seed, step) (see
:mod:`dorafit.train.loop`), so the step number is the whole data position.

Under torchrun (a ``group`` of several processes) the tensors are the full ones, gathered from FSDP2's shards;
rank 0 writes the file, and on resume reads it and hands its tensors to the others
(:mod:`dorafit.train.distributed`). The file is the same whatever wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..files import io_error
from ..sealed import SealError, is_sealed, unseal, write_sealed
from .distributed import SINGLE, Group

FILE = "checkpoint.safetensors"
FORMAT = "dorafit-checkpoint/2"  # sealed; /1 (dorafit 0.1.0) had no seal and is still read


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume; the message says why."""


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, in the model's order (the optimizer's order too)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def collect(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable parameters by name, optimizer state dict keyed by parameter name) of a one-process model."""
    params = trainable(model)
    names = list(params)
    opt_state = optimizer.state_dict()
    optim = {"state": {names[i]: s for i, s in opt_state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
    return {n: p.detach() for n, p in params.items()}, optim


def write(run_dir: Path, params: dict, optim: dict, scheduler_state: dict, step: int, seconds: float,
          metrics: list[dict], scaler_state: dict | None = None) -> Path:
    """The checkpoint file from ``params`` and ``optim`` (keyed by parameter name, as :func:`collect` makes);
    ``scaler_state``: float16's loss scaler (its scale and growth tracker), if the run has one."""
    index = {name: i for i, name in enumerate(params)}
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for name, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index[name]}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    state = {
        "format": FORMAT,
        "step": step,
        "seconds": seconds,
        "metrics": metrics,
        "param_names": list(params),
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]],
        "scheduler": scheduler_state,
    }
    if scaler_state is not None:
        state["scaler"] = scaler_state
    path = run_dir / FILE
    write_sealed(path, tensors, {"state": json.dumps(state)})
    return path


def save(run_dir: Path, model, optimizer, scheduler, step: int, seconds: float, metrics: list[dict],
         group: Group = SINGLE, scaler=None) -> Path:
    """Write the checkpoint (rank 0; every process of a group must call it, FSDP2 gathers shards)."""
    params, optim = group.training_state(model, optimizer) if group.several else collect(model, optimizer)
    if group.is_main:
        write(run_dir, params, optim, scheduler.state_dict(), step, seconds, metrics,
              None if scaler is None else scaler.state_dict())
    return run_dir / FILE


def read(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(state, parameters by name, optimizer state dict keyed by parameter name) of ``RUN/checkpoint.safetensors``."""
    path = run_dir / FILE
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise io_error(exc, path, "read") from None
    try:
        if is_sealed(blob):
            metadata, tensors = unseal(blob)
        else:  # dorafit 0.1.0 wrote no seal
            metadata, tensors = _unsealed(blob)
        state = json.loads(metadata["state"])
        if state.get("format") not in (FORMAT, "dorafit-checkpoint/1") or \
                state["format"] == FORMAT and not is_sealed(blob):
            raise SealError(f"its format is {state.get('format')!r}, not a dorafit checkpoint's")
        bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)
        if bad:
            raise SealError(f"tensor {bad} holds NaN or infinite values")
    except (SealError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint {path} is damaged: {exc}. Delete it to train the run again from "
                              f"step 0 (rm {path}; dorafit train --resume {run_dir}), or start a new run with "
                              "another --out") from None
    names = state["param_names"]
    params = {n: tensors[f"param/{n}"] for n in names}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            opt_state.setdefault(names[int(index)], {})[name] = value
    return state, params, {"state": opt_state, "param_groups": groups}


def _unsealed(blob: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    header = blob[8 : 8 + int.from_bytes(blob[:8], "little")]
    return json.loads(header.decode("utf-8")).get("__metadata__", {}), load(blob)


def restore(model: nn.Module, optimizer, params: dict, optim: dict) -> None:
    """Copy ``params`` and ``optim`` (as :func:`read` returns them) into a one-process model and its optimizer."""
    current = trainable(model)
    index = {name: i for i, name in enumerate(current)}
    with torch.no_grad():
        for name, p in current.items():
            p.copy_(params[name])
    optimizer.load_state_dict({
        "state": {index[n]: s for n, s in optim["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]],
    })


def load(run_dir: Path, model, optimizer, scheduler, group: Group = SINGLE, scaler=None) -> dict:
    """Restore parameters, optimizer and scheduler from ``RUN/checkpoint.safetensors``; returns its state dict.

    In a group, rank 0 reads the file and every process gets its tensors (and its own shards under FSDP2).
    """
    held: dict = {}

    def read_checked() -> dict:
        state, params, optim = read(run_dir)
        if state["param_names"] != list(trainable(group.inner(model))):
            raise CheckpointError(f"{run_dir / FILE} was written for other trainable parameters than this run has; "
                                  "the run's config or the model folder changed since")
        held.update(params=params, optim=optim)
        return state

    state = group.on_main(read_checked)
    if group.several:
        group.restore_training_state(model, optimizer, held.get("params", {}), held.get("optim", {}))
    else:
        restore(model, optimizer, held["params"], held["optim"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return state


def exists(run_dir: Path) -> bool:
    return (run_dir / FILE).is_file()


def step_of(run_dir: Path) -> int | str:
    """The step of the run's checkpoint, read from its metadata alone ("?" if it cannot be read)."""
    try:
        with safe_open(str(run_dir / FILE), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]
    except Exception:  # noqa: BLE001 - used in messages and checks that handle "?"
        return "?"
