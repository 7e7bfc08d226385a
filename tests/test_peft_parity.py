"""Parity with the PEFT library: the same tensors give the same outputs and gradients (float64).

The tensors are copied by hand here (not through dorafit.peft_format), so these tests check the core's math
against PEFT's independently of the format converter. Dropout is 0; every layer has a bias, B is non-zero,
alpha != r, and DoRA's magnitude is moved away from ||W0||.

PEFT's DoRA always detaches the norm (paper section 4.3), so it is compared with dorafit's default
``detach_norm=True``. PEFT's conv LoRA applies lora_A without the layer's dilation, so the conv layers here use
dilation 1. Embeddings have no ``padding_idx``: dorafit's outputs at ``padding_idx`` pass no gradient (as in
``nn.Embedding``), PEFT's adapter outputs there do, so the two differ there by design.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import dorafit

from .conftest import Wrapper, randomize_adapter

LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), lambda g: torch.randn(2, 3, 7, generator=g, dtype=torch.float64)),
    "conv2d": (
        lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
        lambda g: torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64),
    ),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda g: torch.randn(2, 4, 9, generator=g, dtype=torch.float64)),
    "embedding": (lambda: nn.Embedding(11, 6), lambda g: torch.randint(0, 11, (2, 5), generator=g)),
    "gpt2_conv1d": (lambda: Conv1D(5, 7), lambda g: torch.randn(2, 3, 7, generator=g, dtype=torch.float64)),
}
METHODS = {
    "lora": dict(method="lora", r=2, alpha=5.0),
    "rslora": dict(method="lora", r=2, alpha=5.0, rslora=True),
    "dora": dict(method="dora", r=2, alpha=5.0),
}


def _base(make) -> Wrapper:
    torch.manual_seed(0)
    base = Wrapper(make()).double()
    if getattr(base.layer, "bias", None) is not None:
        with torch.no_grad():
            base.layer.bias.normal_()
    return base


def _peft_lora_tensors(peft_layer, is_embedding: bool):
    """PEFT's (A, B, magnitude-or-None) parameters of the 'default' adapter."""
    if is_embedding:
        a, b = peft_layer.lora_embedding_A["default"], peft_layer.lora_embedding_B["default"]
    else:
        a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    magnitudes = peft_layer.lora_magnitude_vector
    return a, b, magnitudes["default"].weight if "default" in magnitudes else None


def _grads(model, x, params, upstream=None):
    y = model(x)
    if upstream is None:
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    return y, torch.autograd.grad((y * upstream).sum(), params)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_lora_dora_outputs_and_gradients_match_peft(layer_name, method):
    make, make_input = LAYERS[layer_name]
    base = _base(make)
    ours = copy.deepcopy(base)
    kw = METHODS[method]
    dorafit.apply(ours, dorafit.AdapterConfig(**kw, targets=["layer"]))
    randomize_adapter(ours)
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], use_rslora=kw.get("rslora", False),
                   use_dora=kw["method"] == "dora", target_modules=["layer"], lora_dropout=0.0,
                   fan_in_fan_out=layer_name == "gpt2_conv1d"),
    ).double()
    layer = ours.layer
    a, b, magnitude = _peft_lora_tensors(theirs.base_model.model.layer, layer_name == "embedding")
    with torch.no_grad():  # copy dorafit's tensors into PEFT's
        a.copy_(layer.lora_A)
        b.copy_(layer.lora_B)
        if magnitude is not None:
            magnitude.copy_(layer.magnitude.view_as(magnitude))  # conv: PEFT keeps [1, out, 1, ...]
    assert (magnitude is not None) == (method == "dora")

    x = make_input(torch.Generator().manual_seed(2))
    ours_params = [layer.lora_A, layer.lora_B] + ([layer.magnitude] if magnitude is not None else [])
    theirs_params = [a, b] + ([magnitude] if magnitude is not None else [])
    y, grads = _grads(ours, x, ours_params)
    y_peft, grads_peft = _grads(theirs, x, theirs_params)
    torch.testing.assert_close(y, y_peft, rtol=1e-10, atol=1e-12)
    for name, g, g_peft in zip(("A", "B", "magnitude"), grads, grads_peft):
        assert g.abs().sum() > 0, f"gradient of {name} is zero: the comparison would be vacuous"
        torch.testing.assert_close(g, g_peft.view_as(g), rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


class TwoShapes(nn.Module):
    """Three layers, two weight shapes (one a GPT-2 Conv1D): PEFT slices its one pair, dorafit has one per shape."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 9)
        self.mid = Conv1D(9, 9)  # [in, out] = [9, 9]
        self.down = nn.Linear(9, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set")  # PEFT flips its one flag per layer type
def test_vera_outputs_and_gradients_match_peft():
    torch.manual_seed(0)
    base = TwoShapes().double()
    with torch.no_grad():
        for m in base.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_()
    theirs = get_peft_model(copy.deepcopy(base), VeraConfig(r=3, target_modules=["up", "mid", "down"])).double()
    ours = copy.deepcopy(base)
    dorafit.apply(ours, dorafit.AdapterConfig(method="vera", r=3, targets=["up", "mid", "down"]))
    randomize_adapter(ours)  # non-zero lambda_b, lambda_d away from 0.1
    shared_a = theirs.base_model.vera_A["default"]  # [r, max_in]
    shared_b = theirs.base_model.vera_B["default"]  # [max_out, r]
    ours_params, theirs_params = [], []
    for name, layer in dorafit.adapted_modules(ours):
        peft_layer = getattr(theirs.base_model.model, name)
        out, inp = layer.dorafit.ops.weight_matrix(layer).shape
        layer.vera_A = shared_a[:, :inp].clone()  # PEFT's slices, given to dorafit
        layer.vera_B = shared_b[:out, :].clone()
        with torch.no_grad():
            peft_layer.vera_lambda_d["default"].copy_(layer.vera_lambda_d)
            peft_layer.vera_lambda_b["default"].copy_(layer.vera_lambda_b)
        ours_params += [layer.vera_lambda_d, layer.vera_lambda_b]
        theirs_params += [peft_layer.vera_lambda_d["default"], peft_layer.vera_lambda_b["default"]]

    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y, grads = _grads(ours, x, ours_params)
    y_peft, grads_peft = _grads(theirs, x, theirs_params)
    torch.testing.assert_close(y, y_peft, rtol=1e-10, atol=1e-12)
    for g, g_peft in zip(grads, grads_peft):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, g_peft, rtol=1e-9, atol=1e-11)
