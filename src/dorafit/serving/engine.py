"""Continuous batching: one forward per generated token serves every active request, each row with its adapter.

Requests wait in a queue; a loop (:meth:`Engine.run`, in one thread) repeats:

1. **Admit**: while fewer than ``max_batch_size`` requests are prefilling or decoding, a waiting request starts
   prefilling, with a KV cache of its own (:class:`dorafit.serving.kv.RowCache`, one row).
2. **Prefill one chunk**: the prefilling request with the fewest prompt tokens left runs its next
   ``prefill_chunk`` prompt tokens (with its adapter), so a long prompt is prefilled over several iterations and
   the requests already decoding keep producing a token per iteration meanwhile; a short prompt that arrives
   behind a long one goes first. Other prefilling requests with next chunks of about that length share that
   forward (one row each, with its own adapter, shorter chunks padded: :meth:`Engine._prefill_together`), as many
   as keep the step within ``prefill_chunk`` tokens while requests are decoding, or within
   :data:`IDLE_PREFILL_TOKENS` (512, or ``prefill_chunk`` if more) while none is (then only a request that arrives
   meanwhile waits for the step), with at most :data:`MAX_PADDING` (16) padding tokens per added row: eight
   waiting 48-token prompts are one forward, not eight. When its prompt is in, a request's first token is chosen
   and its row joins the batch.
3. **Decode**: one forward over all decoding rows (each row's last token at its own position, rows right-aligned
   in one preallocated batch cache, padding masked out), with :func:`dorafit.per_row_adapters` giving every row
   its adapter. Each row's next token is chosen from its logits (greedy: one ``argmax`` over the batch's greedy
   rows; sampled: with the request's own seeded generator). A row that produced a stop token, reached its token
   limit or matched a stop string leaves.

A row's computation does not depend on the other rows beyond float rounding of batched products, so a greedy
request gets the tokens it would get alone, on every model kind :mod:`dorafit.serving.kv` serves (GQA,
sliding-window and hybrid layers).

With ``pack_weights`` the linear products of decode forwards of two rows or more run through oneDNN with weights
packed once (:mod:`dorafit.serving.packed`): faster batched decoding where MKL is slow for a few rows, at the cost
of one more copy of the weights; one-row decoding and prefill keep the default kernels, which were faster there
(benchmarks/serving.py, 2026-12-06: one row 24.8 ms packed 37.0 ms, a 48-token prefill 99.8 ms packed 129.3 ms).

Log-probabilities (``Request.logprobs``, ``Request.echo``) are ``log_softmax`` of the model's logits with the
request's adapter (not of the temperature-scaled ones), for each chosen token and, with ``echo``, for each prompt
token after the first.

Failures: an exception while prefilling, choosing a token or handing it over fails only that request; after one in a
batched decode forward, each row is run alone (on a copy of its cache) and the rows that fail alone fail (all of
them if none does), the others go on. Each failed request gets ``error`` set and ends with
reason ``"error"``; the exception is logged with its traceback and the loop goes on serving.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation import SamplingOptions, stop_ids
from ..multi import per_row_adapters
from . import packed
from .kv import RowCache, check_supported

log = logging.getLogger("dorafit.serve")
#: the most prompt tokens one prefill step holds while no request is decoding (with prefill_chunk, if larger): a
#: batch of short prompts reads the weights once instead of once per prompt (8 x 48 tokens in one forward: 0.7 of
#: the time of eight, benchmarks/serving.py), while a request arriving meanwhile waits for at most this many tokens
IDLE_PREFILL_TOKENS = 512
#: the padding tokens a batched prefill forward may hold per row beyond the first (prompts of different lengths):
#: each such row saves a forward, which on a CPU costs about what 15-20 prompt tokens cost (benchmarks/serving.py,
#: 2026-12-06: a one-row decode forward 24 ms, a 48-token prefill 95 ms), so padding stays below what it saves
MAX_PADDING = 16


@dataclass
class Request:
    """One generation: prompt tokens, which adapter (None: the base), how to choose tokens, when to stop.

    The consumer gets ``on_token(token, None)`` per token and ``on_token(None, reason)`` at the end, from the
    engine's thread; reason is "stop", "length", "cancelled" or "error" (then ``error`` says why). Log-
    probabilities are appended to the lists below before the call that hands over their token (or the end)."""

    prompt: list[int]
    adapter: str | None
    options: SamplingOptions
    stop: list[str] = field(default_factory=list)
    on_token: Callable[[int | None, str | None], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False  # set by the consumer (a client that went away): the row leaves at the next step
    logprobs: int | None = None  # None: none; k >= 0: each chosen token's log-probability and the k most likely
    echo: bool = False  # score the prompt's tokens too (prompt_logprobs; the first token has none)
    max_new_tokens: int | None = None  # overrides options.max_new_tokens; 0: only score the prompt (with echo)
    images: dict | None = None  # a vision-language model's image inputs (pixel_values, ...) for the prompt's image
    #                             tokens, in order: the prompt is prefilled from embeddings (Engine._prompt_inputs)
    # filled by the engine
    scored: list[int] = field(default_factory=list)  # the chosen tokens, a stop token that ended it included
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    error: str | None = None

    @property
    def limit(self) -> int:
        return self.options.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens


@dataclass
class _Row:
    request: Request
    cache: RowCache | None  # its own while prefilling; None once it has joined the batch cache
    done: int = 0  # prompt tokens prefilled
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    embeds: torch.Tensor | None = None  # (1, prompt, hidden): a prompt with images, as the model embeds it

    @property
    def length(self) -> int:  # tokens in its cache
        return self.done + len(self.generated) - (1 if self.generated else 0)


#: ``prefill_chunk`` when none is given, by device type: the most a request that arrives during a long prompt's
def default_prefill_chunk(device: torch.device) -> int:
    """Prompt tokens per prefill step on ``device`` when ``--prefill-chunk`` is not given: 64 on a CPU, 512 elsewhere.

    A request that arrives during a long prompt's prefill waits at most one chunk. On a CPU a 64-token chunk kept a
    short request's time to first token beside a 3,000-token prefill at 1.90x its time alone (2.73x with 128, 4.26x
    with 256) for 28% more time to prefill the long prompt itself (7.55 against 5.88 s; ``benchmarks/serving.py
    --parts ttft --prefill-chunk N``, 2-core AMD EPYC, 2026-12-06); a GPU computes a 512-token chunk about as fast
    as a 64-token one."""
    return 64 if device.type == "cpu" else 512


class Engine:
    """The batching loop over one model (see the module docstring). ``submit`` is thread-safe."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, context: int | None = None,
                 prefill_chunk: int | None = None, pack_weights: bool = False):
        """``prefill_chunk``: prompt tokens per prefill step (None: :func:`default_prefill_chunk` of the model's
        device). ``pack_weights``: run the linear products of batched decode steps through oneDNN with weights packed
        once (:mod:`dorafit.serving.packed`: faster batched decoding on some CPUs, one more copy of the weights)."""
        text_config = model.config.get_text_config()  # a vision-language model's language model's; else its own
        check_supported(text_config)
        if pack_weights and next(model.parameters()).device.type != "cpu":
            raise ValueError("--pack-weights is for a model on the CPU; leave it out with --device cuda")
        if pack_weights and not packed.available():
            raise ValueError("--pack-weights needs a torch build with oneDNN (mkldnn), which this one lacks")
        self.packed = packed.PackedLinears(model, max_batch_size) if pack_weights else None
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(next(model.parameters()).device)
        self.context = context or getattr(text_config, "max_position_embeddings", None)
        self.n_layers = text_config.num_hidden_layers
        self.stops = set(stop_ids(model, tokenizer))
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.device = next(model.parameters()).device
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.prefilling: list[_Row] = []
        self.active: list[_Row] = []  # decoding; row i of self.cache is self.active[i]
        self.cache: RowCache | None = None
        self.steps = 0  # batched decode forwards so far (for /health and tests)
        self.peak_batch = 0  # the most rows one decode forward has served
        self.failed = 0  # requests ended by an error
        self.last_error: str | None = None
        self.running = False  # the loop is running now
        self._stop = threading.Event()
        self._draining = False
        self._thread: threading.Thread | None = None
        self.calls: queue.Queue = queue.Queue()  # (function, future) to run between steps: call_between_steps
        self.own_modules: dict[str, dict] = {}  # adapter -> {name: module} it trained in full (load.AdapterLoader)

    # ---- control ---------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run the loop (:meth:`run`) in a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="dorafit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10, reason: str = "the server is shutting down") -> None:
        """End the loop; every request still prefilling, decoding or waiting fails with ``reason``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # a forward still running: draining now would change its rows under it
                return
        self.drain(reason)

    def drain(self, reason: str = "the server is shutting down") -> None:
        """Fail every request in flight or waiting with ``reason`` (call it in the loop's thread, or after it has
        ended); :attr:`stopping` is true from now on."""
        self._draining = True
        self._fail(self.prefilling + self.active, reason)
        self.prefilling, self.active, self.cache = [], [], None
        while not self.waiting.empty():
            self._fail([_Row(self.waiting.get_nowait(), None)], reason)
        while not self.calls.empty():
            self.calls.get_nowait()[1].cancel()

    def call_between_steps(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn()`` in the loop's thread before its next step, when no forward is running (so it may change the
        model: load or unload an adapter); the future gets its result or its exception, or is cancelled when the
        engine stops first (or has stopped: nothing would run it). Thread-safe."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.calls.put((fn, future))
        if self.stopping:  # after the put: a drain that emptied the queue just before cannot miss it
            future.cancel()
        return future

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self.calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self._draining

    def submit(self, request: Request) -> None:
        self.waiting.put(request)

    def load(self) -> dict:
        return {"running": self.running, "active": len(self.active), "prefilling": len(self.prefilling),
                "waiting": self.waiting.qsize(), "decode_steps": self.steps, "peak_batch": self.peak_batch,
                "failed_requests": self.failed}

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The batching loop, in the calling thread, until :meth:`stop` is called or ``until()`` is true.

        On CPU, run it in the thread that loaded the model (the main thread): the same decoding ran markedly slower
        in another thread (benchmarks/serving.py: batched / one-at-a-time 1.44x-1.61x at 8 requests with the loop
        in a thread, 2.03x in the main thread). ``dorafit serve`` runs it there and its HTTP server in a thread."""
        self.running = True
        try:
            while not self._stop.is_set() and not (until is not None and until()):
                try:
                    self._iteration()
                except Exception as exc:  # noqa: BLE001 - not expected (each step guards its requests): fail
                    self._fail(self.prefilling + self.active, exc)  # what is in flight, and keep serving
                    self.prefilling, self.active, self.cache = [], [], None
        finally:
            self.running = False

    def _iteration(self) -> None:
        self._run_calls()
        self._admit()
        if not self.prefilling and not self.active:
            try:
                self.waiting.put(self.waiting.get(timeout=0.05))  # sleep until a request comes
            except queue.Empty:
                pass
            return
        if self.prefilling:
            self._prefill_step()
        if self.active:
            self._decode()

    def _forward(self, adapters: list[str | None], pack: bool = False, **inputs):
        """The model's forward with row i using adapter ``adapters[i]`` (one place to observe or fault it);
        ``pack``: through the packed weights, if the engine has them."""
        packing = self.packed if pack and self.packed is not None else contextlib.nullcontext()
        with per_row_adapters(self.model, adapters), packing:
            return self.model(**inputs, use_cache=True)

    def _admit(self) -> None:
        while len(self.active) + len(self.prefilling) < self.max_batch_size:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            row = _Row(request, RowCache(self.n_layers))
            try:
                if request.cancelled:
                    self._end(request, "cancelled")
                    continue
                if not request.options.greedy:
                    row.generator = torch.Generator(device=self.device)
                    row.generator.manual_seed(request.options.seed if request.options.seed is not None
                                              else time.time_ns() & 0xFFFFFFFFFFFF)
                self.prefilling.append(row)
            except Exception as exc:  # noqa: BLE001 - fail this request, keep serving
                self._fail([row], exc)

    @torch.no_grad()
    def _prefill_step(self) -> None:
        """The next chunk of the prefilling request with the fewest prompt tokens left, together with the next
        chunks of the same length of other prefilling requests (:meth:`_prefill_group`) in one forward."""
        for row in [r for r in self.prefilling if r.request.cancelled]:
            self.prefilling.remove(row)
            self._end(row.request, "cancelled")
        if not self.prefilling:
            return
        group = self._prefill_group()
        if len(group) > 1:
            try:
                self._prefill_together(group)
                return
            except Exception:  # noqa: BLE001 - their own caches are untouched: prefill each alone, failing only
                log.debug("a batched prefill failed; prefilling its rows one at a time", exc_info=True)  # culprits
        for row in group:
            self._prefill_alone(row)

    def _chunk(self, row: _Row) -> int:
        """The tokens of ``row``'s next prefill chunk."""
        return min(self.prefill_chunk, len(row.request.prompt) - row.done)

    def _prefill_group(self) -> list[_Row]:
        """The rows one prefill step serves: the prefilling row with the fewest prompt tokens left, and, when it
        can share a forward, the next ones by tokens left while the forward stays within the budget and holds at
        most :data:`MAX_PADDING` padding tokens per added row (chunks are right-padded to the longest). The budget,
        counting padding: ``prefill_chunk`` tokens while requests are decoding (they wait for the step),
        :data:`IDLE_PREFILL_TOKENS` (or ``prefill_chunk`` if more) when none is. A chunk in the middle of a long
        prompt joins only chunks of its own length (padding the first row to it would delay that row's first
        token for a chunk a later step serves as well); rows with images or echo are prefilled alone."""

        def left(row: _Row) -> int:
            return len(row.request.prompt) - row.done

        def shares(row: _Row) -> bool:
            return not row.request.images and not row.request.echo

        order = sorted(self.prefilling, key=left)
        if not shares(order[0]):
            return order[:1]
        budget = self.prefill_chunk if self.active else max(self.prefill_chunk, IDLE_PREFILL_TOKENS)
        first = tokens = self._chunk(order[0])
        group = order[:1]
        for row in filter(shares, order[1:]):
            width = self._chunk(row)  # the longest chunk so far: chunks grow with the tokens left
            padded = (len(group) + 1) * width
            if (padded > budget or padded - tokens - width > MAX_PADDING * len(group)
                    or (width > first and width < left(row))):
                break
            group.append(row)
            tokens += width
        return group

    def _prefill_together(self, rows: list[_Row]) -> None:
        """One forward for the next chunk of each of ``rows``, each with its adapter: their caches stacked
        right-aligned into one (:meth:`RowCache.of_rows`, a copy), each row's chunk after its own tokens,
        right-padded to the longest chunk (the padding masked out: no real token sees it), then split back into a
        cache per row without the padding. Each row's keys, values and logits are what its own chunk alone gives
        (up to the rounding of batched products): its tokens are contiguous, so sliding windows see the distances
        they see alone, and its logits are taken at its own last token."""
        chunks = [self._chunk(r) for r in rows]
        width = max(chunks)
        cache = RowCache.of_rows([r.cache for r in rows])
        ids = torch.tensor([r.request.prompt[r.done:r.done + c] + [0] * (width - c) for r, c in zip(rows, chunks)],
                           device=self.device)
        columns = torch.arange(width, device=self.device)[None]
        positions = torch.tensor([r.done for r in rows], device=self.device)[:, None] + columns
        sizes = torch.tensor(chunks, device=self.device)[:, None]
        mask = cache.attention_mask(width, self.device)
        mask[:, cache.length:] *= columns < sizes  # each row's padding
        last = 1 if width == min(chunks) else sizes - 1  # (rows, 1): each row's last token
        out = self._forward([r.request.adapter for r in rows], input_ids=ids, position_ids=positions, cache=cache,
                            attention_mask=mask, logits_to_keep=last)
        if out.logits.shape[:2] != (len(rows), 1):
            raise RuntimeError(f"{type(self.model).__name__} did not keep one position per row (logits_to_keep)")
        for i, (row, c) in enumerate(zip(rows, chunks)):  # from here on each row goes on alone
            try:
                row.cache = cache.copy_rows([i])
                row.cache.rewind(row.cache.length - (width - c))
                row.done += c
                self._prefilled(row, out.logits[i, -1])
            except Exception as exc:  # noqa: BLE001 - fail this request, keep serving
                self._prefill_failed(row, exc)

    def _prefill_alone(self, row: _Row) -> None:
        """The next chunk of ``row`` in a forward of its own (into its own cache)."""
        request = row.request
        try:
            start, end = row.done, row.done + self._chunk(row)
            positions = torch.arange(start, end, device=self.device)[None]
            out = self._forward([request.adapter], **self._prompt_inputs(row, start, end), position_ids=positions,
                                cache=row.cache,
                                attention_mask=row.cache.attention_mask(end - start, self.device),
                                logits_to_keep=0 if request.echo else 1)
            row.done = end
            if request.echo:
                self._score_prompt(row, out.logits[0], start, end)
            self._prefilled(row, out.logits[0, -1])
        except Exception as exc:  # noqa: BLE001 - fail this request, keep serving
            self._prefill_failed(row, exc)

    def _prefilled(self, row: _Row, logits: torch.Tensor) -> None:
        """After a chunk of ``row``: once its whole prompt is in, choose its first token from ``logits`` (the last
        prompt position's) and move it to the decoding batch (or end it)."""
        if row.done < len(row.request.prompt):
            return
        self.prefilling.remove(row)
        if row.request.limit == 0:  # only the prompt's log-probabilities were asked for
            self._end(row.request, "length")
        elif not self._take(row, logits):
            self._join(row)

    def _prefill_failed(self, row: _Row, exc: Exception) -> None:
        if row in self.prefilling:
            self.prefilling.remove(row)
        self._fail([row], exc)

    def _prompt_inputs(self, row: _Row, start: int, end: int) -> dict:
        """The model inputs of prompt tokens ``start:end``: their ids, or, for a prompt with images, their input
        embeddings (:meth:`_image_embeds`, computed at the first chunk)."""
        request = row.request
        if not request.images:
            return {"input_ids": torch.tensor([request.prompt[start:end]], device=self.device)}
        if row.embeds is None:
            row.embeds = self._image_embeds(request)
        chunk = row.embeds[:, start:end]
        if end == len(request.prompt):
            row.embeds = None  # the last chunk: not kept while the row decodes
        return {"inputs_embeds": chunk}

    def _image_embeds(self, request: Request) -> torch.Tensor:
        """The prompt's input embeddings with the image features in place of its image tokens, as the model's own
        forward merges them (LLaVA: the vision tower's features through the projector, ``masked_scatter`` into the
        image tokens' places), computed with the request's adapter and the modules it trained in full
        (``own_modules``: its projector); ``(1, prompt, hidden)``."""
        ids = torch.tensor([request.prompt], device=self.device)
        pixels = {k: v.to(self.device) for k, v in request.images.items()}
        inner = self.model.model  # e.g. LlavaModel: get_image_features and get_placeholder_mask
        with per_row_adapters(self.model, [request.adapter]):
            embeds = self.model.get_input_embeddings()(ids)
        with (per_row_adapters(self.model, [request.adapter] * len(pixels["pixel_values"])),  # a row per image
              _modules_in_place(self.model, self.own_modules.get(request.adapter, {}))):
            features = inner.get_image_features(**pixels, return_dict=True).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.device, embeds.dtype)
        mask = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
        return embeds.masked_scatter(mask, features)

    def _join(self, row: _Row) -> None:
        if self.cache is None:
            self.cache = row.cache
        else:
            self.cache.join(row.cache)
        row.cache = None
        self.active.append(row)

    def _decode_forward(self, rows: list[_Row], cache: RowCache):
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        return self._forward([r.request.adapter for r in rows], pack=len(rows) > 1, input_ids=ids,
                             position_ids=positions, cache=cache, attention_mask=cache.attention_mask(1, self.device))

    @torch.no_grad()
    def _decode(self) -> None:
        rows, cache = self.active, self.cache
        before = cache.length
        try:
            out = self._decode_forward(rows, cache)
        except Exception as exc:  # noqa: BLE001 - find the rows it concerns, fail them, keep the others
            cache.rewind(before)
            self._isolate(rows, cache, exc)
            return
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        logits = out.logits[:, -1]  # (B, vocab)
        tokens, logps = self._batch_choices(rows, logits)
        keep = []
        for i, r in enumerate(rows):
            try:
                if not self._take(r, logits[i], tokens[i], logps.get(i)):
                    keep.append(i)
            except Exception as exc:  # noqa: BLE001 - fail this row only
                self._fail([r], exc)
        if len(keep) < len(rows):
            self.active = [rows[i] for i in keep]
            if keep:
                cache.keep(keep)
            else:
                self.cache = None

    def _isolate(self, rows: list[_Row], cache: RowCache, exc: Exception) -> None:
        """After a batched decode forward failed: run each row alone (on a copy of its cache) to find the rows
        that fail by themselves; fail those (all rows if none fails alone) and keep the others, which decode at
        the next step."""
        culprits = []
        if len(rows) > 1:
            for i, row in enumerate(rows):
                try:
                    self._decode_forward([row], cache.copy_rows([i]))
                except Exception as alone:  # noqa: BLE001 - this row's own failure
                    culprits.append((i, alone))
        culprits = culprits or [(i, exc) for i in range(len(rows))]
        for i, error in culprits:
            self._fail([rows[i]], error)
        keep = [i for i in range(len(rows)) if i not in {j for j, _ in culprits}]
        self.active = [rows[i] for i in keep]
        if keep:
            cache.keep(keep)
        else:
            self.cache = None

    # ---- choosing tokens and stopping ------------------------------------------------------------------------
    @staticmethod
    def _batch_choices(rows: list[_Row], logits: torch.Tensor) -> tuple[list[int | None], dict[int, torch.Tensor]]:
        """What one operation over the batch gives at once (each row's result is what the same operation on that
        row alone gives): the greedy rows' tokens (one ``argmax``; None for a sampling row, which draws from its
        own generator in :meth:`_choose`) and, by row, the ``log_softmax`` of the rows that asked for
        log-probabilities."""
        tokens: list[int | None] = [None] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.request.options.greedy]
        if greedy:
            for i, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                tokens[i] = token
        scored = [i for i, r in enumerate(rows) if r.request.logprobs is not None]
        logps = {}
        if scored:
            logps = dict(zip(scored, torch.log_softmax(logits[scored].float(), dim=-1)))
        return tokens, logps

    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        options = row.request.options
        if options.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / options.temperature, dim=-1)
        if options.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < options.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        if not torch.isfinite(probs).all():
            raise FloatingPointError("the token probabilities are not finite (the model's logits overflowed)")
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _take(self, row: _Row, logits: torch.Tensor, token: int | None = None,
              logp: torch.Tensor | None = None) -> bool:
        """Choose the row's next token (unless ``token`` is given: already chosen) and hand it over; True if the
        row has finished. ``logp``: the log-softmax of ``logits`` if already computed."""
        request = row.request
        if request.cancelled:
            return self._finish(row, "cancelled")
        if token is None:
            token = self._choose(row, logits)
        if request.logprobs is not None:
            if logp is None:
                logp = torch.log_softmax(logits.float(), dim=-1)
            request.scored.append(token)
            request.token_logprobs.append(float(logp[token]))
            request.top_logprobs.append(_top(logp, request.logprobs))
        if token in self.stops:
            return self._finish(row, "stop")
        row.generated.append(token)
        if request.on_token:
            request.on_token(token, None)
        if request.stop:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            if any(s in text for s in request.stop):
                return self._finish(row, "stop")
        if len(row.generated) >= request.limit:
            return self._finish(row, "length")
        if self.context and row.length + 1 >= self.context:
            return self._finish(row, "length")
        return False

    @staticmethod
    def _score_prompt(row: _Row, logits: torch.Tensor, start: int, end: int) -> None:
        """Log-probabilities of prompt tokens ``start + 1 .. end`` (within the prompt) from this chunk's logits."""
        request = row.request
        if start == 0:
            request.prompt_logprobs.append(None)
            request.prompt_top_logprobs.append(None)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (chunk, vocab): position j predicts token start + j + 1
        targets = request.prompt[start + 1:end + 1]
        chosen = logp[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)]
        request.prompt_logprobs.extend(chosen.tolist())
        k = request.logprobs or 0
        request.prompt_top_logprobs.extend(_top(logp[j], k) for j in range(len(targets)))

    def _finish(self, row: _Row, reason: str) -> bool:
        self._end(row.request, reason)
        return True

    def _fail(self, rows: list[_Row], error: BaseException | str) -> None:
        """End these rows' requests with reason "error" (logged with its traceback when it is an exception)."""
        if not rows:
            return
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if isinstance(error, BaseException):
            log.error("generation failed for request(s) %s", ", ".join(str(r.request.id) for r in rows),
                      exc_info=error)
            self.last_error = message
        for row in rows:
            row.request.error = message
            self.failed += 1
            try:
                self._end(row.request, "error")
            except Exception:  # a consumer that cannot be told must not stop the others
                log.exception("could not hand request %s its error", row.request.id)

    @staticmethod
    def _end(request: Request, reason: str) -> None:
        if request.on_token:
            request.on_token(None, reason)


@contextlib.contextmanager
def _modules_in_place(model, modules: dict):
    """Inside the block, ``model``'s submodules named in ``modules`` are those modules (then the model's own again)."""
    shared = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        model.set_submodule(name, module)
    try:
        yield
    finally:
        for name, module in shared.items():
            model.set_submodule(name, module)


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens with their log-probabilities, most likely first."""
    if k <= 0:
        return []
    values, ids = logp.topk(k)
    return list(zip(ids.tolist(), values.tolist()))
