"""bitsandbytes' ``Linear4bit`` (nf4 or fp4, with or without double quantization) and ``Linear8bitLt`` (int8).

4-bit: ``weight`` holds the codes of W0 [out, in] flattened row by row, two per byte; ``weight.quant_state`` a
float scale per block of ``blocksize`` elements (``absmax``; with double quantization itself 8-bit codes with
a float scale per 256 of them, plus an offset). Element ``i`` of the flattened weight is
``code_table[c_i] * absmax[i // blocksize]``. The frozen product is the library's ``matmul_4bit`` in the layer's
compute dtype; on CPU it dequantizes the whole weight in one ``dequantize_4bit`` call. dorafit's W0 (norm, eval-time
``W0 Q^T``, merge, dequantize) is always the one that call gives: rows ``[s, e)`` are dequantized alone (bytes
``[s in / 2, e in / 2)`` with their blocks' scales) only when ``in`` is a multiple of the block size, so that every
row starts a block; otherwise the whole weight in the library's own single call (:meth:`Bnb4bitOps.row_alignment`).
The reason: bitsandbytes' AVX512 CPU kernel reads row ``r``'s scale for column ``c`` at ``r * (in // blocksize) +
c // blocksize``, which is the block above only when ``in % blocksize == 0``; for other widths its result differs
from other CPUs' and depends on how the weight is cut into calls (docs/incoming/bnb-avx512-bug.md).
:func:`dorafit.quantize_model` therefore quantizes with a block size dividing ``in``.

8-bit (LLM.int8, ``has_fp16_weights=False``): int8 codes CB [out, in] and a scale per row SCB,
``W0 = CB * SCB / 127``. The frozen product is the library's ``bnb.matmul``: in training mode on CPU it
multiplies by the dequantized weight (exact; on CUDA it quantizes the input to int8 first); in eval mode it
also quantizes the input to int8 (LLM.int8's inference path, with outlier columns in float16 above
``threshold``), so eval outputs carry that rounding as the layer does.

On CPU the library builds the dense float weight inside its 4-bit matmul and backward and inside its int8
training product (its kernels dequantize, then call a float matmul); dorafit's own code never does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .quantized import QuantizedLinearOps


class Bnb4bitOps(QuantizedLinearOps):
    def check(self, module: nn.Module) -> None:
        if getattr(module.weight, "quant_state", None) is None:
            raise ValueError("this bitsandbytes Linear4bit is not quantized yet (its weight is still float): move it "
                             "to its device first (.to('cpu') or .cuda()), which quantizes it")

    def prepare(self, module: nn.Module) -> None:
        """Keep the weight in its canonical layout: bitsandbytes would otherwise repack it in place on an
        AVX512-BF16 CPU at the first eval forward, after which its rows no longer dequantize; a weight already
        repacked is converted back by the library's own inverse (the one it uses before saving)."""
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)

    def describe(self, module: nn.Module) -> str:
        state = module.weight.quant_state
        double = ", double-quantized" if state.nested else ""
        return f"bitsandbytes Linear4bit ({state.quant_type}{double}, blocks of {state.blocksize})"

    def shape(self, module: nn.Module) -> tuple[int, int]:
        out, inp = module.weight.quant_state.shape
        return int(out), int(inp)

    def float_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.quant_state.dtype

    blockwise_input_grad = True

    def compute_dtype(self, module: nn.Module, x: Tensor | None) -> torch.dtype:
        return module.compute_dtype or (x.dtype if x is not None else module.weight.quant_state.dtype)

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        """``Linear4bit.forward`` without the bias (and without the CPU repacking, see :meth:`prepare`)."""
        import bitsandbytes as bnb
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(module)
        dtype = self.compute_dtype(module, x)
        return self.frozen_product(module, x, lambda x: bnb.matmul_4bit(
            x.to(dtype), module.weight, quant_state=module.weight.quant_state).to(x.dtype))

    def row_alignment(self, module: nn.Module) -> int:
        """1 when every row starts a quantization block (``in % blocksize == 0``); otherwise all the rows: the
        weight is then dequantized in one call, as the library's product does, since on an AVX512 CPU the library
        reads such a layer's scales per row (wrongly, the same way in both calls; see the module docstring)."""
        out, inp = self.shape(module)
        return 1 if inp % module.weight.quant_state.blocksize == 0 else out

    def _absmax(self, module: nn.Module) -> Tensor:
        """The float scale of every block (double quantization undone): [blocks], 1/blocksize of W0's size."""
        from bitsandbytes.functional import dequantize_blockwise

        state = module.weight.quant_state
        if not state.nested:
            return state.absmax.float()
        return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()

    def rows(self, module: nn.Module, start: int, stop: int) -> Tensor:
        state = module.weight.quant_state
        inp, blocksize = self.shape(module)[1], state.blocksize
        first, last = start * inp, stop * inp  # element range; first is a multiple of blocksize
        codes = module.weight.data.view(torch.uint8).reshape(-1)[first // 2 : (last + 1) // 2]
        absmax = self._absmax(module)[first // blocksize : -(-last // blocksize)]
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            codes, absmax, blocksize, state.quant_type, [stop - start, inp], torch.float32)


class Bnb8bitOps(QuantizedLinearOps):
    def check(self, module: nn.Module) -> None:
        if module.state.has_fp16_weights:
            raise ValueError("this bitsandbytes Linear8bitLt has has_fp16_weights=True: it keeps a float16 weight "
                             "and re-quantizes it every forward. Build it with has_fp16_weights=False (a frozen int8 "
                             "base, as transformers' load_in_8bit does)")
        if self._codes(module)[0].dtype != torch.int8:
            raise ValueError("this bitsandbytes Linear8bitLt is not quantized yet (its weight is still float): move "
                             "it to its device first (.to('cpu') or .cuda()), which quantizes it")

    def describe(self, module: nn.Module) -> str:
        return f"bitsandbytes Linear8bitLt (int8, outlier threshold {module.state.threshold})"

    def _codes(self, module: nn.Module) -> tuple[Tensor, Tensor]:
        """(CB [out, in] int8, SCB [out]) wherever the library keeps them (on the weight until the first forward,
        then on the layer's matmul state)."""
        if module.state.CB is not None:
            return module.state.CB, module.state.SCB
        return module.weight.data, module.weight.SCB

    def shape(self, module: nn.Module) -> tuple[int, int]:
        out, inp = self._codes(module)[0].shape
        return int(out), int(inp)

    blockwise_input_grad = True

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        """``Linear8bitLt.forward`` without the bias."""
        import bitsandbytes as bnb

        def product(x: Tensor) -> Tensor:
            state = module.state
            state.is_training = module.training
            if module.weight.CB is not None:
                module.init_8bit_state()
            out = bnb.matmul(x, module.weight, bias=None, state=state)
            if not state.has_fp16_weights and state.CB is not None:
                module.weight.data = state.CB
            return out.to(x.dtype)

        return self.frozen_product(module, x, product)

    def rows(self, module: nn.Module, start: int, stop: int) -> Tensor:
        cb, scb = self._codes(module)
        return cb[start:stop].to(torch.float32).mul_(scb[start:stop].unsqueeze(1).mul(1.0 / 127.0))

    def float_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the layer was quantized from where :func:`dorafit.quantize_model` recorded it, else the
        bias's, else float32 (the int8 layer itself does not record it)."""
        recorded = getattr(module, "dorafit_float_dtype", None)
        if recorded is not None:
            return recorded
        bias = getattr(module, "bias", None)
        return bias.dtype if bias is not None else torch.float32

    def low_rank_with_factor(self, module: nn.Module, x: Tensor, x_adapter: Tensor, p: Tensor, q: Tensor,
                             factor_grad: bool) -> tuple[Tensor, Tensor | None]:
        """On CPU as for every quantized family (Q's rows ride along in the frozen product, which multiplies by
        the dequantized weight in training). On CUDA the library's training product quantizes its input to int8,
        which would round Q: there ``W0 Q^T`` is left to the exact block-by-block path."""
        if x.is_cuda:
            return self.low_rank(module, x, x_adapter, p, q, with_bias=False), None
        return super().low_rank_with_factor(module, x, x_adapter, p, q, factor_grad)
