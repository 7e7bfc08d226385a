"""Continuous batching: one forward per generated token serves every active request, each row with its adapter.

Requests wait in a queue; a background thread runs the loop:

1. **Join**: while fewer than ``max_batch_size`` requests are active, a waiting request is prefilled alone (its
   prompt, with its adapter: base model + that adapter, or the base) and its first token chosen; it then joins.
2. **Decode**: one forward over all active rows: each row's last token, its own position, and its own KV cache,
   left-padded to the longest (padding masked out), with :func:`dorafit.per_row_adapters` giving every row its
   adapter (the rows of one adapter share one low-rank product; DoRA's norms are cached). Each row's next token
   is chosen from its logits (greedy, or sampled with the request's own seeded generator).
3. **Leave**: a row that produced a stop token, reached its token limit or matched a stop string finishes; its
   cache is dropped, and waiting requests may join before the next step.

Each request's tokens are handed to its consumer as they are chosen (for streaming). A row's computation does
not depend on the other rows beyond float rounding of batched matrix products, so a greedy request gets the
tokens it would get alone.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..generation import SamplingOptions, stop_ids
from ..multi import per_row_adapters


@dataclass
class Request:
    """One generation: prompt tokens, which adapter (None: the base), how to choose tokens, when to stop."""

    prompt: list[int]
    adapter: str | None
    options: SamplingOptions
    stop: list[str] = field(default_factory=list)
    on_token: Callable[[int | None, str | None], None] | None = None  # (token, None) per token; (None, reason) at end
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False  # set by the consumer (a client that went away): the row leaves at the next step


@dataclass
class _Row:
    request: Request
    cache: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys [1, heads, L, d], values)
    length: int  # tokens in the cache
    generated: list[int]
    generator: torch.Generator | None


class Engine:
    """The batching loop over one model (see the module docstring). ``submit`` is thread-safe."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, context: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size = max_batch_size
        self.context = context or getattr(model.config, "max_position_embeddings", None)
        self.stops = set(stop_ids(model, tokenizer))
        self.device = next(model.parameters()).device
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: list[_Row] = []
        self.steps = 0  # batched decode forwards so far (for /health and tests)
        self.peak_batch = 0  # the most rows one decode forward has served
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- control ---------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Run the loop (:meth:`run`) in a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="dorafit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for row in self.active:  # whatever is left ends as cancelled
            self._finish(row, "cancelled")
        self.active = []
        while not self.waiting.empty():
            self._end(self.waiting.get_nowait(), "cancelled")

    def submit(self, request: Request) -> None:
        self.waiting.put(request)

    def load(self) -> dict:
        return {"active": len(self.active), "waiting": self.waiting.qsize(), "decode_steps": self.steps,
                "peak_batch": self.peak_batch}

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The batching loop, in the calling thread, until :meth:`stop` is called or ``until()`` is true.

        On CPU, run it in the thread that loaded the model (the main thread): the same decoding ran markedly slower
        in another thread (benchmarks/serving.py: batched / one-at-a-time 1.44x-1.61x at 8 requests with the loop
        in a thread, 2.03x in the main thread). ``dorafit serve`` runs it there and its HTTP server in a thread."""
        while not self._stop.is_set() and not (until is not None and until()):
            try:
                self._join()
                if not self.active:
                    try:
                        self.waiting.put(self.waiting.get(timeout=0.05))  # sleep until a request comes
                    except queue.Empty:
                        pass
                    continue
                self._decode()
            except Exception as exc:  # noqa: BLE001 - end every request with the error rather than hang
                self.error = exc
                for row in self.active:
                    self._finish(row, "error")
                self.active = []

    @torch.no_grad()
    def _join(self) -> None:
        while len(self.active) < self.max_batch_size:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                return
            ids = torch.tensor([request.prompt], device=self.device)
            with per_row_adapters(self.model, [request.adapter]):
                out = self.model(input_ids=ids, use_cache=True)
            cache = [(layer.keys, layer.values) for layer in out.cache.layers]
            generator = None
            if not request.options.greedy:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(request.options.seed if request.options.seed is not None
                                      else int(time.time_ns()) & 0x7FFFFFFF)
            row = _Row(request, cache, len(request.prompt), [], generator)
            if not self._take(row, out.logits[0, -1]):
                self.active.append(row)

    @torch.no_grad()
    def _decode(self) -> None:
        from transformers import DynamicCache

        rows = self.active
        longest = max(r.length for r in rows)
        layers = []
        for i in range(len(rows[0].cache)):
            keys = torch.cat([F.pad(r.cache[i][0], (0, 0, longest - r.length, 0)) for r in rows])  # (B, h, L, d)
            values = torch.cat([F.pad(r.cache[i][1], (0, 0, longest - r.length, 0)) for r in rows])
            layers.append((keys, values))
        cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        mask = torch.zeros(len(rows), longest + 1, dtype=torch.long, device=self.device)  # (B, L + 1)
        for i, r in enumerate(rows):
            mask[i, longest - r.length:] = 1
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        with per_row_adapters(self.model, [r.request.adapter for r in rows]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True)
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        still = []
        for i, r in enumerate(rows):
            pad = longest - r.length
            r.cache = [(layer.keys[i : i + 1, :, pad:], layer.values[i : i + 1, :, pad:])
                       for layer in out.cache.layers]
            r.length += 1
            if not self._take(r, out.logits[i, -1]):
                still.append(r)
        self.active = still

    # ---- choosing tokens and stopping ------------------------------------------------------------------------
    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        options = row.request.options
        if options.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / options.temperature, dim=-1)
        if options.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < options.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _take(self, row: _Row, logits: torch.Tensor) -> bool:
        """Choose the row's next token and hand it over; True if the row has finished."""
        request = row.request
        if request.cancelled:
            return self._finish(row, "cancelled")
        token = self._choose(row, logits)
        if token in self.stops:
            return self._finish(row, "stop")
        row.generated.append(token)
        if request.on_token:
            request.on_token(token, None)
        if request.stop:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            if any(s in text for s in request.stop):
                return self._finish(row, "stop")
        if len(row.generated) >= request.options.max_new_tokens:
            return self._finish(row, "length")
        if self.context and row.length + 1 >= self.context:
            return self._finish(row, "length")
        return False

    def _finish(self, row: _Row, reason: str) -> bool:
        self._end(row.request, reason)
        return True

    @staticmethod
    def _end(request: Request, reason: str) -> None:
        if request.on_token:
            request.on_token(None, reason)
