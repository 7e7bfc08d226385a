"""Greedy generation speed on the LLaMA-shaped workload: unmerged adapters against the merged model.

Each variant generates ``new_tokens`` tokens (exactly: ``min_new_tokens`` = ``max_new_tokens``) greedily after the
same random prompt batch, with transformers' ``generate`` and its KV cache; the time of one such call is
measured interleaved across variants (:func:`dorafit.bench.measure.interleaved_times`), and tokens/s is
``batch * new_tokens / time``. Variants:

    dora_merged  dorafit DoRA merged into its own copy of the weights (what a plain model costs)
    dora, lora   dorafit, unmerged, eval mode: DoRA's norm vector is cached, so a token costs the base layer, the
                 low-rank product and one per-unit scale
    peft_dora    PEFT's DoRA, unmerged, its defaults (it recomputes the dense weight norm on every forward unless
                 ``peft.tuners.lora.dora.ENABLE_DORA_CACHING`` is set)

The variants' adapters are the same random non-zero update (B and m perturbed from their init with one seed),
so a greedy generation is a real test: ``same_tokens_as_merged`` records that unmerged DoRA wrote exactly the
merged model's tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

from .measure import interleaved_times, median_ms
from .models import Workload, build_variant

GENERATION_VARIANTS = ("dora_merged", "dora", "lora", "peft_dora")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """A non-zero update, identical in every variant: every lora_B ~ 0.01 N(0, 1) and the magnitudes x (1 + 0.1 U),
    drawn in the order of the parameters' names (dorafit's and PEFT's layers sort alike: per module, A, B, m)."""
    g = torch.Generator().manual_seed(seed)
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    for name, p in named:
        if "lora_B" in name:
            p.copy_(0.01 * torch.randn(p.shape, generator=g).to(p))
        elif "magnitude" in name:
            p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g).to(p))


def _variant(workload: Workload, name: str) -> torch.nn.Module:
    """The variant with the shared perturbation applied before merging (dora_merged is dora, then merged)."""
    import dorafit

    torch.manual_seed(workload.spec.seed)  # the same lora_A in every variant built from dorafit
    if name == "dora_merged":
        model = build_variant(workload, "dora", own_weights=True)
        perturb(model, workload.spec.seed)
        dorafit.merge(model)
    else:
        model = build_variant(workload, name)
        perturb(model, workload.spec.seed)
    return model.eval()


def run_generation(workload: Workload, warmup: int, repeats: int, log: Callable, variants: tuple[str, ...] | None,
                   batch: int = 1, prompt: int = 64, new_tokens: int = 32) -> dict:
    """Per variant: median time of one generate call, tokens/s, and (DoRA) whether its tokens equal the merged's."""
    names = [v for v in GENERATION_VARIANTS
             if variants is None or v == "dora_merged" or v in variants]
    models = {name: _variant(workload, name) for name in names}
    vocab = workload.base.config.vocab_size
    g = torch.Generator().manual_seed(workload.spec.seed + 2)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(workload.spec.device)
    mask = torch.ones_like(ids)

    def generate(model) -> Callable[[], torch.Tensor]:
        def run():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        return run

    log(f"  timing greedy generation of {new_tokens} tokens after {batch} x {prompt}: {len(models)} variants, "
        f"{warmup} warm-up + {repeats} timed rounds")
    tokens = {name: generate(m)() for name, m in models.items()}
    times = interleaved_times({n: generate(m) for n, m in models.items()}, warmup, repeats, workload.spec.device)
    out = {}
    for name, seconds in times.items():
        ms = median_ms(seconds)
        out[name] = {"gen_ms": ms, "gen_ms_all": [1e3 * s for s in seconds],
                     "tokens_per_s": batch * new_tokens / (ms / 1e3), "batch": batch, "prompt": prompt,
                     "new_tokens": new_tokens}
        if name != "dora_merged" and name.endswith("dora"):
            out[name]["same_tokens_as_merged"] = bool(torch.equal(tokens[name], tokens["dora_merged"]))
    return out
