"""``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: weight [out, in, *kernel] read as [out, in * prod(kernel)].

``lora_A`` is a kernel [r, in, *kernel] applied with the layer's own stride, padding, dilation and padding
mode; ``lora_B`` is a 1x1 kernel [out, r, 1, ...]. Then conv(x, A) followed by conv(., B) equals
conv(x, B @ A) exactly, so merging is exact (PEFT's conv LoRA drops the layer's dilation; this does not).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerOps

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvOps(LayerOps):
    channel_dim = 1

    def check(self, module: nn.Module) -> None:
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) cannot be adapted; target another layer")
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise ValueError("transposed convolutions are not supported")

    def weight_matrix(self, module: nn.Module) -> Tensor:
        return module.weight.flatten(1)  # [out, in * prod(kernel)]

    def lora_shapes(self, module: nn.Module, r: int):
        out, inp, *kernel = module.weight.shape
        return (r, inp, *kernel), (out, r, *([1] * len(kernel)))

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        return module._conv_forward(x, module.weight, None)

    def down(self, module: nn.Module, x: Tensor, q: Tensor) -> Tensor:
        _, inp, *kernel = module.weight.shape
        # in the adapter's dtype (float32 beside a bfloat16 base)
        return module._conv_forward(x.to(q.dtype), q.view(q.shape[0], inp, *kernel), None)  # [batch, r, *spatial]

    def up(self, module: nn.Module, u: Tensor, p: Tensor) -> Tensor:
        k = module.weight.dim() - 2
        return _CONV_FN[k](u, p.view(*p.shape, *([1] * k)))  # [batch, out, *spatial]
