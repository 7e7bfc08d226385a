"""The same W0 on every CPU: bitsandbytes' AVX512 CPU kernel reads the block scales of a 4-bit weight whose input
width is no multiple of the block size per row (docs/incoming/bnb-avx512-bug.md). Reproduced on any CPU with a
plain-torch copy of its index formula; dorafit's W0 (norm, merge, dequantize) must be the one the library's own
product uses, and the layers dorafit quantizes must not depend on the formula at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dorafit
from dorafit.quantize import blocksize_for, quantize_model

from .quant_support import Holder, dequantize_4bit_reference, emulate_avx512_dequantize

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def _quantized(out: int, inp: int, blocksize: int = 64, seed: int = 0):
    """(codes, quant_state) of a random [out, inp] float32 weight, nf4 with single-level scales."""
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    return F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)


@pytest.mark.parametrize("inp", [32, 96, 64, 128])
def test_the_avx512_index_formula_differs_from_the_flat_block_exactly_when_in_is_no_multiple_of_the_block(inp):
    codes, state = _quantized(8, inp)
    args = (codes, state.absmax, 64, "nf4", [8, inp], torch.float32)
    flat = dequantize_4bit_reference(*args)
    per_row = dequantize_4bit_reference(*args, avx512=True)
    assert torch.equal(flat, per_row) == (inp % 64 == 0)


@pytest.mark.parametrize("inp", [32, 96, 64, 200])
def test_the_reference_is_what_this_cpus_library_computes(inp):
    """The plain-torch copy is the library's kernel on this CPU: the AVX512 formula where torch (and so
    bitsandbytes) sees AVX512, the flat one elsewhere (200 inputs: no multiple of 16, the scalar branch)."""
    codes, state = _quantized(8, inp)
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    expected = dequantize_4bit_reference(codes, state.absmax, 64, "nf4", [8, inp], torch.float32, avx512=avx512)
    assert torch.equal(F.dequantize_4bit(codes, state), expected)


def test_under_the_avx512_kernel_chunks_of_rows_and_the_whole_weight_disagree(monkeypatch):
    """The reproduction: [8, 32] in blocks of 64, dequantized whole (as the library's product does) and two rows at
    a time with their slice of the scales (two rows = one block): they differ unless in % blocksize == 0."""
    emulate_avx512_dequantize(monkeypatch)
    for inp, differ in ((32, True), (64, False)):
        codes, state = _quantized(8, inp)
        whole = F.dequantize_4bit(codes, state)
        rows = 64 // inp if inp < 64 else 1
        chunks = torch.cat([
            torch.ops.bitsandbytes.dequantize_4bit.default(
                codes.reshape(-1)[s * inp // 2 : (s + rows) * inp // 2],
                state.absmax[s * inp // 64 : (s + rows) * inp // 64], 64, "nf4", [rows, inp], torch.float32)
            for s in range(0, 8, rows)])
        assert torch.equal(chunks, whole) != differ


def _bnb_layer(inp: int, out: int = 24, seed: int = 0) -> nn.Module:
    """A Linear4bit quantized by bitsandbytes itself (blocks of 64, double quantization), as transformers loads one."""
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out)
    layer = bnb.nn.Linear4bit(inp, out, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").requires_grad_(False)


@pytest.mark.parametrize("inp", [32, 96, 64])
@pytest.mark.parametrize("avx512", [True, False], ids=["avx512-kernel", "this-cpu"])
def test_dorafit_uses_the_products_w0_so_norm_merge_and_forward_agree(inp, avx512, monkeypatch):
    if avx512:
        emulate_avx512_dequantize(monkeypatch)
    model = Holder(_bnb_layer(inp))
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, alpha=8, targets=["layer"]))
    layer = model.layer
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    w0 = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # what matmul_4bit multiplies by
    assert torch.equal(layer.dorafit.ops.dequantized_weight(layer), w0)
    torch.testing.assert_close(layer.base_squared_norms(), w0.pow(2).sum(1), rtol=1e-6, atol=0)
    x = torch.randn(3, 5, inp, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merged = dorafit.merge_and_unload(model)(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_block_size_divides_the_input_width_or_the_layer_stays_float():
    assert [blocksize_for(n) for n in (64, 128, 32, 96, 40, 200)] == [64, 64, 32, 32, None, None]
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 32), nn.Linear(32, 96), nn.Linear(96, 40),
                          nn.Linear(40, 64))
    with pytest.warns(UserWarning, match=r"2 linear layer\(s\) left in float \(1, 4\): nf4 needs an input width "
                      r"that is a multiple of 32"):
        names = quantize_model(model, "nf4")
    assert names == ["0", "2", "3"]
    assert [model[i].weight.quant_state.blocksize for i in (0, 2, 3)] == [64, 32, 32]
    assert type(model[1]) is nn.Linear and type(model[4]) is nn.Linear  # 8 and 40 inputs
    # int8 has a scale per row: every width quantizes
    assert quantize_model(nn.Sequential(nn.Linear(40, 8), nn.Linear(8, 8)), "int8") == ["0", "1"]


@pytest.mark.parametrize("inp", [32, 96, 64])
def test_layers_dorafit_quantizes_read_the_same_on_every_cpu(inp, monkeypatch):
    """With the block size dividing the width, the AVX512 formula and the flat one give the same W0."""
    model = nn.Sequential(nn.Linear(inp, 16))
    quantize_model(model, "nf4")
    state = model[0].weight.quant_state
    here = F.dequantize_4bit(model[0].weight.data, state)
    emulate_avx512_dequantize(monkeypatch)
    assert torch.equal(F.dequantize_4bit(model[0].weight.data, state), here)
