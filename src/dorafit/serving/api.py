"""The OpenAI-compatible HTTP API of ``dorafit serve`` (FastAPI), in front of the batching :class:`Engine`.

    GET  /v1/models             the base model and every adapter, by name (never a filesystem path)
    GET  /v1/models/{id}        one of them (404 if unknown)
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                                 "n", "logprobs", "echo"}: "prompt" a string, a list of token ids, or a list of
                                 either (one choice per prompt and per n, with its "index"); "echo" with
                                 "logprobs" scores the prompt's tokens too, and "max_tokens": 0 then generates none
    POST /v1/chat/completions   {"model", "messages", ..., "logprobs", "top_logprobs"}: rendered by the adapter's
                                 chat template; a message's content may be OpenAI's list of text and image_url
                                 parts (images: a vision-language model only, :mod:`.images`)
    GET  /health                {"status": "ok" | "starting" | "stopping", "active", "prefilling", "waiting",
                                 "decode_steps", "failed_requests", "last_error", "disconnected"}
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   with an adapter root only (:mod:`.adapter_admin`)

Every request parameter is honoured or refused by name (:mod:`.params`); the API key, content type and body size
are checked before any route (:mod:`.security`); every error is OpenAI's body (:mod:`.errors`). A non-streamed
request whose client disconnects is cancelled (the engine drops it at its next step), as a streamed one is.

The request's ``model`` picks the adapter (the base model's name: no adapter). ``"stream": true`` answers with
server-sent events (``data: {chunk}``, then ``data: [DONE]``) whose text pieces concatenate to the whole answer.
Bad requests get OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (404 for
an unknown model, 400 for an invalid parameter or a prompt longer than the context); the server stays up. A
request the engine fails gets a 500 (503 at shutdown) with the same body, or, once a stream has started, an event
``data: {"error": {...}}`` in place of the rest; never a 200 with a cut answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from ..chat_format import ChatFormat, ChatFormatError
from ..generation import MAX_SEED, SamplingOptions
from . import params
from .engine import Engine, Request
from .errors import ApiError, install_error_handlers
from .images import ImagePart, content_text
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .security import Guard, GuardMiddleware

MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_N = 16  # choices per prompt (each generated as a request of its own)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
API_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingOptions' field -> the request's parameter
DISCONNECT_POLL_S = 0.1  # how often a non-streamed request looks whether its client is still there


@dataclass
class Served:
    """What the server serves: one engine over one model, and the names it answers to with their chat formats."""

    engine: Engine
    base_name: str
    formats: dict[str, ChatFormat]  # model name (base or adapter) -> how its chats are rendered
    adapters: dict[str, str]  # adapter name -> where it was loaded from
    max_new_tokens: int = 256  # a request's max_tokens when it gives none
    loader: object = None  # load.AdapterLoader: adds and removes adapters (run-time adapters)
    disconnected: int = 0  # non-streamed requests cancelled because their client went away
    images: object = None  # images.ImageReader of a vision-language model; None: the model reads text only

    def __post_init__(self):
        self.created = int(time.time())

    def model_card(self, name: str) -> dict:
        """The OpenAI model object of the base or an adapter: names only (no filesystem path)."""
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "dorafit"}
        return card if name == self.base_name else {**card, "parent": self.base_name}

    def adapter_of(self, model) -> str | None:
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: the base model's or an adapter's name (see GET /v1/models)",
                           "model", "missing_model")
        if model == self.base_name:
            return None
        if model not in self.adapters:
            known = ", ".join([self.base_name, *self.adapters])
            raise ApiError(404, f"The model '{model}' does not exist; this server has: {known}", "model",
                           "model_not_found")
        return model


# ---- request parsing ------------------------------------------------------------------------------------------
def _number(body: dict, name: str, default, low=None, high=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok and (low is not None and value < low or high is not None and value > high):
        ok = False
    if not ok:
        what = "an integer" if integer else "a number"
        bounds = f" from {low} to {high}" if high is not None else f" >= {low}" if low is not None else ""
        raise ApiError(400, f"'{name}' must be {what}{bounds}, got {value!r}", name, "invalid_value")
    return value


def sampling(body: dict, default_max_tokens: int, least_tokens: int = 1) -> tuple[SamplingOptions, list[str]]:
    """The request's sampling options and stop strings, each checked (400 naming the parameter). ``max_tokens``
    may be 0 where ``least_tokens`` is 0 (completions with echo); the options then say 1 (the caller asks the
    engine for none)."""
    _number(body, "n", 1, 1, MAX_N, integer=True)
    max_tokens = _number(body, "max_tokens", None, least_tokens, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", default_max_tokens, least_tokens, integer=True)
    temperature = _number(body, "temperature", 1.0, 0, MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", "top_p", "invalid_value")
    seed = _number(body, "seed", None, 0, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop", "invalid_value")
    try:
        options = SamplingOptions(max_new_tokens=max(max_tokens, 1), temperature=float(temperature),
                                  top_p=float(top_p), seed=seed, label=lambda name: f"'{API_NAMES.get(name, name)}'")
    except ValueError as exc:  # the one validation of sampling options, shared with the CLI
        name = str(exc).split("'")[1] if str(exc).startswith("'") else None
        raise ApiError(400, str(exc), name, "invalid_value") from None
    return options, stop


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {value!r}", name, "invalid_value")
    return bool(value)


def prompt_list(prompt) -> list:
    """``prompt`` as a list of prompts, each a string or a list of token ids: OpenAI's four forms (a string, a
    list of token ids, a list of strings, a list of token-id lists)."""
    def is_ids(p):
        return isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in p)

    if isinstance(prompt, str) and prompt:
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) and p or is_ids(p) for p in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of either",
                   "prompt", "invalid_value")


def chat_messages(body: dict, image_token: str | None = None) -> tuple[list[dict], list[ImagePart]]:
    """The messages with string contents, and their image parts in order: a content given as OpenAI's list of parts
    is joined into a string with each image part as ``image_token`` (:func:`.images.content_text`; a 400 for an
    image part when ``image_token`` is None: a text-only model)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_value")
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts
            content, parts = content_text(content, i, image_token, body.get("model"))
            images += parts
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role' and 'content'",
                           f"messages[{i}]", "invalid_value")
        out.append({"role": m["role"], "content": content})
    return out, images


# ---- generation and answers -----------------------------------------------------------------------------------
class Generation:
    """One request in flight: tokens arrive from the engine thread into an asyncio queue."""

    def __init__(self, served: Served, prompt: list[int], adapter: str | None, options: SamplingOptions,
                 stop: list[str], logprobs: int | None = None, echo: bool = False, max_new_tokens: int | None = None,
                 images: dict | None = None):
        self.served, self.prompt, self.stop = served, prompt, stop
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.request = Request(prompt, adapter, options, stop, self._on_token, logprobs=logprobs, echo=echo,
                               max_new_tokens=max_new_tokens, images=images or None)
        served.engine.submit(self.request)

    @staticmethod
    def fits(served: Served, prompt: list[int], param: str) -> None:
        """400 naming ``param`` (the request's "prompt" or "messages") if ``prompt`` fills the model's context."""
        context = served.engine.context
        if context and len(prompt) >= context:
            raise ApiError(400, f"This model's context is {context} tokens; the prompt has {len(prompt)}. Shorten it.",
                           param, "context_length_exceeded")

    def _on_token(self, token, reason) -> None:  # called by the engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (token, reason))
        except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting any more
            pass

    def cancel(self) -> None:
        self.request.cancelled = True

    def text(self) -> str:
        """The text so far, cut at the first stop string."""
        text = self.served.engine.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    async def pieces(self):
        """Text pieces as tokens arrive (held back while they might be the start of a stop string or an
        incomplete character); the pieces concatenate to :meth:`text`. Sets ``finish_reason`` at the end."""
        sent = 0
        hold = max((len(s) for s in self.stop), default=1) - 1
        while True:
            token, reason = await self.queue.get()
            if reason == "error":  # the engine failed this request: a 5xx, never a 200 with a cut answer
                self.finish_reason = reason
                status = 503 if self.served.engine.stopping else 500
                raise ApiError(status, f"generation failed: {self.request.error}", None, "engine_error")
            if reason is not None:
                self.finish_reason = reason
                rest = self.text()[sent:]
                if rest:
                    yield rest
                return
            self.tokens.append(token)
            text = self.text()
            ready = len(text) - hold if self.stop else len(text)
            while ready > sent and text[ready - 1] == "\ufffd":  # a character still being decoded
                ready -= 1
            if ready > sent:
                yield text[sent:ready]
                sent = ready

    async def whole(self) -> str:
        async for _ in self.pieces():
            pass
        return self.text()

    def logprobs_of_completion(self, echo: bool) -> dict:
        """OpenAI's completion ``logprobs`` object: the prompt's tokens (with ``echo``), then the generated ones
        (with the stop token that ended the generation, as OpenAI lists it: lm-eval counts on it)."""
        r = self.request
        ids = (self.prompt if echo else []) + r.scored
        values = (r.prompt_logprobs if echo else []) + r.token_logprobs
        tops = (r.prompt_top_logprobs if echo else []) + r.top_logprobs
        return completion_logprobs(TokenText(self.served.engine.tokenizer), ids, values, tops)

    def logprobs_of_chat(self) -> dict:
        r, n = self.request, len(self.tokens)
        return chat_logprobs(TokenText(self.served.engine.tokenizer), self.prompt, self.tokens,
                             r.token_logprobs[:n], r.top_logprobs[:n])

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt) + len(self.tokens)}


def _nth_choice(options: SamplingOptions, j: int) -> SamplingOptions:
    """Choice ``j`` of a request's ``n``: a seeded sampler gets seed + j (mod 2**64), so the n choices differ and
    the request is still reproducible; greedy and unseeded options are unchanged."""
    if j == 0 or options.seed is None or options.greedy:
        return options
    return dataclasses.replace(options, seed=(options.seed + j) % (MAX_SEED + 1))


def _reason(reason: str | None) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, reason or "stop")


async def whole_unless_gone(served: Served, gens: list[Generation], http: HttpRequest) -> list[str]:
    """Each ``gen.whole()``; if the client disconnects first, every one is cancelled (the engine drops its row at
    the next step) and counted in ``served.disconnected``."""
    task = asyncio.ensure_future(asyncio.gather(*(gen.whole() for gen in gens)))
    try:
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
            if await http.is_disconnected():
                for gen in gens:
                    gen.cancel()
                texts = await task
                served.disconnected += sum(gen.finish_reason == "cancelled" for gen in gens)
                return texts
        return task.result()
    finally:
        for gen in gens:
            if gen.finish_reason is None:
                gen.cancel()


def create_app(served: Served, guard: Guard | None = None, adapter_root=None) -> FastAPI:
    """The app; ``guard``: API key and body limit (default: no key, 4 MB); ``adapter_root``: a folder enables the
    run-time adapter routes for adapters under it."""
    app = FastAPI(title="dorafit serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, guard=guard or Guard())
    if adapter_root is not None:
        from .adapter_admin import install_adapter_routes

        install_adapter_routes(app, served, adapter_root)
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="dorafit-tokenize")  # off the event loop, one at a time

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    async def read_json(http: HttpRequest) -> dict:
        return params.parse_json(await http.body())

    @app.get("/health")
    async def health():
        """The engine's state now: "ok" while its loop runs, "starting" before, "stopping" at shutdown; the
        number of requests that failed so far and the last error stay visible but do not change the status."""
        engine = served.engine
        status = "stopping" if engine.stopping else "ok" if engine.running else "starting"
        return {"status": status, **engine.load(), "last_error": engine.last_error,
                "disconnected": served.disconnected}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served.model_card(n) for n in [served.base_name, *served.adapters]]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        served.adapter_of(model_id)  # 404 if unknown
        return served.model_card(model_id)

    def stream(gen: Generation, http: HttpRequest, chunk, include_usage: bool = False) -> StreamingResponse:
        async def events():
            try:
                first = chunk(None, None, start=True)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                try:
                    async for piece in gen.pieces():
                        if await http.is_disconnected():
                            gen.cancel()
                            return
                        yield f"data: {json.dumps(chunk(piece, None))}\n\n"
                except ApiError as exc:  # the engine failed it: an error event (the status line has gone)
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    return
                yield f"data: {json.dumps(chunk('', _reason(gen.finish_reason)))}\n\n"
                if include_usage:  # OpenAI's last chunk: no choices, the usage
                    yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': gen.usage()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if gen.finish_reason is None:
                    gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await read_json(http)
        params.check_parameters(body, "completions")
        adapter = served.adapter_of(body.get("model"))
        usage_chunk = params.include_usage(body)
        prompts = prompt_list(body.get("prompt"))
        echo = _flag(body, "echo")
        logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        options, stop = sampling(body, served.max_new_tokens, least_tokens=0 if echo else 1)
        n = body.get("n") or 1
        score_only = body.get("max_tokens") == 0
        if body.get("stream") and (len(prompts) > 1 or n > 1 or echo or logprobs is not None):
            raise ApiError(400, "'stream' is supported for one prompt and n = 1, without 'echo' and 'logprobs'",
                           "stream", "invalid_value")
        tokenizer = served.engine.tokenizer
        ids = [p if isinstance(p, list) else (await off_loop(tokenizer, p))["input_ids"] for p in prompts]
        vocab = served.engine.vocab_size
        if any(t >= vocab for p in ids for t in p):
            raise ApiError(400, f"'prompt' has token ids outside this model's vocabulary (0 to {vocab - 1})", "prompt",
                           "invalid_value")
        if served.images:  # a vision-language model: images come in chat image_url parts, not as image tokens
            for p in ids:
                served.images.prompt(p, [], "prompt")
        served.adapter_of(body["model"])  # again: an unload may have begun while the prompts were tokenized
        fitted = []
        for p in ids:  # every prompt checked before any is generated
            Generation.fits(served, p, "prompt")
            fitted.append(params.fit_to_context(options, len(p), served.engine.context, body))
        gens = [Generation(served, p, adapter, _nth_choice(fit, j), stop, logprobs=logprobs,
                           echo=echo and logprobs is not None, max_new_tokens=0 if score_only else None)
                for p, fit in zip(ids, fitted) for j in range(n)]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, reason, start=False, index=0, logprobs=None):
            if start:
                return None
            return {"id": rid, "object": "text_completion", "created": created, "model": body["model"],
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

        if body.get("stream"):
            return stream(gens[0], http, chunk, usage_chunk)
        texts = await whole_unless_gone(served, gens, http)
        choices = []
        for i, (gen, text) in enumerate(zip(gens, texts)):
            prompt = prompts[i // n]
            if echo:
                text = (prompt if isinstance(prompt, str) else tokenizer.decode(prompt)) + text
            scores = gen.logprobs_of_completion(echo) if logprobs is not None else None
            choices.append(chunk(text, _reason(gen.finish_reason), index=i, logprobs=scores)["choices"][0])
        usage = [gen.usage() for gen in gens]
        return {"id": rid, "object": "text_completion", "created": created, "model": body["model"],
                "choices": choices, "usage": {k: sum(u[k] for u in usage) for k in usage[0]}}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await read_json(http)
        params.check_parameters(body, "chat")
        adapter = served.adapter_of(body.get("model"))
        usage_chunk = params.include_usage(body)
        reader = served.images
        messages, image_parts = chat_messages(body, reader.image_token if reader else None)
        options, stop = sampling(body, served.max_new_tokens)
        logprobs = _flag(body, "logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        if (body.get("n") or 1) > 1:
            raise ApiError(400, "/v1/chat/completions supports n = 1 (send several requests)", "n", "invalid_value")
        if logprobs and body.get("stream"):
            raise ApiError(400, "'logprobs' is not supported with 'stream'", "logprobs", "invalid_value")
        images = await asyncio.to_thread(reader.read, image_parts) if image_parts else []  # fetches: off the loop
        try:
            ids = await off_loop(served.formats[body["model"]].prompt_ids, messages)
        except ChatFormatError as exc:
            raise ApiError(400, str(exc), "messages", "invalid_value") from None
        ids, pixels = await off_loop(reader.prompt, ids, images) if reader else (ids, {})
        served.adapter_of(body["model"])  # again: an unload may have begun while the prompt was tokenized
        Generation.fits(served, ids, "messages")
        options = params.fit_to_context(options, len(ids), served.engine.context, body)
        gen = Generation(served, ids, adapter, options, stop, logprobs=(top or 0) if logprobs else None,
                         images=pixels)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, reason, start=False):
            delta = {"role": "assistant", "content": ""} if start else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None if start else reason}]}

        if body.get("stream"):
            return stream(gen, http, chunk, usage_chunk)
        (text,) = await whole_unless_gone(served, [gen], http)
        return {"id": rid, "object": "chat.completion", "created": created, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": gen.logprobs_of_chat() if logprobs else None,
                             "finish_reason": _reason(gen.finish_reason)}],
                "usage": gen.usage()}

    return app
