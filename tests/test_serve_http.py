"""``dorafit serve``'s HTTP layer on a live server on 127.0.0.1 started with an API key (from DORAFIT_API_KEY), a
small body limit and an adapter root: 401 / 413 unread / 415, path-free models, OpenAI error bodies everywhere,
every parameter honoured or refused by name, the usage chunk, the context budget, cancellation of a non-streamed
request whose client went away, and adapters loaded at run time (a DoRA run folder and a PEFT DoRA folder) whose
answers equal ``dorafit generate`` / PEFT's own model, with paths outside the root refused."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .cli_support import assets, fails, read_jsonl, run_cli  # noqa: F401 (fixture)
from .serve_support import start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "test-key-123"
MAX_BODY_MB = 0.05  # 52,428 bytes
MAX_TOKENS = 8
PROMPT = "red cat dog"


@pytest.fixture(scope="module")
def server(tmp_path_factory, assets):  # noqa: F811
    base = assets["chatml_llama"]
    outside = tmp_path_factory.mktemp("outside")
    root = tmp_path_factory.mktemp("adapters")
    code, _, err = run_cli("train", "--model", base, "--task", assets["messages"], "--out", root / "dora", "--steps",
                           4, "--lr", 1e-2, "--batch-size", 8, "--seed", 1, "--no-eval-before", "--eval-limit", 1,
                           "--max-new-tokens", 2, "--method", "dora", "--targets", "q_proj", "v_proj", "down_proj")
    assert code == 0, err
    make_peft_dora(base, root / "peft_dora")
    shutil.copytree(root / "peft_dora", outside / "peft_dora")
    (root / "empty").mkdir()
    shutil.copytree(root / "dora", root / "run_hop")  # a run folder whose adapter/ links to a folder under the
    shutil.rmtree(root / "run_hop" / "adapter")        # root whose files link outside: two hops
    (root / "run_hop" / "adapter").symlink_to(root / "file_out")
    (root / "link_out").symlink_to(outside / "peft_dora")  # a folder under the root that leads outside
    (root / "file_out").mkdir()
    for f in (outside / "peft_dora").iterdir():  # a folder whose files lead outside
        (root / "file_out" / f.name).symlink_to(f)
    proc, url = start_server("--model", base, "--port", 0, "--max-body-mb", MAX_BODY_MB, "--adapter-root", root,
                             env={"DORAFIT_API_KEY": KEY})
    yield {"url": url, "root": root, "outside": outside, "base": base.name, "base_dir": base, "proc": proc}
    stop_server(proc)


def make_peft_dora(base, folder):
    """A PEFT DoRA adapter of ``base`` with non-zero factors (so it changes the answers), saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def client(server, key=KEY):
    return openai.OpenAI(base_url=server["url"], api_key=key, max_retries=0, timeout=60)


def call(server, method, path, body=None, headers=None, key=KEY, raw: bytes | None = None):
    """(status, parsed JSON body) of one request."""
    url = server["url"].removesuffix("/v1") + path
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    head = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=head)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_openai_error(status_body, status, param=None, match=""):
    got, body = status_body
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param and re.search(match, body["error"]["message"]), body


def raw_exchange(server, head: bytes, parts: list[bytes]) -> bytes:
    """Send the request head and then ``parts`` one by one (stopping when the server has answered and closed);
    return the server's answer."""
    host, port = re.match(r"http://([\d.]+):(\d+)", server["url"]).groups()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for part in parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        while chunk := _recv(sock):
            answer += chunk
            if b"\r\n\r\n" in answer and b'"error"' in answer and answer.rstrip().endswith(b"}"):
                break
    return answer


def _recv(sock) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:  # the server closed with bytes of ours unread: what it sent was read before
        return b""


# ---- access control ---------------------------------------------------------------------------------------------
def test_api_key_is_required_on_every_v1_route(server):
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        client(server, "wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").completions.create(model=server["base"], prompt=PROMPT, max_tokens=2)
    assert_openai_error(call(server, "GET", "/v1/models", key=None), 401, match="no API key")
    assert_openai_error(call(server, "POST", "/v1/load_lora_adapter", {}, key=None), 401)
    assert_openai_error(call(server, "GET", "/v1/models", headers={"Authorization": f"Basic {KEY}"}, key=None), 401)
    assert call(server, "GET", "/health", key=None)[0] == 200  # a load balancer's check needs no key
    answer = client(server).completions.create(model=server["base"], prompt=PROMPT, max_tokens=2, temperature=0)
    assert answer.usage.completion_tokens >= 1


def test_non_json_bodies_are_refused_with_415(server):
    body = json.dumps({"model": server["base"], "prompt": PROMPT, "max_tokens": 2}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert_openai_error(call(server, "POST", "/v1/completions", raw=body, headers={"Content-Type": kind}), 415,
                            match="application/json")
    status, answer = call(server, "POST", "/v1/completions", raw=body,
                          headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200 and answer["choices"][0]["text"] is not None


def test_a_body_over_the_limit_gets_413_without_being_read(server):
    auth = f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
    # Content-Length says 100 MB; only 1 KB is ever sent, and the 413 still comes (nothing waits for the rest).
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 104857600\r\n\r\n"
    answer = raw_exchange(server, head, [b"{" + b" " * 1023])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than this server's limit of 0.05 MB" in answer
    # Chunked: no length given; refused once the bytes received pass the limit, the rest never sent.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (14000, b" " * 14000)
    answer = raw_exchange(server, head, [chunk] * 4)  # 56,000 bytes > 52,428, and no terminating chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert call(server, "GET", "/health")[1]["status"] == "ok"


# ---- models, routes, errors ---------------------------------------------------------------------------------------
def test_models_list_names_and_the_base_never_paths(server):
    status, listing = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in listing["data"]] == [server["base"]]
    status, card = call(server, "GET", f"/v1/models/{server['base']}")
    assert status == 200 and card["id"] == server["base"] and card["object"] == "model"
    assert_openai_error(call(server, "GET", "/v1/models/nope"), 404, "model", "does not exist")
    load(server, "dora_models", "dora")
    try:
        status, listing = call(server, "GET", "/v1/models")
        assert [m["id"] for m in listing["data"]] == [server["base"], "dora_models"]
        assert listing["data"][1]["parent"] == server["base"]
        text = json.dumps(listing) + json.dumps(call(server, "GET", "/v1/models/dora_models")[1])
        assert str(server["root"]) not in text and "/" not in text
    finally:
        unload(server, "dora_models")


def test_unknown_routes_and_wrong_methods_get_openai_error_bodies(server):
    assert_openai_error(call(server, "GET", "/v1/nope"), 404, match="no route GET /v1/nope")
    assert_openai_error(call(server, "GET", "/nope"), 404)
    assert_openai_error(call(server, "GET", "/v1/completions"), 405, match="GET is not allowed")
    assert_openai_error(call(server, "GET", "/docs"), 404)  # no interactive docs to expose


def test_every_unsupported_or_unknown_parameter_is_refused_by_name(server):
    chat = {"model": server["base"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"model": server["base"], "prompt": PROMPT, "max_tokens": 2}
    refused = [
        (chat, "frequency_penalty", 0.5), (chat, "presence_penalty", -1), (chat, "tools", [{"type": "function"}]),
        (chat, "tool_choice", "auto"), (chat, "response_format", {"type": "json_object"}),
        (chat, "logit_bias", {"5": 10}), (chat, "functions", [{"name": "f"}]), (chat, "store", True),
        (completion, "best_of", 3), (completion, "suffix", "end"), (completion, "logit_bias", {"5": 1}),
        (completion, "top_k", 5), (chat, "repetition_penalty", 1.1), (chat, "prompt", "x"),
    ]
    for body, name, value in refused:
        route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert_openai_error(call(server, "POST", route, {**body, name: value}), 400, name, f"'{name}'")
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "tools": [], "tool_choice": "none",
               "response_format": {"type": "text"}, "user": "u1", "metadata": {"a": "b"}, "top_p": None}
    assert call(server, "POST", "/v1/chat/completions", {**chat, **neutral})[0] == 200
    assert call(server, "POST", "/v1/completions", {**completion, "best_of": 1, "user": "u"})[0] == 200
    assert_openai_error(call(server, "POST", "/v1/completions", {**completion, "stream_options": {
        "include_usage": True}}), 400, "stream_options", "stream")


def test_nan_infinite_and_deeply_nested_json_get_400(server):
    base = json.dumps({"model": server["base"], "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    for number in ("NaN", "Infinity", "-Infinity", "1e999"):
        assert_openai_error(call(server, "POST", "/v1/completions", raw=base.replace('"temperature": 0',
                                 f'"temperature": {number}').encode()), 400, match="finite")
    nested = b'{"model": "x", "prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    assert_openai_error(call(server, "POST", "/v1/completions", raw=nested), 400, match="nested too deeply")
    assert_openai_error(call(server, "POST", "/v1/completions", raw=b"{not json"), 400, match="not valid JSON")
    assert_openai_error(call(server, "POST", "/v1/completions", raw=b"[1]"), 400, match="JSON object")
    assert call(server, "POST", "/v1/completions", json.loads(base))[0] == 200  # and the server is fine


def test_the_usage_chunk_of_stream_options_include_usage(server):
    api = client(server)
    whole = api.completions.create(model=server["base"], prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(api.completions.create(model=server["base"], prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    chat = list(api.chat.completions.create(model=server["base"], messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens >= 1
    plain = list(api.completions.create(model=server["base"], prompt=PROMPT, max_tokens=2, stream=True))
    assert all(c.choices for c in plain)  # no usage chunk unless asked for


def test_max_tokens_must_fit_the_context_and_the_default_is_capped(server):
    api = client(server)
    prompt = "cat " * 500  # about 500 of the 512 tokens of context
    with pytest.raises(openai.BadRequestError, match=r"leaves \d+ for the answer.*'max_tokens' asks for 100"):
        api.completions.create(model=server["base"], prompt=prompt, max_tokens=100)
    answer = api.completions.create(model=server["base"], prompt=prompt, temperature=0)  # default 256: capped
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= 512


# ---- cancellation -------------------------------------------------------------------------------------------------
def test_a_non_streamed_request_is_cancelled_when_its_client_disconnects(server):
    api = client(server)
    body = {"model": server["base"], "prompt": PROMPT, "max_tokens": 320, "temperature": 0}
    full = api.completions.create(**body)
    assert full.choices[0].finish_reason == "length"  # alone, it runs to its 320 tokens
    before = call(server, "GET", "/health")[1]["disconnected"]
    payload = json.dumps(body).encode()
    host, port = re.match(r"http://([\d.]+):(\d+)", server["url"]).groups()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(payload)
                     + payload)
        deadline = time.monotonic() + 60
        while call(server, "GET", "/health")[1]["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 60  # the client has gone: the server notices and the engine drops the row
    while (health := call(server, "GET", "/health")[1])["disconnected"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["disconnected"] == before + 1 and health["active"] == 0


# ---- adapters loaded at run time ------------------------------------------------------------------------------------
def load(server, name, path):
    status, answer = call(server, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    assert status == 200, answer
    return answer


def unload(server, name):
    status, answer = call(server, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
    assert status == 200 and answer["deleted"], answer


def test_run_time_adapters_answer_as_generate_and_peft_do(server):
    api = client(server)
    long = {"model": server["base"], "prompt": "green small", "max_tokens": 200, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:  # adapters are loaded while a request is being generated
        running = pool.submit(api.completions.create, **long)
        while call(server, "GET", "/health")[1]["active"] == 0 and not running.done():
            time.sleep(0.01)
        load(server, "dora", "dora")  # relative to the root
        load(server, "peft", server["root"] / "peft_dora")  # absolute, under the root
        assert running.result().choices[0].text == api.completions.create(**long).choices[0].text
    assert [m.id for m in api.models.list().data] == [server["base"], "dora", "peft"]
    prompts = [PROMPT, "big bird runs"]

    def chat(model, prompt):
        return api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content

    assert [chat("dora", p) for p in prompts] == generate_alone(server, server["root"] / "dora", prompts)
    peft_text = [api.completions.create(model="peft", prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
                 for p in prompts]
    assert peft_text == peft_generate(server, prompts)
    base_text = [api.completions.create(model=server["base"], prompt=p, max_tokens=MAX_TOKENS,
                                        temperature=0).choices[0].text for p in prompts]
    assert base_text != peft_text  # the adapter changes the answers
    with ThreadPoolExecutor(1) as pool:  # unloading waits for the requests in flight that use the adapter
        running = pool.submit(chat_long, api, "dora")
        while call(server, "GET", "/health")[1]["active"] == 0 and not running.done():
            time.sleep(0.01)
        unload(server, "dora")  # the first one loaded (the model's own adapter) goes; the other stays right
        assert running.result().choices[0].finish_reason == "length"  # not cut short by the unload
    assert [api.completions.create(model="peft", prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
            for p in prompts] == peft_text
    with pytest.raises(openai.NotFoundError):
        chat("dora", PROMPT)
    assert_openai_error(call(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "dora"}), 404, "lora_name")
    load(server, "dora", "dora")  # the name is free again
    assert chat("dora", PROMPT) == generate_alone(server, server["root"] / "dora", [PROMPT])[0]
    unload(server, "dora")
    unload(server, "peft")
    assert [m.id for m in api.models.list().data] == [server["base"]]


def test_adapter_paths_outside_the_root_are_refused(server):
    outside = server["outside"] / "peft_dora"
    for path in (outside, "../" + outside.parent.name + "/peft_dora", "link_out", "file_out", "run_hop"):
        assert_openai_error(call(server, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)}),
                            403, "lora_path", "outside the adapter root")
    assert_openai_error(call(server, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"}),
                        400, "lora_path", "not a folder")
    status, answer = call(server, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "y" * 300})
    assert_openai_error((status, answer), 400, "lora_path", "cannot be read: File name too long")  # was a 500
    assert str(server["root"]) not in answer["error"]["message"]
    status, answer = call(server, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "empty"})
    assert_openai_error((status, answer), 400, "lora_path", "'empty': neither a run folder")
    assert str(server["root"]) not in answer["error"]["message"]
    taken = {"lora_name": server["base"], "lora_path": "dora"}
    assert_openai_error(call(server, "POST", "/v1/load_lora_adapter", taken), 400, "lora_name", "taken")
    assert_openai_error(call(server, "POST", "/v1/load_lora_adapter", {"lora_name": "x"}), 400, "lora_path")
    assert [m["id"] for m in call(server, "GET", "/v1/models")[1]["data"]] == [server["base"]]


def test_without_an_adapter_root_the_adapter_routes_do_not_exist_and_a_crash_is_a_json_500():
    from fastapi.testclient import TestClient

    from dorafit.serving.api import Served, create_app

    app = create_app(Served(engine=None, base_name="m", formats={}, adapters={}))  # no engine: /health fails
    http = TestClient(app, raise_server_exceptions=False)
    for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        answer = http.post(route, json={"lora_name": "a", "lora_path": "b"})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    answer = http.get("/health")
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"
    assert "AttributeError" in answer.json()["error"]["message"]


def test_a_refused_adapter_names_the_served_base_by_its_name_not_its_folder(tmp_path):
    """The loader's message (``trained on X, not on the served base model <folder>``) without the server's paths."""
    from fastapi.testclient import TestClient

    from dorafit.serving.api import Served, create_app

    base_folder = tmp_path / "hub" / "snapshots" / ("a" * 40)

    class Loader:
        def __init__(self):
            self.base_folder = base_folder

        def source(self, name, path):
            raise ValueError(f"--adapter {name}={path} was trained on other/model, not on the served base model "
                             f"{base_folder}")

    (tmp_path / "root" / "run").mkdir(parents=True)
    app = create_app(Served(engine=None, base_name="org/name", formats={}, adapters={}, loader=Loader()),
                     adapter_root=tmp_path / "root")
    answer = TestClient(app).post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "run"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"] == ("'lora_path' 'run' was trained on other/model, not on the served "
                                                 "base model org/name")


def chat_long(api, model):
    return api.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=150,
                                       temperature=0)


def generate_alone(server, run, prompts) -> list[str]:
    path = server["root"].parent / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    out = server["root"].parent / "generated.jsonl"
    code, _, err = run_cli("generate", run, "--prompts", path, "--out", out, "--max-new-tokens", MAX_TOKENS,
                           "--batch-size", 1)
    assert code == 0, err
    return [r["generated"] for r in read_jsonl(out)]


def peft_generate(server, prompts) -> list[str]:
    """Greedy continuations by PEFT's own model of the PEFT adapter (stopping at EOS, as the server does)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server["base_dir"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(server["base_dir"]),
                                      server["root"] / "peft_dora").eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                  do_sample=False)
        out.append(tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_option_errors_are_one_line(tmp_path, monkeypatch):
    for size in (0, -1, "nan", "inf", 1e-9):  # inf was an OverflowError traceback, 1e-9 a limit of 0 bytes
        assert "--max-body-mb must be a finite number of MB, at least one byte" in fails(
            "serve", "--model", tmp_path, "--max-body-mb", size)
    for key in ("", "two words", "clé"):  # "" served with no key at all; the others could never be sent
        assert "--api-key: an API key must be one or more visible ASCII" in fails("serve", "--model", tmp_path,
                                                                                   "--api-key", key)
    assert "--adapter-root" in fails("serve", "--model", tmp_path, "--adapter-root", tmp_path / "nope")
    monkeypatch.setenv("DORAFIT_API_KEY", "bad key")
    assert "DORAFIT_API_KEY: an API key must be" in fails("serve", "--model", tmp_path)
