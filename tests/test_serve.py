"""``dorafit serve``: a live server on 127.0.0.1 with three adapters (DoRA, LoRA, VeRA; different targets) and the
base, queried with the official ``openai`` client: concurrent requests are batched and each answer equals
``dorafit generate`` with that adapter alone; streaming; errors with a 4xx and the server still up."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from .cli_support import assets, read_jsonl, run_cli  # noqa: F401 (fixture)
from .serve_support import start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

ADAPTERS = {
    "dora": ("--method", "dora", "--targets", "q_proj", "v_proj", "down_proj"),
    "lora": ("--method", "lora", "--targets", "k_proj", "up_proj"),
    "vera": ("--method", "vera", "--rank", 16, "--lr", 5e-2, "--targets", "q_proj", "o_proj"),
}
PROMPTS = ["red cat dog", "big bird runs", "green small", "sleeps jumps dog"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory, assets):  # noqa: F811
    root = tmp_path_factory.mktemp("serve")
    runs = {}
    for name, options in ADAPTERS.items():
        runs[name] = root / name
        code, _, err = run_cli("train", "--model", assets["chatml_llama"], "--task", assets["messages"], "--out",
                               runs[name], "--steps", 4, "--lr", 1e-2, "--batch-size", 8, "--seed", 1,
                               "--no-eval-before", "--eval-limit", 1, "--max-new-tokens", 2, *options)
        assert code == 0, err
    proc, url = start_server("--model", assets["chatml_llama"], "--port", 0, "--max-batch-size", 8,
                             *[a for name in runs for a in ("--adapter", f"{name}={runs[name]}")])
    yield {"url": url, "runs": runs, "base": assets["chatml_llama"].name, "base_dir": assets["chatml_llama"],
           "proc": proc, "root": root}
    stop_server(proc)


def client(server):
    return openai.OpenAI(base_url=server["url"], api_key="none", max_retries=0, timeout=60)


def generate_alone(server, source, prompts) -> list[str]:
    path = server["root"] / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    out = server["root"] / "generated.jsonl"
    code, _, err = run_cli("generate", source, "--prompts", path, "--out", out, "--max-new-tokens", MAX_TOKENS,
                           "--batch-size", 1)
    assert code == 0, err
    return [r["generated"] for r in read_jsonl(out)]


def test_models_lists_the_base_and_every_adapter(server):
    names = [m.id for m in client(server).models.list().data]
    assert names == [server["base"], "dora", "lora", "vera"]


def test_concurrent_mixed_adapter_requests_equal_each_adapter_alone(server):
    api = client(server)
    jobs = [(model, prompt) for model in [server["base"], "dora", "lora", "vera"] for prompt in PROMPTS[:2]]

    def ask(job):
        model, prompt = job
        answer = api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=MAX_TOKENS, temperature=0)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(jobs, pool.map(ask, jobs)))
    for model in [server["base"], "dora", "lora", "vera"]:
        source = server["base_dir"] if model == server["base"] else server["runs"][model]
        assert [answers[(model, p)] for p in PROMPTS[:2]] == generate_alone(server, source, PROMPTS[:2]), model
    assert len(set(answers.values())) > 2  # the adapters really differ
    health = json.loads(_get(server["url"].removesuffix("/v1") + "/health"))
    assert health["status"] == "ok" and health["decode_steps"] > 0
    assert health["peak_batch"] > 1  # requests that arrived together were generated together


def test_streaming_chunks_concatenate_to_the_answer(server):
    api = client(server)
    whole = api.chat.completions.create(model="dora", messages=[{"role": "user", "content": PROMPTS[2]}],
                                        max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content
    chunks = list(api.chat.completions.create(model="dora", messages=[{"role": "user", "content": PROMPTS[2]}],
                                              max_tokens=MAX_TOKENS, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole and chunks[-1].choices[0].finish_reason in ("stop", "length")
    completion = api.completions.create(model="lora", prompt="red cat", max_tokens=MAX_TOKENS, temperature=0)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="lora", prompt="red cat", max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert streamed == completion.choices[0].text and completion.usage.completion_tokens <= MAX_TOKENS


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server):
    api = client(server)
    with pytest.raises(openai.NotFoundError) as info:
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "The model 'nope' does not exist" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="dora", messages=[{"role": "user", "content": "hi"}], temperature=7)
    assert "'temperature' must be a number from 0 to 2.0" in str(info.value)
    with pytest.raises(openai.BadRequestError, match="context"):
        api.completions.create(model="lora", prompt="cat " * 600, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        api.chat.completions.create(model="dora", messages=[])
    assert json.loads(_get(server["url"].removesuffix("/v1") + "/health"))["status"] == "ok"
    assert api.completions.create(model="vera", prompt="dog", max_tokens=2, temperature=0).choices[0].text is not None


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()
