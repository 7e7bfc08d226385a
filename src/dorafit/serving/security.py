"""Access control and body limits of ``dorafit serve``: an ASGI middleware in front of every route.

In this order, before a route sees the request:

1. **API key** (when one is set: ``--api-key`` or ``DORAFIT_API_KEY``): every route but ``GET /health`` needs
   ``Authorization: Bearer KEY`` (compared in constant time); otherwise 401.
2. **Content type**: a POST, PUT or PATCH body must be ``application/json`` (parameters such as ``charset`` allowed);
   otherwise 415. A web page can make a browser send a ``text/plain`` POST to a localhost server without asking
   (a CORS "simple request"); a JSON body needs a CORS preflight, which this server never grants.
3. **Body size**: a body over ``max_body`` bytes is answered 413 without reading the rest: at once when its
   ``Content-Length`` says so, else as soon as the bytes received pass the limit (chunked uploads). A body within
   the limit is handed to the route as it came.

Every refusal is OpenAI's error body (:mod:`.errors`).
"""

from __future__ import annotations

import hmac
import math
import re
from dataclasses import dataclass

from starlette.datastructures import Headers

from .errors import ApiError

OPEN = {("GET", "/health")}  # routes that never need the key (a load balancer's health check)
KEY_CHARS = re.compile(r"^[!-~]+$")  # visible ASCII: what a client can send after 'Bearer ' in a header


@dataclass(frozen=True)
class Guard:
    """What the middleware enforces: the API key (None: none needed) and the largest body, in bytes."""

    api_key: str | None = None
    max_body: int = 4 * 1024 * 1024  # dorafit serve --max-body-mb's default

    @classmethod
    def from_options(cls, api_key: str | None, key_source: str, max_body_mb: float) -> Guard:
        """The guard of ``--api-key`` (None: no key; named ``key_source`` in errors) and ``--max-body-mb``; a
        ValueError for a key no client can send (empty, spaces, non-ASCII: every request would be refused, or an
        empty one would leave the server open) or a limit that is not a finite size of at least one byte."""
        if api_key is not None and not KEY_CHARS.match(api_key):
            raise ValueError(f"{key_source}: an API key must be one or more visible ASCII characters (no spaces), "
                             "e.g. the output of: python -c 'import secrets; print(secrets.token_urlsafe())'")
        if not (math.isfinite(max_body_mb) and max_body_mb * 1024 * 1024 >= 1):
            raise ValueError(f"--max-body-mb must be a finite number of MB, at least one byte, got {max_body_mb:g}")
        return cls(api_key, int(max_body_mb * 1024 * 1024))


class GuardMiddleware:
    """The checks of the module docstring, as pure ASGI (nothing of a refused body is read past the limit)."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            self._authorize(scope, headers)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._bounded_body(headers, receive)
        except ApiError as exc:
            return await exc.response()(scope, receive, send)
        return await self.app(scope, receive, send)

    def _authorize(self, scope, headers: Headers) -> None:
        key = self.guard.api_key
        if key is None or (scope["method"], scope["path"]) in OPEN:
            return
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            what = "no API key" if not given else "a wrong API key"
            raise ApiError(401, f"This server needs an API key: the request has {what}. Send the header "
                           "'Authorization: Bearer KEY' (the openai client's api_key).", None, "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})

    async def _bounded_body(self, headers: Headers, receive):
        """The body read in full within the limit, as a ``receive`` that replays it; else a 413 or 415."""
        kind = headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"The body must be JSON with 'Content-Type: application/json', not "
                           f"{kind or 'none'!r}", None, "unsupported_media_type")
        limit = self.guard.max_body
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise self._too_large(length)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return _replay(b"", receive, message)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise self._too_large(None)
            more = message.get("more_body", False)
        return _replay(b"".join(chunks), receive)

    def _too_large(self, length: str | None) -> ApiError:
        mb = self.guard.max_body / 1024 / 1024
        told = f" (Content-Length {length})" if length is not None else ""
        return ApiError(413, f"The request body is larger than this server's limit of {mb:.3g} MB{told}; send less, "
                        "or start the server with a larger --max-body-mb", None, "request_too_large",
                        {"Connection": "close"})


def _replay(body: bytes, receive, first=None):
    """A ``receive`` that gives ``first`` (or the whole ``body``) once, then whatever the client sends next (its
    disconnect, which routes poll to cancel the work of a client that went away)."""
    given = False

    async def replay():
        nonlocal given
        if not given:
            given = True
            return first or {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
