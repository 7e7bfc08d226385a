"""Several adapters on one base model: pick one, or give every batch row its own.

    dorafit.apply(model, config, name="a") / dorafit.load_adapter(model, folder, name="a")   add beside the others
    dorafit.adapter_names(model)            ["default", "a", ...]: the model's own first
    dorafit.set_adapter(model, "a" | None)  what forward uses (None: the base model); only it trains
    dorafit.save_adapter(model, folder, name="a"), dorafit.unload(model, "a")
    with dorafit.per_row_adapters(model, ["a", None, "b", "a"]): model(batch)   row i with adapter names[i]

Adapters may differ in method (LoRA, DoRA, VeRA, DVoRA, magnitude-only), rank and targets; the base weights are
shared, never copied. In a mixed batch every row gets exactly what it would get alone with its adapter active:
each adapted layer computes ``W0 x`` once for the whole batch, and per adapter one low-rank product over that
adapter's rows and one per-unit scale ``m / n`` (DoRA's norm cached in eval mode), so K DoRA adapters cost about
what K LoRA adapters cost (METHOD.md, "DoRA at inference"). For few tokens (a decode step) a linear layer runs
the batch's adapters stacked, in one down- and one up-projection for all rows (:mod:`dorafit.stacked_adapters`).
Mixed batches are for inference: with gradients enabled, or with an adapter merged into the weights, they raise an
error that says so.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from .adapted import RowAdapters, is_adapted
from .inject import adapter_names, get_config, set_active


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the one the model's forward uses and the only one that trains (None: none, the base
    model). An error names the adapters the model has if it has no adapter ``name``."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"this model has no adapter named {name!r}; this model has {', '.join(adapter_names(model))}")
    set_active(model, name)


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, names: list[str | None]):
    """Inside the block, row i of every batch the model computes uses adapter ``names[i]`` (None: the base)."""
    names = list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise ValueError(f"per_row_adapters: no adapter named {unknown[0]!r}; this model has {', '.join(known)}")
    layers = [m for m in model.modules() if is_adapted(m)]
    merged = {layer.dorafit.merged_name for layer in layers} - {None}
    if merged:
        raise ValueError(f"per_row_adapters: adapter {merged.pop()!r} is merged into the weights, and merged "
                         "adapters cannot be mixed; unmerge it first (dorafit.unmerge)")
    device = next((p.device for p in model.parameters()), "cpu")
    rows = RowAdapters(names, device)  # each adapter's row indices, made once for every layer
    for layer in layers:
        layer.dorafit.rows = rows
    try:
        yield model
    finally:
        for layer in layers:
            layer.dorafit.rows = None


def load_named_adapter(model: nn.Module, folder: str | Path, name: str) -> list[str]:
    """:func:`dorafit.load_adapter` (or :func:`dorafit.import_peft` for a PEFT adapter folder) under ``name``, kept
    inactive and frozen when the model's own adapter or base stays active; for serving."""
    from .io import TENSORS_FILE, load_adapter
    from .peft_format import PEFT_TENSORS_FILE, import_peft

    was = getattr(model, "dorafit_active", None) if adapter_names(model) else None
    peft = not (Path(folder) / TENSORS_FILE).is_file() and (Path(folder) / PEFT_TENSORS_FILE).is_file()
    names = import_peft(model, folder, name=name) if peft else load_adapter(model, folder, name=name)
    set_adapter(model, was)
    model.requires_grad_(False)
    get_config(model, name)
    return names
