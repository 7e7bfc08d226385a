"""Linear layers through oneDNN with each weight reordered once (``dorafit serve --pack-weights``).

Why: a decode step multiplies a few rows (one per request) by every weight matrix. On CPUs where MKL's sgemm
handles a few rows poorly, eight rows cost several times one: on a 2-core AMD EPYC (AVX2), 2026-12-06, an
eight-row decode forward of the benchmark's model took 3.38 times a one-row one, and 2.33 times with packed
oneDNN weights (benchmarks/serving.py, its ``bound`` part).

How: :class:`PackedLinears` is a ``TorchFunctionMode``, entered around the engine's decode forwards of two rows or
more (one row and prefill chunks ran faster with the default kernels, see :mod:`.engine`), that sends every
``F.linear(x, W, b)`` whose float32 CPU weight ``W`` it has packed to ``torch.ops.mkldnn._linear_pointwise``
with W's packed copy (what Inductor's weight prepacking uses). ``nn.Linear`` modules, adapted or not, and the
fused low-rank product of adapted layers all call ``F.linear``, so no layer changes. A weight written in place
since it was packed (its version counter moved) is packed again on its next use.

Exactness: each row's result is computed alike whatever the other rows are (a request batched with others gets
exactly the logits it gets alone), but oneDNN rounds differently from the default kernels (about 1e-6 relative
on float32), so a greedy token can differ from an unpacked server's where two tokens' logits are that close.

Memory: one packed copy of every float32 linear weight beside the weight itself (the adapters' norms, merging and
saving read the dense one): about the base model's linear weights once more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def available() -> bool:
    """Whether this torch build has oneDNN (mkldnn) for the CPU."""
    return torch.backends.mkldnn.is_available()


class PackedLinears(TorchFunctionMode):
    """Within ``with packed:``, ``F.linear`` with a packed weight runs oneDNN's product (module docstring)."""

    def __init__(self, model: nn.Module, rows: int = 8):
        super().__init__()
        self.rows = rows  # the batch size oneDNN is told to expect when it chooses the weight's layout
        self.packed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id(W): (W, version, packed W)
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and _packable(weight):
                self.packed[id(weight)] = self._pack(weight)

    def _pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        with torch.no_grad():
            return weight, weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.rows)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            entry = self.packed.get(id(weight))
            if (entry is not None and entry[0] is weight and x.dtype == torch.float32 and x.device.type == "cpu"
                    and not torch.is_grad_enabled()):
                if entry[1] != weight._version:
                    entry = self.packed[id(weight)] = self._pack(weight)
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), entry[2], bias, "none", [], "")
        return func(*args, **kwargs)


def _packable(weight) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == torch.float32
            and weight.device.type == "cpu")
