"""The performance paths, against the reference formulas in float64, and DoRA's memory promise.

- ``low_rank_linear`` (linear layers' fused path) equals ``x (W0 + P Q)^T + b`` with the same gradients;
- the fused and the generic path are both taken where they should be, and agree;
- the in-place magnitude scale equals the out-of-place one, and is caught if something saved its input;
- a DoRA training step (forward, backward, AdamW) creates no tensor the size of the [out, in] weight,
  on every layer family, with the norm detached or not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import dorafit
from dorafit.layers.base import LayerOps
from dorafit.layers.low_rank_linear import low_rank_linear
from dorafit.magnitude_scale import magnitude_scale

from .conftest import Wrapper, randomize_adapter


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("w0_trains", [False, True])
def test_low_rank_linear_matches_dense_formula(with_bias, w0_trains):
    g = _gen()
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w0 = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=w0_trains)
    p = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    q = torch.randn(2, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    y = low_rank_linear(x, w0, p, q, b)
    y_ref = x @ (w0 + p @ q).T + (0 if b is None else b)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, w0, p, q, b) if t is not None and t.requires_grad]
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((y * upstream).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), inputs)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: low_rank_linear(*a), (x, w0, p, q, b))


def _dora_linear(dropout=0.0, detach_norm=True, bias=True):
    torch.manual_seed(0)
    model = Wrapper(nn.Linear(7, 5, bias=bias)).double()
    cfg = dorafit.AdapterConfig(
        method="dora", r=2, alpha=3, targets=["layer"], dropout=dropout, detach_norm=detach_norm
    )
    dorafit.apply(model, cfg)
    randomize_adapter(model)
    return model


def _graph_names(t: torch.Tensor) -> set[str]:
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_linear_layers_take_the_fused_path_unless_dropout_is_active():
    x = torch.randn(4, 7, dtype=torch.float64)
    assert "_LowRankLinearBackward" in _graph_names(_dora_linear()(x))
    model = _dora_linear(dropout=0.3)
    assert "_LowRankLinearBackward" not in _graph_names(model(x))
    assert "_LowRankLinearBackward" in _graph_names(model.eval()(x))  # dropout is off in eval mode


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("layer", ["linear", "gpt2_conv1d"])
def test_fused_and_generic_paths_agree(layer, detach_norm, bias):
    torch.manual_seed(0)
    base = Wrapper(nn.Linear(7, 5, bias=bias) if layer == "linear" else Conv1D(5, 7)).double()
    fused = copy.deepcopy(base)
    dorafit.apply(fused, dorafit.AdapterConfig(method="dora", r=2, alpha=3, targets=["layer"], detach_norm=detach_norm))
    randomize_adapter(fused)
    generic = copy.deepcopy(fused)
    ops = generic.layer.dorafit.ops
    ops.low_rank = LayerOps.low_rank.__get__(ops)  # this layer only: the generic composition
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=_gen(1))
    y_fused, y_generic = fused(x), generic(x)
    assert "_LowRankLinearBackward" in _graph_names(y_fused)
    assert "_LowRankLinearBackward" not in _graph_names(y_generic)
    torch.testing.assert_close(y_fused, y_generic, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(y_fused.shape, dtype=torch.float64, generator=_gen(2))
    (y_fused * upstream).sum().backward()
    (y_generic * upstream).sum().backward()
    for (name, a), b in zip(fused.named_parameters(), generic.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_second_derivatives_raise_instead_of_being_silently_wrong():
    """Both autograd functions save intermediates, so double backward is refused, not answered wrongly."""
    model = _dora_linear()
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_inplace_magnitude_scale_equals_out_of_place(channel_dim):
    g = _gen()
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    out = x.shape[channel_dim]
    m = (torch.rand(out, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    n = (torch.rand(out, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    results = []
    for inplace in (False, True):
        pre = x * 2.0  # a fresh tensor that nothing saved
        y = magnitude_scale(pre, m, n, None, channel_dim, inplace=inplace)
        assert (y.data_ptr() == pre.data_ptr()) == inplace
        results.append((y, *torch.autograd.grad(y.pow(2).sum(), (x, m, n))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_inplace_magnitude_scale_is_caught_when_its_input_was_saved():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    pre = x.exp()  # exp saves its output for backward
    y = magnitude_scale(pre, torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), None, -1, True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_with_bias_saves_its_output_unless_half_precision(dtype):
    """float32: backward works from y (shared with whatever the next op saves); bf16: from pre (exact)."""
    from dorafit.bench.measure import SavedTensorCounter, model_storages

    torch.manual_seed(0)
    model = Wrapper(nn.Linear(8, 6)).to(dtype)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["layer"]))
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    with SavedTensorCounter(exclude=model_storages(model)) as counter:
        y = model(x)
    assert (y.untyped_storage().data_ptr() in counter.storages) == (dtype == torch.float32)


def test_float32_magnitude_gradient_with_a_large_bias_matches_float64():
    """Recovering sum(g * pre) from y and b stays accurate when the bias dwarfs the output (|b| ~ 100 |y - b|)."""
    torch.manual_seed(0)
    model64 = Wrapper(nn.Linear(16, 12)).double()
    with torch.no_grad():
        model64.layer.bias.normal_(0, 100.0)
    dorafit.apply(model64, dorafit.AdapterConfig(method="dora", r=4, targets=["layer"], detach_norm=False))
    randomize_adapter(model64)
    model32 = copy.deepcopy(model64).float()
    x = torch.randn(64, 16, dtype=torch.float64, generator=_gen(3))
    upstream = torch.randn(64, 12, dtype=torch.float64, generator=_gen(4))
    grads = []
    for model, dtype in ((model64, torch.float64), (model32, torch.float32)):
        (model(x.to(dtype)) * upstream.to(dtype)).sum().backward()
        grads.append((model.layer.magnitude.grad.double(), model.layer.lora_B.grad.double()))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ---- no [out, in]-sized temporary ------------------------------------------------------------------------
class _NewTensorSizes(TorchDispatchMode):
    """Records (op, shape) of every op output that does not share storage with an input (a new tensor)."""

    def __init__(self):
        super().__init__()
        self.new: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in inputs:
                self.new.append((str(func), tuple(t.shape)))
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


# weight numel differs from every activation's: linear 40x48 vs tokens 15 x {40, 48}; conv 10x6x3x3 vs inputs
# [2, 6, 5, 5] and outputs [2, 10, 5, 5]; embedding 50x12 vs outputs [3, 5, 12]
SIZED_LAYERS = {
    "linear": (lambda: nn.Linear(48, 40), lambda g: torch.randn(3, 5, 48, generator=g)),
    "linear_dropout": (lambda: nn.Linear(48, 40), lambda g: torch.randn(3, 5, 48, generator=g)),
    "gpt2_conv1d": (lambda: Conv1D(40, 48), lambda g: torch.randn(3, 5, 48, generator=g)),
    "conv2d": (lambda: nn.Conv2d(6, 10, 3, padding=1), lambda g: torch.randn(2, 6, 5, 5, generator=g)),
    "embedding": (lambda: nn.Embedding(50, 12), lambda g: torch.randint(0, 50, (3, 5), generator=g)),
}


def _training_step_new_tensors(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(x).pow(2).sum().backward()  # first step: AdamW allocates its state
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with _NewTensorSizes() as mode:
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return mode.new


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("layer", list(SIZED_LAYERS))
def test_dora_training_step_creates_no_weight_sized_temporary(layer, detach_norm):
    make, make_input = SIZED_LAYERS[layer]
    torch.manual_seed(0)
    model = Wrapper(make())
    dropout = 0.1 if layer == "linear_dropout" else 0.0
    cfg = dorafit.AdapterConfig(method="dora", r=2, targets=["layer"], dropout=dropout, detach_norm=detach_norm)
    dorafit.apply(model, cfg)
    randomize_adapter(model)
    weight_numel = model.layer.weight.numel()
    new = _training_step_new_tensors(model, make_input(_gen(1)))
    assert new, "the recorder saw no op"
    offending = [(op, shape) for op, shape in new if torch.Size(shape).numel() == weight_numel]
    assert not offending, f"DoRA made weight-sized temporaries: {offending}"


def test_weight_sized_temporary_detector_catches_a_dense_dora():
    """Control: PEFT's DoRA builds the dense update B A and its norm, and the recorder sees it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Wrapper(nn.Linear(48, 40)), LoraConfig(r=2, target_modules=["layer"], use_dora=True))
    new = _training_step_new_tensors(model, torch.randn(3, 5, 48, generator=_gen(1)))
    assert any(torch.Size(shape).numel() == 48 * 40 for _, shape in new)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_inference_paths_equal_the_autograd_functions_bit_for_bit(with_bias, inplace):
    """Without grad mode, low_rank_linear and magnitude_scale skip their autograd functions: same operations,
    same bits (float32, where a different order of operations would show)."""
    g = _gen(3)
    x = torch.randn(4, 1, 64, generator=g)
    w0, p, q = torch.randn(48, 64, generator=g), torch.randn(48, 4, generator=g), torch.randn(4, 64, generator=g)
    b = torch.randn(48, generator=g) if with_bias else None
    m, n = torch.rand(48, generator=g) + 0.5, torch.rand(48, generator=g) + 0.5
    results = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            qq = q.clone().requires_grad_(grad)  # with grad: through the autograd functions
            pre = low_rank_linear(x, w0, p, qq, None)
            y = magnitude_scale(pre, m, n, b, -1, inplace=inplace)
            assert (y.data_ptr() == pre.data_ptr()) == inplace
            results.append((pre.detach(), y.detach()))
    for with_grad, without in zip(*results):
        assert torch.equal(with_grad, without)
