"""torch.compile: DoRA, DVoRA and magnitude-only layers trace as ONE graph (no break, no recompilation per
layer), match eager in outputs and gradients, and their cached norms follow optimizer steps and in-place writes.

These run Dynamo and AOTAutograd (backend "aot_eager": the graph that Inductor would get, executed by eager
kernels, so the test stays fast); tests/test_compile_inductor.py runs Inductor itself on a small model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dorafit

from .conftest import randomize_adapter

# (adapter config, dtype): full DoRA (embedding included) with magnitude-only elsewhere; DVoRA with the exact norm
# gradient and the recomputed magnitude gradient (compiled: each layer a checkpointed region)
CASES = {
    "dora_and_magnitude_only": (
        dict(method="dora", r=2, alpha=4.0, targets=["embed_tokens", "q_proj", "k_proj", "v_proj"],
             magnitude_only=["o_proj", "gate_proj", "up_proj", "down_proj"]),
        torch.float64,
    ),
    "dvora": (
        dict(method="dvora", r=4, targets=["q_proj", "v_proj", "up_proj", "down_proj"], detach_norm=False,
             magnitude_grad="recompute"),
        torch.float32,
    ),
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def tiny_llama(case: str) -> LlamaForCausalLM:
    kw, dtype = CASES[case]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32, max_position_embeddings=16, use_cache=False)
    model = LlamaForCausalLM(config).to(dtype)
    dorafit.apply(model, dorafit.AdapterConfig(**kw))
    randomize_adapter(model)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("case", list(CASES))
def test_one_graph_without_breaks_in_training_and_eval(case):
    model, ids = tiny_llama(case), _ids()
    torch._dynamo.reset()
    model.train()
    train = torch._dynamo.explain(_loss)(model, ids)
    model.eval()
    with torch.no_grad():
        evaluation = torch._dynamo.explain(_loss)(model, ids)
    for what, ex in (("training", train), ("eval", evaluation)):
        reasons = [b.reason for b in ex.break_reasons]
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), f"{what}: {reasons}"


def _set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _optimizer_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    _set_grads(model, 5)
    torch.optim.SGD(params, lr=0.2).step()
    for p in params:
        p.grad = None


def _write_update(model):
    with torch.no_grad():
        for _, layer in dorafit.adapted_modules(model):
            for name in ("lora_B", "vera_lambda_b"):
                if hasattr(layer, name):
                    getattr(layer, name).add_(0.3)


def _write_magnitude(model):
    with torch.no_grad():
        for _, layer in dorafit.adapted_modules(model):
            layer.magnitude.mul_(1.5)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_eager_and_caches_follow_updates(case):
    model, ids = tiny_llama(case), _ids()
    tol = TOL[CASES[case][1]]
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    # training: loss and every gradient, before and after an optimizer step (which writes every adapter tensor
    # in place) without recompiling
    for step in range(2):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss = _loss(compiled, ids)
            loss.backward()
        torch.testing.assert_close(loss, _loss(eager, ids), **tol)
        _loss(eager, ids).backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, **tol, msg=f"step {step}: {name}")
        _optimizer_step(model), _optimizer_step(eager)

    # eval: outputs; then the cached norms after an optimizer step and in-place writes, with no recompilation
    model.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager(input_ids=ids).logits, **tol)
        with torch._dynamo.config.patch(error_on_recompile=True):
            before = eager(input_ids=ids).logits
            for change in (_optimizer_step, _write_update, _write_magnitude):
                change(model), change(eager)
                fresh = copy.deepcopy(eager)  # a copy starts with empty caches
                expected = fresh(input_ids=ids).logits
                assert not torch.allclose(expected, before), f"{change.__name__} must change the output"
                torch.testing.assert_close(eager(input_ids=ids).logits, expected, **tol, msg=change.__name__)
                torch.testing.assert_close(compiled(input_ids=ids).logits, expected, **tol, msg=change.__name__)
                before = expected
            # another model of the same architecture runs the same compiled graph (the caches are its inputs)
            again = torch.compile(fresh, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(again(input_ids=ids).logits, expected, **tol)

