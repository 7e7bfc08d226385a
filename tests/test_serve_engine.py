"""``dorafit serve``'s engine on each KV-cache kind: live servers on 127.0.0.1 over a tiny LLaMA (GQA) with a DoRA
adapter and a tiny Gemma-3 text model (sliding window 4, sliding and full layers), prefilling in chunks of 8.

Long requests (past the window and the chunk) batched with short ones of other lengths each get what they get
alone (transformers' ``generate`` with its own caches); log-probabilities equal ``log_softmax`` computed in this
process; echo, token-id and list prompts; lm-evaluation-harness's ``local-completions`` on a small multiple-choice
task scores what its in-process ``hf`` model scores; parameters that used to hang are answered; an engine error
fails only its request, with a 5xx; SIGTERM then stops each server with exit status 0 within seconds. In process,
Mistral, Gemma-2, Qwen3 and Phi-3 (sliding windows, q/k norms, fused projections) batched equal generating alone."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from .cli_support import chat_tokenizer, make_chat_llama
from .serve_support import start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MAX_TOKENS = 6
LENGTHS = [37, 3, 18, 9, 1, 26]  # prompt tokens: past the window (4) and the prefill chunk (8), and short ones
WINDOW = 4


def make_gemma3(folder: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = chat_tokenizer()
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Gemma3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_dora_adapter(base: Path, folder: Path) -> Path:
    """A DoRA adapter (r 4 on q, v, down) whose B and magnitudes are moved well off their init."""
    from transformers import AutoModelForCausalLM

    import dorafit

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            elif "magnitude" in name:
                p.mul_(1.5)
    dorafit.save_adapter(model, folder)
    return folder


def start_engine_server(base: Path, *options) -> tuple[subprocess.Popen, str]:
    return start_server("--model", base, "--port", 0, "--prefill-chunk", 8, "--shutdown-grace", 2, *options,
                        env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-engine")
    llama = make_chat_llama(root / "llama")
    adapter = make_dora_adapter(llama, root / "dora")
    gemma = make_gemma3(root / "gemma3")
    started = {"llama": start_engine_server(llama, "--adapter", f"dora={adapter}"),
               "gemma3": start_engine_server(gemma)}
    yield {"llama": {"dir": llama, "adapter": adapter, "url": started["llama"][1], "proc": started["llama"][0]},
           "gemma3": {"dir": gemma, "adapter": None, "url": started["gemma3"][1], "proc": started["gemma3"][0]}}
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()


def client(url: str):
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)


_MODELS = {}


def local_model(server: dict, adapter: bool):
    """The served model (with its adapter when asked) in this process, and its tokenizer."""
    key = (str(server["dir"]), adapter)
    if key not in _MODELS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import dorafit

        model = AutoModelForCausalLM.from_pretrained(server["dir"]).eval()
        if adapter:
            dorafit.load_adapter(model, server["adapter"])
            model.requires_grad_(False)
        _MODELS[key] = model, AutoTokenizer.from_pretrained(server["dir"])
    return _MODELS[key]


def prompts_of(lengths, vocab, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, vocab, (n,), generator=g).tolist() for n in lengths]  # past the special tokens


def post(url: str, path: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_long_requests_batched_with_short_ones_equal_each_alone(servers, kind):
    from dorafit.generation import SamplingOptions, generate_ids

    server = servers[kind]
    model, tok = local_model(server, adapter=False)
    prompts = prompts_of(LENGTHS, len(tok))
    api = client(server["url"])
    base = server["dir"].name

    def ask(prompt):
        return api.completions.create(model=base, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text

    steps_before = health(server["url"])["decode_steps"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers):
        alone = generate_ids(model, tok, [prompt], SamplingOptions(max_new_tokens=MAX_TOKENS))[0]
        assert answer == tok.decode(alone, skip_special_tokens=True), len(prompt)
    state = health(server["url"])
    assert state["status"] == "ok" and state["decode_steps"] > steps_before and state["peak_batch"] > 1


class _Ids:
    """A tokenizer stand-in for the engine (it decodes only for stop strings; none here)."""

    eos_token_id = pad_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


KINDS = {  # model class name, config class name, what is special about its attention
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": WINDOW}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"sliding_window": WINDOW, "head_dim": 8}),  # alternating
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 8}),  # q/k norms
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"sliding_window": WINDOW, "pad_token_id": 0}),  # fused qkv
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_engine_equals_generate_alone_on_other_model_kinds(kind):
    """In process, more cache kinds: mixed-length rows batched, prefilled in chunks of 5, equal generate alone."""
    import transformers

    from dorafit.generation import SamplingOptions
    from dorafit.serving.engine import Engine, Request

    model_cls, config_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=512, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    engine = Engine(model, _Ids(), max_batch_size=8, prefill_chunk=5)
    engine.stops = set()
    prompts = [torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (23, 3, 11, 1)]
    requests = [Request(p, None, SamplingOptions(max_new_tokens=MAX_TOKENS)) for p in prompts]
    got = {r.id: [] for r in requests}
    for r in requests:
        r.on_token = lambda token, reason, out=got[r.id]: out.append(token if reason is None else reason)
        engine.submit(r)
    engine.run(until=lambda: all(len(out) == MAX_TOKENS + 1 for out in got.values()))
    for r in requests:
        alone = model.generate(torch.tensor([r.prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        assert got[r.id] == [*alone[0, len(r.prompt):].tolist(), "length"], (kind, len(r.prompt))
    assert engine.peak_batch > 1


def test_logprobs_equal_log_softmax_with_the_adapter(servers):
    from dorafit.generation import SamplingOptions, generate_ids

    server = servers["llama"]
    model, tok = local_model(server, adapter=True)
    prompt = prompts_of([21], len(tok), seed=3)[0]
    api = client(server["url"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)

    scored = api.completions.create(model="dora", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) == len(lp.tokens)
    expected = [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], expected)) < 1e-4
    assert lp.top_logprobs[0] is None
    for i in (1, len(prompt) - 1):
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(
            logp[i - 1].topk(3).values.tolist(), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert scored.choices[0].text == tok.decode(prompt)  # echo, and max_tokens 0: nothing generated

    generated = api.completions.create(model="dora", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    values = generated.choices[0].logprobs.token_logprobs
    ids = generate_ids(model, tok, [prompt], SamplingOptions(max_new_tokens=4))[0]
    assert generated.choices[0].text == tok.decode(ids, skip_special_tokens=True)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), -1)
    expected = [full[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)]
    assert len(values) == len(ids) + (generated.choices[0].finish_reason == "stop")  # the stop token is listed
    assert max(abs(a - b) for a, b in zip(values, expected)) < 1e-4
    assert values[0] == pytest.approx(logp[-1].max().item(), abs=1e-4)  # greedy: the most likely token

    chat = api.chat.completions.create(model="dora", messages=[{"role": "user", "content": "red cat"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and len(content[0].top_logprobs) == 2
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-6)


def test_prompt_forms_give_one_choice_per_prompt(servers):
    server = servers["gemma3"]
    _, tok = local_model(server, adapter=False)
    api = client(server["url"])
    base = server["dir"].name
    texts = ["red cat dog", "green small bird"]
    ids = [tok(t)["input_ids"] for t in texts]

    def answer(prompt):
        return api.completions.create(model=base, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)

    alone = [answer(t).choices[0].text for t in texts]
    assert [answer(i).choices[0].text for i in ids] == alone  # a list of token ids is that prompt
    for prompts in (texts, ids):
        many = answer(prompts)
        assert [c.index for c in many.choices] == [0, 1] and [c.text for c in many.choices] == alone
    twice = api.completions.create(model=base, prompt=texts[0], max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.index for c in twice.choices] == [0, 1] and [c.text for c in twice.choices] == [alone[0]] * 2
    sampled = api.completions.create(model=base, prompt=texts[0], max_tokens=MAX_TOKENS, temperature=1, seed=7, n=3)
    each = [api.completions.create(model=base, prompt=texts[0], max_tokens=MAX_TOKENS, temperature=1, seed=7 + j)
            for j in range(3)]
    assert [c.text for c in sampled.choices] == [e.choices[0].text for e in each]  # choice j: seed + j, not n copies
    echoed = api.completions.create(model=base, prompt=texts[0], max_tokens=2, temperature=0, echo=True, logprobs=0)
    assert echoed.choices[0].text.startswith(texts[0])
    stopped = echoed.choices[0].finish_reason == "stop"  # then the stop token is listed too
    assert len(echoed.choices[0].logprobs.tokens) == len(ids[0]) + echoed.usage.completion_tokens + stopped
    status, body = post(server["url"], "/completions", {"model": base, "prompt": [10**9], "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "prompt"


def test_parameters_that_used_to_hang_are_answered(servers):
    server = servers["gemma3"]
    url, base = server["url"], server["dir"].name
    api = client(url)
    greedy = api.completions.create(model=base, prompt="red cat", max_tokens=MAX_TOKENS, temperature=0)
    tiny = api.completions.create(model=base, prompt="red cat", max_tokens=MAX_TOKENS, temperature=1e-45)
    assert tiny.choices[0].text == greedy.choices[0].text  # below the floor: greedy
    sampled = api.completions.create(model=base, prompt="red cat", max_tokens=3, temperature=1, seed=2**64 - 1)
    assert sampled.choices[0].finish_reason in ("stop", "length")
    for bad in ({"seed": 2**64, "temperature": 1}, {"seed": 10**30}):
        status, body = post(url, "/completions", {"model": base, "prompt": "red cat", "max_tokens": 2, **bad})
        assert status == 400 and body["error"]["param"] == "seed", body
    status, body = post(url, "/completions", b'{"model": "%s", "prompt": "red", "temperature": NaN}' % base.encode())
    assert status == 400 and "NaN" in body["error"]["message"], body  # refused as the JSON is read (serving/params)
    assert api.completions.create(model=base, prompt="dog", max_tokens=2, temperature=0).choices[0].text is not None
    assert health(url)["status"] == "ok"


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of the continuation's token log-probabilities after the context, tokenized as lm-eval's API models do
    (the whole text encoded without special tokens, the context's tokens cut off)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n, len(whole)))


def test_lm_eval_local_completions_gives_the_accuracy_computed_in_process(servers, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    server = servers["llama"]
    model, tok = local_model(server, adapter=True)
    rows = [("red cat", "dog bird runs"), ("big dog", "green small jumps"), ("blue bird", "sleeps red cat"),
            ("small cat", "runs big blue"), ("green runs", "bird dog sleeps"), ("dog jumps", "red green big")]
    docs = [{"question": f"{q}?", "choices": c.split(), "gold": i % 3} for i, (q, c) in enumerate(rows)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    result = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True, model_args=f"model=dora,base_url={server['url']}/completions,tokenizer={server['dir']},"
                                     "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1")
    scores = [[loglikelihood(model, tok, d["question"], " " + c) for c in d["choices"]] for d in docs]
    accuracy = sum(max(range(3), key=s.__getitem__) == d["gold"] for s, d in zip(scores, docs)) / len(docs)
    assert result["results"]["tiny_mc"]["acc,none"] == pytest.approx(accuracy)
    for sample in result["samples"]["tiny_mc"]:
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(scores[sample["doc_id"]], abs=1e-4)


def test_an_engine_error_fails_only_its_request_with_a_5xx(servers):
    """In-process: the served LLaMA, with the engine's forward made to fail on a marker token."""
    import uvicorn

    from dorafit.serving.api import create_app
    from dorafit.serving.load import build_served

    server = servers["llama"]
    served = build_served(str(server["dir"]), [], prefill_chunk=8)
    engine = served.engine
    marker, position = 1500, 30  # a prompt with the marker fails in prefill; a row decoding at the position fails
    forward = engine._forward
    decode_faults = []  # rows of each decode forward that failed

    def faulty(adapters, **inputs):
        if (inputs["input_ids"] == marker).any():
            raise RuntimeError("injected fault")
        if inputs["input_ids"].shape[1] == 1 and (inputs["position_ids"] == position).any():
            decode_faults.append(inputs["input_ids"].shape[0])
            raise RuntimeError("injected decode fault")
        return forward(adapters, **inputs)

    engine._forward = faulty
    web = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=web.run, daemon=True).start()
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while not web.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{web.servers[0].sockets[0].getsockname()[1]}/v1"
        api, base = client(url), server["dir"].name
        good = [1200, 1300, 1400, 1600, 1700]
        with ThreadPoolExecutor(3) as pool:
            fine = pool.submit(lambda: api.completions.create(model=base, prompt=good, max_tokens=MAX_TOKENS,
                                                              temperature=0))
            bad = pool.submit(lambda: post(url, "/completions", {"model": base, "prompt": good + [marker],
                                                                 "max_tokens": MAX_TOKENS}))
            stream = pool.submit(lambda: list(api.completions.create(model=base, prompt=[marker, 1200], stream=True,
                                                                     max_tokens=MAX_TOKENS)))
            status, body = bad.result()
            assert status == 500 and "injected fault" in body["error"]["message"]
            assert body["error"]["type"] == "server_error"
            with pytest.raises(openai.APIError, match="injected fault"):
                stream.result()
            assert fine.result().choices[0].finish_reason in ("stop", "length")
        state = json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30).read())
        assert state["status"] == "ok" and state["failed_requests"] == 2 and "injected fault" in state["last_error"]
        again = api.completions.create(model=base, prompt=good, max_tokens=2, temperature=0)
        assert again.choices[0].finish_reason in ("stop", "length")

        # in a batched decode step: the row that fails alone fails; the row beside it goes on, as it would alone
        long, short = prompts_of([position - 3], 5000, seed=7)[0], prompts_of([5], 5000, seed=8)[0]
        with ThreadPoolExecutor(2) as pool:
            beside = pool.submit(lambda: api.completions.create(model=base, prompt=short, max_tokens=12,
                                                                temperature=0, stop=None))
            failing = pool.submit(post, url, "/completions", {"model": base, "prompt": long, "max_tokens": 6,
                                                              "temperature": 0})
            status, body = failing.result()
            assert status == 500 and "injected decode fault" in body["error"]["message"]
            text = beside.result().choices[0].text
        assert decode_faults == [2, 1]  # the batched step, then that row alone
        assert text == api.completions.create(model=base, prompt=short, max_tokens=12, temperature=0).choices[0].text
    finally:
        web.should_exit = True
        engine.stop()


def test_sigterm_stops_each_server_promptly(servers):
    """Each with requests in flight, streamed and not, that may outlast the grace period (2 s): they end either
    finished or with an error saying the server is shutting down (503, or an error event), never cut silently."""
    for server in servers.values():
        with ThreadPoolExecutor(2) as pool:
            outcomes = [pool.submit(_outcome, server, stream) for stream in (False, True)]
            time.sleep(1)
            stop_server(server["proc"], within_s=15)
            for outcome in outcomes:
                assert outcome.result() in ("finished", "shutting down"), outcome.result()


def _outcome(server: dict, stream: bool) -> str:
    api, prompt = client(server["url"]), prompts_of([200], 5000)[0]
    try:
        answer = api.completions.create(model=server["dir"].name, prompt=prompt, max_tokens=300, temperature=0,
                                        stream=stream)
        if stream:
            list(answer)
    except openai.APIError as exc:
        return "shutting down" if "shutting down" in str(exc) else repr(exc)
    return "finished"


def test_packed_weights_give_the_default_engines_tokens():
    """``pack_weights`` (oneDNN products, packed weights): mixed-adapter, mixed-length rows batched give the tokens and
    (to rounding) the log-probabilities of the default engine; every linear product went through oneDNN."""
    import transformers

    import dorafit
    from dorafit.generation import SamplingOptions
    from dorafit.serving import packed
    from dorafit.serving.engine import Engine, Request

    if not packed.available():
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config).eval()
    for i in range(2):
        dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=4, targets=["q_proj", "v_proj", "down_proj"]),
                      name=f"a{i}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.2)
    dorafit.set_adapter(model, None)
    model.requires_grad_(False)
    prompts = [torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (23, 3, 11)]

    def generate(engine: Engine) -> list[Request]:
        engine.stops = set()
        requests = [Request(p, [None, "a0", "a1"][i], SamplingOptions(max_new_tokens=MAX_TOKENS), logprobs=2)
                    for i, p in enumerate(prompts)]
        ended = []
        for r in requests:
            r.on_token = lambda token, reason: ended.append(reason) if reason else None
            engine.submit(r)
        engine.run(until=lambda: len(ended) == len(requests))
        return requests

    calls = []
    pointwise = torch.ops.mkldnn._linear_pointwise

    def counted(*args):
        calls.append(args[1].shape)
        return pointwise(*args)

    default = generate(Engine(model, _Ids(), max_batch_size=3, prefill_chunk=5))
    engine = Engine(model, _Ids(), max_batch_size=3, prefill_chunk=5, pack_weights=True)
    torch.ops.mkldnn._linear_pointwise = counted
    try:
        with_packed = generate(engine)
    finally:
        torch.ops.mkldnn._linear_pointwise = pointwise
    for a, b in zip(default, with_packed):
        assert a.scored == b.scored and len(a.scored) == MAX_TOKENS
        torch.testing.assert_close(b.token_logprobs, a.token_logprobs, rtol=1e-4, atol=1e-4)
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]  # 7 per layer, the LM head
    assert len(engine.packed.packed) == len(linears) == 15 and engine.peak_batch > 1
    assert {tuple(shape) for shape in calls} == {tuple(w.shape) for w in linears}
