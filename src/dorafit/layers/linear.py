"""``nn.Linear`` (weight [out, in]) and transformers' GPT-2-style ``Conv1D`` (weight [in, out])."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerOps


class LinearOps(LayerOps):
    def weight_matrix(self, module: nn.Module) -> Tensor:
        return module.weight  # [out, in]

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.linear(x, module.weight)

    def down(self, module: nn.Module, x: Tensor, q: Tensor) -> Tensor:
        return F.linear(x, q)  # [..., r]

    def up(self, module: nn.Module, u: Tensor, p: Tensor) -> Tensor:
        return F.linear(u, p)  # [..., out]


class GPT2Conv1DOps(LinearOps):
    """transformers.pytorch_utils.Conv1D: ``y = x @ W + b`` with W stored [in, out] (PEFT: fan_in_fan_out)."""

    def weight_matrix(self, module: nn.Module) -> Tensor:
        return module.weight.T  # [out, in]

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        return x @ module.weight
