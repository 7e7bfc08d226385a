"""``nn.Linear`` (weight [out, in]) and transformers' GPT-2-style ``Conv1D`` (weight [in, out])."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerOps
from .frozen import blockwise_matmul
from .low_rank_linear import low_rank_linear


class LinearOps(LayerOps):
    blockwise_input_grad = True

    def weight_matrix(self, module: nn.Module) -> Tensor:
        return module.weight  # [out, in]

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        return self.frozen_product(module, x, lambda x: F.linear(x, module.weight))

    def input_grad(self, module: nn.Module, grad: Tensor) -> Tensor:
        return blockwise_matmul(grad, self.weight_matrix(module))

    def down(self, module: nn.Module, x: Tensor, q: Tensor) -> Tensor:
        return F.linear(x.to(q.dtype), q)  # [..., r], in the adapter's dtype (float32 beside a bfloat16 base)

    def up(self, module: nn.Module, u: Tensor, p: Tensor) -> Tensor:
        return F.linear(u, p)  # [..., out]

    def low_rank(
        self, module: nn.Module, x: Tensor, x_adapter: Tensor, p: Tensor, q: Tensor, with_bias: bool
    ) -> Tensor:
        """The fused :func:`low_rank_linear` when x feeds both paths (no dropout) and nothing casts dtypes."""
        w0 = self.weight_matrix(module)
        bias = module.bias if with_bias else None
        same_dtype = x.dtype == w0.dtype == p.dtype == q.dtype and (bias is None or bias.dtype == x.dtype)
        if x_adapter is not x or not same_dtype or x.is_meta or torch.is_autocast_enabled(x.device.type):
            return super().low_rank(module, x, x_adapter, p, q, with_bias)
        return low_rank_linear(x, w0, p, q, bias)


class GPT2Conv1DOps(LinearOps):
    """transformers.pytorch_utils.Conv1D: ``y = x @ W + b`` with W stored [in, out] (PEFT: fan_in_fan_out)."""

    def weight_matrix(self, module: nn.Module) -> Tensor:
        return module.weight.T  # [out, in]

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        return self.frozen_product(module, x, lambda x: x @ module.weight)
