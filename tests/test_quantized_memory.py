"""No dense [out, in] weight of a quantized layer is ever created by dorafit's code during training or unmerged
inference: every dispatched operation's outputs are watched, and each tensor of out * in elements or more is
traced to the Python code that asked for it.

What the libraries do inside their own kernels is theirs and is reported, not hidden: torchao's ``linear_nf4``
dequantizes the NF4 weight forward and backward (seen here); bitsandbytes 0.50's CPU kernels do their
dequantization inside opaque operators (``gemm_4bit``), which a dispatch mode does not see.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dorafit

from .quant_support import KINDS, Holder, make_layer

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # with the separator: torchao lies beside it
OUT, IN, TOKENS = 512, 384, 32  # the weight has 196,608 elements; no activation comes near that


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage
        return id(t)


def _origin() -> str:
    """Who asked for the current operation: the innermost Python frame outside torch and this file."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not (path.startswith(_TORCH_DIR) or path == __file__):
            for library in ("bitsandbytes", "torchao", "dorafit"):
                if f"{os.sep}{library}{os.sep}" in path:
                    return library
            return path
        frame = frame.f_back
    return "autograd engine"


class DenseWatch(TorchDispatchMode):
    """Records (operation, shape, origin) of every output tensor with at least ``threshold`` elements."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold = threshold
        self.records: list[tuple[str, tuple, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            # a float tensor with new storage (views of the stored codes, e.g. int8 rows, are no dequantization)
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.threshold
                    and _storage(t) not in inputs):
                self.records.append((str(func), tuple(t.shape), _origin()))
        return out

    def by(self, origin: str) -> list:
        return [r for r in self.records if r[2] == origin]


def _life_of_an_adapter(kind_name: str, method: str, detach_norm: bool, tmp_path) -> DenseWatch:
    """apply, two training steps, eval forwards (cached norm), per-row batches, save and reload, under watch."""
    kind = KINDS[kind_name]
    torch.manual_seed(0)
    _, layer = make_layer(kind, out_features=OUT, in_features=IN)  # quantized outside the watch
    x = torch.randn(2, TOKENS // 2, IN)
    watch = DenseWatch(OUT * IN)
    with watch:
        model = Holder(layer)
        dorafit.apply(model, dorafit.AdapterConfig(method=method, r=8, targets=["layer"], detach_norm=detach_norm))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            model(x)
            model(x)
            with dorafit.per_row_adapters(model, ["default", None]):
                model(x)
        dorafit.save_adapter(model, tmp_path / "adapter")
        dorafit.unload(model)
        dorafit.load_adapter(model, tmp_path / "adapter")
        with torch.no_grad():
            model(x)
    return watch


KIND_NAMES = ["bnb-nf4", "bnb-nf4-bf16", "bnb-int8", "torchao-nf4"]


@pytest.mark.parametrize("method,detach_norm", [("dora", True), ("dora", False), ("dvora", True), ("lora", True)])
@pytest.mark.parametrize("kind_name", KIND_NAMES)
def test_dorafit_never_creates_a_dense_weight(kind_name, method, detach_norm, tmp_path):
    watch = _life_of_an_adapter(kind_name, method, detach_norm, tmp_path)
    ours = [r for r in watch.records if r[2] not in ("bitsandbytes", "torchao")]
    assert not ours, f"dense tensors created outside the quantization library: {ours[:5]}"


def test_the_libraries_own_dense_dequantization_is_seen(tmp_path):
    """The watch works: torchao's NF4 linear dequantizes the whole weight (its own code), and the watch says so."""
    watch = _life_of_an_adapter("torchao-nf4", "dora", True, tmp_path)
    assert any(math.prod(shape) >= OUT * IN for _, shape, _ in watch.by("torchao"))


def test_a_dense_merge_is_seen_and_attributed_to_dorafit():
    """Control: writing a float model does build the dense weight, in dorafit's code, and the watch says so."""
    torch.manual_seed(0)
    _, layer = make_layer(KINDS["bnb-nf4"], out_features=OUT, in_features=IN)
    model = Holder(layer)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=8, targets=["layer"]))
    with DenseWatch(OUT * IN) as watch:
        dorafit.merge_and_unload(model)
    assert watch.by("dorafit")


def test_an_unaligned_layer_is_read_in_the_one_call_the_library_makes(monkeypatch):
    """in = 200 is no multiple of the 64-element quantization block. Blocks of rows could start every 8 rows, but
    bitsandbytes' AVX512 CPU kernel reads such a layer's scales per row, differently for a block of rows than for
    the whole weight (docs/incoming/bnb-avx512-bug.md): dorafit reads it whole, in the library's own call, and that
    call's result and its square (the norm) are the only dense tensors dorafit's code makes."""
    kind = KINDS["bnb-fp4-double-unaligned"]
    _, layer = make_layer(kind, out_features=512)
    model = Holder(layer)
    with DenseWatch(512 * 200) as watch:
        dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=8, targets=["layer"]))
        model.eval()
        with torch.no_grad():
            model(torch.randn(4, 200))
    ours = [r for r in watch.records if r[2] not in ("bitsandbytes", "torchao")]
    assert ours and {op for op, _, _ in ours} == {"bitsandbytes.dequantize_4bit.default", "aten.pow.Tensor_Scalar"}
    assert {shape for _, shape, _ in ours} == {(512, 200)}
