"""Snapshots for the weight-decomposition analysis: the trained tensors at chosen steps.

``RUN/snapshots/step-N/`` holds, for an adapter run, the adapter in the core format (``dorafit.save_adapter``;
the merged weight of each layer follows from it and the base model), and for ``--method full`` the weights (and
biases) of the ``--targets`` modules in ``weights.safetensors``. Step 0 is the state before training.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from ..files import atomic_write_bytes
from ..inject import adapter_state_dict, find_modules
from ..io import save_adapter
from .rundir import SNAPSHOTS


def snapshot_dir(run_dir: Path, step: int) -> Path:
    return run_dir / SNAPSHOTS / f"step-{step:06d}"


def snapshot_keys(model: nn.Module, method: str, targets: list[str]) -> list[str]:
    """The state-dict keys a snapshot holds: the adapter's, or (full) the --targets modules' parameters."""
    if method != "full":
        return list(adapter_state_dict(model))
    modules = dict(model.named_modules())
    return [f"{name}.{pname}" for name in find_modules(model, targets)
            for pname, _ in modules[name].named_parameters(recurse=False)]


def save_snapshot(run_dir: Path, step: int, model: nn.Module, method: str, targets: list[str], base: str,
                  tensors: dict[str, Tensor] | None = None) -> Path:
    """Write the snapshot of ``step``; ``tensors`` (keyed by :func:`snapshot_keys`) replaces the model's own
    (e.g. full tensors gathered from FSDP2's shards)."""
    folder = snapshot_dir(run_dir, step)
    if method != "full":
        return save_adapter(model, folder, base_model=base, tensors=tensors)
    if tensors is None:
        own = model.state_dict(keep_vars=True)
        tensors = {key: own[key] for key in snapshot_keys(model, method, targets)}
    tensors = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    atomic_write_bytes(folder / "weights.safetensors",
                       save_safetensors_bytes(tensors, metadata={"step": str(step), "base_model": base}))
    return folder
