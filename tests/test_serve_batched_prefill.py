"""The engine's batched prefill: waiting prompts with next chunks of about one length are prefilled in one forward
(rows with mixed adapters, of different lengths padded, some already part-prefilled), and every request still gets
the tokens it gets alone, on a tiny LLaMA with DoRA and LoRA adapters and on a tiny Gemma-3 with sliding-window
layers (window 4)."""

from __future__ import annotations

import pytest
import torch

MAX_TOKENS = 5


class _Ids:
    """A tokenizer stand-in for the engine (it decodes only for stop strings; none here)."""

    eos_token_id = pad_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def llama_with_adapters():
    import transformers

    import dorafit

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, targets=["q_proj", "v_proj", "down_proj"]),
                  name="dora")
    dorafit.apply(model, dorafit.AdapterConfig(method="lora", r=2, alpha=4, targets=["k_proj", "up_proj"]),
                  name="lora")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.3)
    dorafit.set_adapter(model, None)
    return model.requires_grad_(False), ["dora", None, "lora"]


def gemma3_sliding():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=256, pad_token_id=0)
    return Gemma3ForCausalLM(config).eval().requires_grad_(False), [None]


def alone(model, prompt: list[int], adapter: str | None) -> list[int]:
    import dorafit

    if adapter is not None or dorafit.adapter_names(model):
        dorafit.set_adapter(model, adapter)
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    return ids[0, len(prompt):].tolist()


def recorded(engine) -> list[list[tuple[int, int]]]:
    """Each batched prefill's rows as (tokens prefilled before, prompt tokens), recorded as the engine runs."""
    engine.stops = set()
    together = []
    prefill_together = engine._prefill_together
    engine._prefill_together = lambda rows: (together.append([(r.done, len(r.request.prompt)) for r in rows]),
                                             prefill_together(rows))[1]
    return together


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_prompts_prefilled_together_get_the_tokens_they_get_alone(kind):
    from dorafit.generation import SamplingOptions
    from dorafit.serving.engine import Engine, Request

    model, adapters = llama_with_adapters() if kind == "llama" else gemma3_sliding()
    engine = Engine(model, _Ids(), max_batch_size=8, prefill_chunk=8)
    together = recorded(engine)
    g = torch.Generator().manual_seed(1)

    def request(n: int, i: int) -> Request:
        return Request(torch.randint(1, 300, (n,), generator=g).tolist(), adapters[i % len(adapters)],
                       SamplingOptions(max_new_tokens=MAX_TOKENS))

    got: dict[int, list] = {}

    def submit(r: Request) -> None:
        got[r.id] = []
        r.on_token = lambda token, reason, out=got[r.id]: out.append(token if reason is None else reason)
        engine.submit(r)

    # a long prompt first (chunks of 8), then, once its first chunk is in, short ones: its last 2 tokens share a
    # forward with all the fresh prompts, padded to 7 tokens (29 padding tokens for 7 added rows)
    first = [request(10, 0)]
    later = [request(n, i) for i, n in enumerate([3, 2, 4, 3, 2, 4, 7], start=1)]
    submit(first[0])
    engine.run(until=lambda: bool(engine.prefilling) and engine.prefilling[0].done == 8)
    for r in later:
        submit(r)
    engine.run(until=lambda: all(len(out) == MAX_TOKENS + 1 for out in got.values()))
    for r in first + later:
        assert got[r.id] == [*alone(model, r.prompt, r.adapter), "length"], (kind, len(r.prompt), r.adapter)
    assert together == [[(8, 10), (0, 2), (0, 2), (0, 3), (0, 3), (0, 4), (0, 4), (0, 7)]]
    assert engine.peak_batch > 1


def test_a_step_prefills_within_prefill_chunk_tokens_while_requests_decode():
    """With no request decoding, one step prefills every waiting prompt of one length (within 512 tokens); while
    requests decode, it stays within prefill_chunk tokens, as one prompt's chunk did."""
    from dorafit.generation import SamplingOptions
    from dorafit.serving.engine import Engine, Request

    model, adapters = llama_with_adapters()
    engine = Engine(model, _Ids(), max_batch_size=8, prefill_chunk=8)
    together = recorded(engine)
    prompts = [[i + 1, i + 2, i + 3, i + 4] for i in range(7)]
    ended = []
    requests = [Request(p, adapters[i % 3], SamplingOptions(max_new_tokens=MAX_TOKENS),
                        on_token=lambda token, reason: ended.append(reason) if reason else None)
                for i, p in enumerate(prompts)]
    for r in requests[:4]:
        engine.submit(r)
    engine.run(until=lambda: bool(engine.active))
    assert together == [[(0, 4)] * 4] and len(engine.active) == 4  # 16 tokens in one step: none was decoding
    for r in requests[4:]:
        engine.submit(r)
    engine.run(until=lambda: len(ended) == len(requests))
    assert together[1:] == [[(0, 4)] * 2]  # then 8 tokens (two prompts), and the last prompt alone
    assert all(r.error is None for r in requests)


def test_a_short_prompt_does_not_wait_for_a_long_prompts_chunk():
    """A short prompt that arrives while a long one is prefilled is prefilled alone, first (as before batched
    prefill), not padded to the long prompt's next chunk: its first token comes after a forward of its own size."""
    from dorafit.generation import SamplingOptions
    from dorafit.serving.engine import Engine, Request

    model, _ = llama_with_adapters()
    engine = Engine(model, _Ids(), max_batch_size=8, prefill_chunk=8)
    together = recorded(engine)
    long = Request(list(range(1, 21)), "dora", SamplingOptions(max_new_tokens=MAX_TOKENS))
    short = Request([5, 6, 7], "lora", SamplingOptions(max_new_tokens=MAX_TOKENS))
    got = {}
    for r in (long, short):
        got[r.id] = []
        r.on_token = lambda token, reason, out=got[r.id]: out.append(token if reason is None else reason)
    engine.submit(long)
    engine.run(until=lambda: bool(engine.prefilling) and engine.prefilling[0].done == 8)
    engine.submit(short)
    engine.run(until=lambda: len(got[short.id]) >= 1)
    assert [r.request for r in engine.prefilling] == [long] and engine.prefilling[0].done == 8  # not yet served
    engine.run(until=lambda: all(len(out) == MAX_TOKENS + 1 for out in got.values()))
    assert together == []
    for r in (long, short):
        assert got[r.id] == [*alone(model, r.prompt, r.adapter), "length"]


def test_a_failed_batched_prefill_prefills_each_row_alone_and_fails_only_the_culprit():
    from dorafit.generation import SamplingOptions
    from dorafit.serving.engine import Engine, Request

    model, _ = llama_with_adapters()
    engine = Engine(model, _Ids(), max_batch_size=4, prefill_chunk=8)
    engine.stops = set()
    forward = engine._forward

    def faulty(adapters, pack=False, **inputs):
        if "lora" in adapters:
            raise RuntimeError("the lora row fails")
        return forward(adapters, pack, **inputs)

    engine._forward = faulty
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    requests = [Request(p, a, SamplingOptions(max_new_tokens=MAX_TOKENS)) for p, a in zip(prompts, ["dora", "lora",
                                                                                                      None])]
    got: dict[int, list] = {}
    for r in requests:
        got[r.id] = []
        r.on_token = lambda token, reason, out=got[r.id]: out.append(token if reason is None else reason)
        engine.submit(r)
    engine.run(until=lambda: all(out and out[-1] in ("length", "error") for out in got.values()))
    assert got[requests[1].id] == ["error"] and "the lora row fails" in requests[1].error
    for r in (requests[0], requests[2]):  # the dora row shared the failed forward, then was prefilled alone
        assert got[r.id] == [*alone(model, r.prompt, r.adapter), "length"]


def test_row_cache_of_rows_right_aligns_and_leaves_the_caches_unchanged():
    from dorafit.serving.kv import RowCache

    def cache(length: int, value: float) -> RowCache:
        c = RowCache(2)
        if length:
            for layer in c.layers:
                kv = torch.full((1, 2, length, 3), value)
                layer.update(kv, kv + 100)
        return c

    parts = [cache(3, 1.0), cache(0, 0.0), cache(5, 2.0)]
    joined = RowCache.of_rows(parts)
    assert joined.length == 5 and joined.starts == [2, 5, 0]
    mask = joined.attention_mask(2, "cpu")
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [0] * 5 + [1, 1], [1] * 7]
    keys = joined.layers[1].keys[:, 0, :5, 0]
    assert keys.tolist() == [[0, 0, 1, 1, 1], [0] * 5, [2] * 5]
    assert torch.equal(joined.layers[0].values[2, :, :5], parts[2].layers[0].values[0, :, :5])
    assert [p.length for p in parts] == [3, 0, 5] and joined.copy_rows([0]).starts == [0]
    assert RowCache.of_rows([cache(0, 0.0), cache(0, 0.0)]).starts == [0, 0]


def test_prefill_chunk_defaults_by_device():
    from dorafit.serving.engine import Engine, default_prefill_chunk

    model = llama_with_adapters()[0]
    assert Engine(model, _Ids()).prefill_chunk == 64  # a CPU: a new request waits at most a 64-token chunk
    assert Engine(model, _Ids(), prefill_chunk=300).prefill_chunk == 300
    assert default_prefill_chunk(torch.device("cuda")) == 512 and default_prefill_chunk(torch.device("cpu")) == 64
