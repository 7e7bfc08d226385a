"""``--dtype``: what is held and computed in low precision, and what stays float32.

    frozen base (weights, activations, W0 x)        --dtype (bfloat16, float16 or float32)
    adapter tensors, DoRA's magnitude, the head       float32: the optimizer's master weights
    AdamW state, gradients of the trainable tensors   float32
    DoRA's norms n = ||W0 + P Q|| (dorafit.functional) float32, as for every dtype

An adapted layer casts its input to the adapter's dtype for ``Q x``, and the update back to the layer's output
dtype (:mod:`dorafit.layers`), so the low-rank path runs in float32 beside a bfloat16 base and no autocast is
needed for it. A head trained in full (a classifier) is float32 too: it gets hooks that cast its floating inputs
to float32 and its floating outputs back to the dtype of its first floating input (:func:`float32_head`).

``auto`` is bfloat16 on a CUDA GPU that supports it and float32 everywhere else (a CPU without bfloat16
instructions computes bfloat16 products by converting, so it saves memory there, not time); full fine-tuning
(``--method full``) always trains float32 weights.

float16's range is small (largest 65504): gradients are computed from the loss times a scale
(``torch.amp.GradScaler``; 65536 to start, halved whenever a gradient overflows, that step then skipped, and
doubled after 2000 clean steps), unscaled before clipping. A loss that is itself not finite still stops the run.
bfloat16 has float32's range and needs no scaling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def resolve(name: str, device: torch.device, method: str) -> str:
    """``--dtype`` as a concrete dtype name: ``auto`` is bfloat16 on a CUDA GPU that supports it (adapter
    methods), float32 otherwise."""
    if name != "auto":
        return name
    if method != "full" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def _first_float_dtype(values) -> torch.dtype | None:
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return None


def _cast(dtype: torch.dtype):
    return lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def float32_head(model: nn.Module, names: list[str]) -> None:
    """The modules ``names`` (a head trained in full) in float32, computing in float32 inside a model of another
    dtype: their floating inputs are cast to float32, their floating outputs back to the input's dtype."""
    for name in names:
        module = model.get_submodule(name)
        if all(p.dtype == torch.float32 for p in module.parameters()):
            continue
        module.float()
        seen: list[torch.dtype | None] = [None]

        def before(mod, args, kwargs, seen=seen):
            seen[0] = _first_float_dtype(list(args) + list(kwargs.values()))
            return tree_map(_cast(torch.float32), args), tree_map(_cast(torch.float32), kwargs)

        def after(mod, args, kwargs, output, seen=seen):
            return output if seen[0] is None else tree_map(_cast(seen[0]), output)

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)


def grad_scaler(dtype: str, device: torch.device) -> torch.amp.GradScaler | None:
    """float16's loss scaler (see the module docstring); None for the other dtypes."""
    if dtype != "float16":
        return None
    return torch.amp.GradScaler(device.type)
