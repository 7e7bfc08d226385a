"""Snapshots for the weight-decomposition analysis: the trained tensors at chosen steps.

``RUN/snapshots/step-N/`` holds, for an adapter run, the adapter in the core format (``dorafit.save_adapter``;
the merged weight of each layer follows from it and the base model), and for ``--method full`` the weights (and
biases) of the ``--targets`` modules in ``weights.safetensors``. Step 0 is the state before training.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from ..files import atomic_write_bytes
from ..inject import find_modules
from ..io import save_adapter
from .rundir import SNAPSHOTS


def snapshot_dir(run_dir: Path, step: int) -> Path:
    return run_dir / SNAPSHOTS / f"step-{step:06d}"


def save_snapshot(run_dir: Path, step: int, model: nn.Module, method: str, targets: list[str], base: str) -> Path:
    folder = snapshot_dir(run_dir, step)
    if method != "full":
        return save_adapter(model, folder, base_model=base)
    modules = dict(model.named_modules())
    tensors = {}
    for name in find_modules(model, targets):
        for pname, p in modules[name].named_parameters(recurse=False):
            tensors[f"{name}.{pname}"] = p.detach().cpu().contiguous()
    atomic_write_bytes(folder / "weights.safetensors",
                       save_safetensors_bytes(tensors, metadata={"step": str(step), "base_model": base}))
    return folder
