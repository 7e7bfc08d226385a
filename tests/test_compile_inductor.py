"""torch.compile with Inductor (the default backend) on a small model: a DoRA layer with a bias and a
magnitude-only layer give eager's outputs and gradients, in one graph, and the compiled eval forward sees an
in-place write to lora_B (the cached norm is looked up at run time, not baked into the graph)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import dorafit

from .conftest import randomize_adapter

TOL = dict(rtol=1e-5, atol=1e-6)


def test_inductor_matches_eager_in_training_and_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4))
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["0"], magnitude_only=["2"]))
    randomize_adapter(model)
    eager = copy.deepcopy(model)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)

    compiled(x).pow(2).sum().backward()
    eager(x).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)

    model.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **TOL)
        with torch._dynamo.config.patch(error_on_recompile=True):
            model[0].lora_B.add_(0.5), eager[0].lora_B.add_(0.5)
            fresh = copy.deepcopy(eager)(x)  # a copy starts with empty caches
            torch.testing.assert_close(compiled(x), fresh, **TOL)
