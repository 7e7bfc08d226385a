"""An ``nn.Linear`` whose weight is torchao's ``NF4Tensor`` (QLoRA's NF4, torchtune's ``FrozenNF4Linear``).

``NF4Tensor`` stores W0 [out, in] flattened row by row as 4-bit indices into a 16-value NF4 table, two per
byte (``quantized_data``), with one scale per block of ``block_size`` elements, itself int8 with a float factor
per ``scaler_block_size`` scales and a mean (double quantization). An element is

    W0[e] = nf4[code[e]] * scale[e // block_size],   scale = quantized_scaler / factor + mean

in the weight's dtype, exactly as ``NF4Tensor.get_original_weight`` computes it, so rows ``[s, e)`` dequantize
from bytes ``[s in / 2, e in / 2)`` and their scales whenever ``s in`` is a multiple of ``block_size``. The frozen
product is torchao's ``linear_nf4`` (what ``F.linear`` does with an NF4 weight), in the input's dtype; torchao
dequantizes the whole weight inside it, forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantized import QuantizedLinearOps


class TorchaoNF4Ops(QuantizedLinearOps):
    def describe(self, module: nn.Module) -> str:
        return f"torchao NF4 weight (blocks of {module.weight.block_size})"

    def shape(self, module: nn.Module) -> tuple[int, int]:
        out, inp = module.weight.shape
        return int(out), int(inp)

    def float_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    def cache_tensors(self, module: nn.Module) -> tuple[Tensor, ...]:
        return (module.weight.quantized_data,)  # the wrapper tensor has no storage of its own

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.linear(x, module.weight)  # torchao's LinearNF4

    def row_alignment(self, module: nn.Module) -> int:
        block = module.weight.block_size
        return block // math.gcd(self.shape(module)[1], block)

    def rows(self, module: nn.Module, start: int, stop: int) -> Tensor:
        w = module.weight
        inp, block = self.shape(module)[1], w.block_size
        first, last = start * inp, stop * inp  # element range; first is a multiple of block_size
        scales = w.dequantize_scalers(w.quantized_scalers, w.quantization_factor, w.scaler_block_size)
        codes = w.quantized_data[first // 2 : last // 2]
        values = torch.stack([w.nf4[(codes >> 4).long()], w.nf4[(codes & 0b1111).long()]], dim=-1).view(-1, block)
        values = values * scales[first // block : last // block].unsqueeze(1)
        return values.view(stop - start, inp).to(torch.float32)
