"""Races between run-time adapter unloads and requests, in process (a real engine over a tiny LLaMA, FastAPI's
TestClient): a request that named an adapter which is unloaded while its prompt is being tokenized gets a 404
(not a 500 from the engine), and the engine keeps serving; an unload after the engine has stopped gets a 503 (it
waited for ever) and the adapter stays listed."""

from __future__ import annotations

import pytest
import torch

from .cli_support import chat_tokenizer

pytest.importorskip("fastapi")


class Loader:
    def __init__(self, net):
        self.net, self.base_folder = net, None

    def unload(self, name):
        from dorafit.inject import unload

        unload(self.net, name)


@pytest.fixture()
def served():
    from transformers import LlamaConfig, LlamaForCausalLM

    import dorafit
    from dorafit.chat_format import ChatFormat
    from dorafit.serving.api import Served
    from dorafit.serving.engine import Engine

    tok = chat_tokenizer()
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    dorafit.apply(net, dorafit.AdapterConfig(method="dora", r=2, targets=["q_proj"]), name="a")
    fmt = ChatFormat.choose(tok, "plain")
    engine = Engine(net, tok, max_batch_size=4, prefill_chunk=8).start()
    yield Served(engine, "base", {"base": fmt, "a": fmt}, {"a": "a"}, max_new_tokens=3, loader=Loader(net))
    engine.stop()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_request_whose_adapter_is_unloaded_while_it_is_tokenized_gets_404(served, route, tmp_path):
    from fastapi.testclient import TestClient

    from dorafit.serving.api import create_app

    http = TestClient(create_app(served, adapter_root=tmp_path))
    tokenizer, fmt = served.engine.tokenizer, served.formats["a"]
    unloaded = []

    def unload_first(*args):  # in the tokenizing thread, while the request awaits it
        unloaded.append(http.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code)
        return args

    served.engine.tokenizer = lambda text: tokenizer(*unload_first(text))
    fmt.prompt_ids = lambda messages: fmt.__class__.prompt_ids(fmt, *unload_first(messages))
    body = ({"prompt": "red cat"} if route == "/v1/completions" else
            {"messages": [{"role": "user", "content": "red cat"}]})
    answer = http.post(route, json={"model": "a", "max_tokens": 2, **body})
    assert unloaded == [200]
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", answer.text
    served.engine.tokenizer = tokenizer
    answer = http.post(route, json={"model": "base", "max_tokens": 2, "temperature": 0, **body})
    assert answer.status_code == 200, answer.text
    assert served.engine.failed == 0


def test_an_unload_after_the_engine_has_stopped_gets_503(served, tmp_path):
    from fastapi.testclient import TestClient

    from dorafit.serving.api import create_app

    http = TestClient(create_app(served, adapter_root=tmp_path))
    served.engine.stop()
    answer = http.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down", answer.text
    assert "a" in served.adapters and served.engine.call_between_steps(lambda: 1).cancelled()
