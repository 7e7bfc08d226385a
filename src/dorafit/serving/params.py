"""The request body: strict JSON, and every OpenAI request parameter honoured or refused by name.

Each parameter of OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` is in exactly one of these sets:

- honoured: the server implements it (``HONOURED``);
- no effect on the answer, accepted and not used, as OpenAI itself does with ``user`` (``NO_EFFECT``);
- not implemented: accepted only with its neutral value (``NEUTRAL_ONLY``: e.g. ``frequency_penalty`` 0,
  ``response_format`` ``{"type": "text"}``, ``tools`` empty), any other value is a 400 naming the parameter.

Any other name is a 400 ``unknown parameter`` naming it: nothing a client sends is silently dropped. ``null`` is
the same as leaving a parameter out. The budget of a request (:func:`fit_to_context`): an explicit ``max_tokens``
with the prompt must fit the model's context (else a 400 saying how many tokens are left, as OpenAI and vLLM do);
the server's default ``max_tokens`` is capped to what the context leaves.
"""

from __future__ import annotations

import dataclasses
import json
import math

from ..generation import SamplingOptions
from .errors import ApiError

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n"}
HONOURED = {
    "completions": COMMON | {"prompt", "logprobs", "echo"},
    "chat": COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"},
}
NO_EFFECT = {
    "completions": {"user"},
    "chat": {"user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls"},
}
NO_PENALTY = ((0,), "penalties are not implemented: send 0 or leave it out")
COMMON_NEUTRAL = {
    "frequency_penalty": NO_PENALTY,
    "presence_penalty": NO_PENALTY,
    "logit_bias": (({},), "is not implemented: send {} or leave it out"),
}
NEUTRAL_ONLY = {
    "completions": {
        **COMMON_NEUTRAL,
        "best_of": ((1,), "is not implemented: send 1 or leave it out (use n for several answers)"),
        "suffix": (("",), "(insertion) is not implemented: leave it out"),
    },
    "chat": {
        **COMMON_NEUTRAL,
        "tools": (([],), "(tool calling) is not implemented: leave it out"),
        "tool_choice": (("none",), "(tool calling) is not implemented: send \"none\" or leave it out"),
        "functions": (([],), "(function calling) is not implemented: leave it out"),
        "function_call": (("none",), "(function calling) is not implemented: send \"none\" or leave it out"),
        "response_format": (({"type": "text"},), "other than {\"type\": \"text\"} is not implemented (no JSON mode)"),
        "modalities": ((["text"],), "other than [\"text\"] is not implemented"),
        "audio": ((), "(audio output) is not implemented: leave it out"),
        "prediction": ((), "(predicted outputs) is not implemented: leave it out"),
        "reasoning_effort": ((), "is not implemented: leave it out"),
        "verbosity": ((), "is not implemented: leave it out"),
        "web_search_options": ((), "(web search) is not implemented: leave it out"),
        "store": ((False,), "is not implemented (this server stores nothing): send false or leave it out"),
    },
}


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object; 400 for anything else: invalid JSON or UTF-8, NaN / Infinity / numbers too large
    for a float (1e999), nesting too deep for the parser, or a JSON value that is not an object."""

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _NotFinite(text)
        return value

    def constant(text: str):
        raise _NotFinite(text)

    try:
        body = json.loads(raw, parse_float=finite, parse_constant=constant)
    except _NotFinite as exc:
        raise ApiError(400, f"the request body holds the number {exc}; JSON numbers must be finite", None,
                       "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", None, "invalid_json") from None
    except (ValueError, UnicodeDecodeError):  # json.JSONDecodeError is a ValueError; so are too-long integers
        raise ApiError(400, "the request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


class _NotFinite(ValueError):
    pass


def check_parameters(body: dict, endpoint: str) -> None:
    """400 naming the first parameter of ``body`` that ``endpoint`` ("completions" or "chat") does not honour."""
    for name, value in body.items():
        if value is None or name in HONOURED[endpoint] or name in NO_EFFECT[endpoint]:
            continue
        if name in NEUTRAL_ONLY[endpoint]:
            accepted, why = NEUTRAL_ONLY[endpoint][name]
            if any(type(value) is type(a) and value == a or _zero(value) and _zero(a) for a in accepted):
                continue
            raise ApiError(400, f"'{name}' {why}; got {json.dumps(value)[:100]}", name, "unsupported_parameter")
        known = sorted(HONOURED[endpoint] | NO_EFFECT[endpoint] | set(NEUTRAL_ONLY[endpoint]))
        raise ApiError(400, f"unknown parameter '{name}'; this endpoint takes: {', '.join(known)}", name,
                       "unknown_parameter")


def _zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def include_usage(body: dict) -> bool:
    """``stream_options.include_usage`` (only with ``"stream": true``, as OpenAI requires)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not body.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed with \"stream\": true", "stream_options",
                       "invalid_value")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' must be {\"include_usage\": true|false}", "stream_options",
                       "invalid_value")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", "stream_options.include_usage",
                       "invalid_value")
    return value


def fit_to_context(options: SamplingOptions, prompt_tokens: int, context: int | None, body: dict) -> SamplingOptions:
    """``options`` with ``max_new_tokens`` fitted to what the context leaves after the prompt: an explicit
    ``max_tokens`` (or ``max_completion_tokens``) that does not fit is a 400; the server's default is capped."""
    if not context or prompt_tokens >= context:  # a prompt that fills the context is refused by the route
        return options
    room = context - prompt_tokens
    if options.max_new_tokens <= room:
        return options
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            raise ApiError(400, f"This model's context is {context} tokens; the prompt has {prompt_tokens}, which "
                           f"leaves {room} for the answer, but '{name}' asks for {options.max_new_tokens}. Lower "
                           f"{name} to at most {room} or shorten the prompt.", name, "context_length_exceeded")
    return dataclasses.replace(options, max_new_tokens=room)
