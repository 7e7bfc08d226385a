"""Adapters loaded and unloaded while the server runs (vLLM's routes), when ``dorafit serve --adapter-root DIR``:

    POST /v1/load_lora_adapter    {"lora_name": NAME, "lora_path": PATH}   -> 200 {"id": NAME, "object": "model", ...}
    POST /v1/unload_lora_adapter  {"lora_name": NAME}                      -> 200 {"id": NAME, "deleted": true}

``lora_path`` (absolute, or relative to the root) is a run folder of ``dorafit train``, a dorafit adapter folder or
a PEFT adapter folder, of any method (LoRA, DoRA, VeRA, DVoRA), trained on the served base. It must lie under the
root, and so must everything in it, symlinks resolved: a path or a link leading outside is refused (403). Without
``--adapter-root`` these routes do not exist (404).

The model is changed in the engine's thread between two decode steps (:meth:`Engine.call_between_steps`), never
during a forward. A loaded adapter answers to ``model: NAME`` exactly as one given with ``--adapter`` at start.
Unloading first stops routing new requests to the name (they get 404, as does one that named it while its prompt
was being tokenized: the routes look again before handing it to the engine), then waits until no request in
flight uses it, then removes it from the model.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest

from .errors import ApiError
from .load import NAME
from .params import parse_json

POLL_S = 0.05  # how often an unload looks again whether requests still use the adapter


def outside_root(path: Path, root: Path) -> Path | None:
    """The first of ``path`` and everything under it that resolves (symlinks followed) outside ``root``, or None.
    Linked folders are walked into too (each real folder once, so link cycles end)."""
    if not path.resolve().is_relative_to(root):
        return path
    folders, seen = [path], set()
    while folders:
        folder = folders.pop()
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        for entry in sorted(folder.iterdir()):
            if not entry.resolve().is_relative_to(root):
                return entry
            if entry.is_dir():
                folders.append(entry)
    return None


def unreadable(given: str, exc: OSError) -> ApiError:
    """A 400 for a ``lora_path`` the file system refuses (its reason, not the server's paths)."""
    return ApiError(400, f"'lora_path' {given!r} cannot be read: {exc.strerror or type(exc).__name__}", "lora_path",
                    "invalid_value")


async def between_steps(served, fn):
    """``fn()`` run in the engine's thread between two steps; a 503 if the server shuts down before it runs."""
    future = served.engine.call_between_steps(fn)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if not future.cancelled():  # this request itself was cancelled
            raise
        raise ApiError(503, "the server is shutting down; no adapter was loaded or unloaded", None,
                       "shutting_down") from None


def install_adapter_routes(app: FastAPI, served, root: Path) -> None:
    """Add the two routes of the module docstring to ``app``, for adapters under ``root``."""
    root = root.resolve()
    busy: set[str] = set()  # names being loaded or unloaded now

    async def read(http: HttpRequest, *names: str) -> list[str]:
        body = parse_json(await http.body())
        unknown = set(body) - set(names)
        if unknown:
            first = min(unknown)
            raise ApiError(400, f"unknown parameter '{first}'; this route takes: {', '.join(names)}", first,
                           "unknown_parameter")
        for name in names:
            if not isinstance(body.get(name), str) or not body[name]:
                raise ApiError(400, f"'{name}' must be a non-empty string", name, "invalid_value")
        return [body[name] for name in names]

    def claim(name: str) -> None:
        if name in busy:
            raise ApiError(409, f"the adapter '{name}' is being loaded or unloaded by another request; retry",
                           "lora_name", "conflict")
        busy.add(name)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(http: HttpRequest):
        name, given = await read(http, "lora_name", "lora_path")
        if not NAME.match(name):
            raise ApiError(400, f"'lora_name' {name!r}: use letters, digits and . _ : / - (starting with a letter "
                           "or digit)", "lora_name", "invalid_value")
        if name == served.base_name or name in served.adapters:
            raise ApiError(400, f"the name '{name}' is taken (by the base model or a loaded adapter); unload it "
                           "first or choose another", "lora_name", "name_taken")
        try:
            path = (root / given).resolve()  # an absolute lora_path stays as it is
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a link loop
            raise ApiError(400, f"'lora_path' {given!r}: {exc}", "lora_path", "invalid_value") from None
        if not path.is_relative_to(root):
            raise ApiError(403, f"'lora_path' {given!r} is outside the adapter root of this server; put the adapter "
                           "under the folder given with --adapter-root", "lora_path", "path_outside_root")
        try:
            folder = path.is_dir()
        except OSError as exc:  # a name too long for the file system, a folder it may not read
            raise unreadable(given, exc) from None
        if not folder:
            raise ApiError(400, f"'lora_path' {given!r} is not a folder under the adapter root", "lora_path",
                           "invalid_value")
        claim(name)
        try:
            try:
                escaped = await asyncio.to_thread(outside_root, path, root)
            except OSError as exc:
                raise unreadable(given, exc) from None
            if escaped is not None:
                shown = escaped.relative_to(path)
                raise ApiError(403, f"'lora_path' {given!r} holds {str(shown)!r}, a link to outside the adapter root; "
                               "copy the files instead", "lora_path", "path_outside_root")
            try:
                folder, fmt = served.loader.source(name, path)
                await between_steps(served, lambda: served.loader.load(name, folder))
            except (ValueError, OSError) as exc:  # AdapterFileError and PeftFormatError are ValueErrors
                message = (str(exc).replace(f"--adapter {name}={path}", f"'lora_path' {given!r}")  # no server paths
                           .replace(str(served.loader.base_folder), served.base_name).replace(str(root), ""))
                raise ApiError(400, message, "lora_path", "invalid_adapter") from None
            served.formats[name], served.adapters[name] = fmt, given
        finally:
            busy.discard(name)
        return {"id": name, "object": "model", "owned_by": "dorafit", "parent": served.base_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(http: HttpRequest):
        (name,) = await read(http, "lora_name")
        if name not in served.adapters:
            raise ApiError(404, f"no adapter named '{name}' is loaded", "lora_name", "model_not_found")
        claim(name)
        try:
            source = served.adapters.pop(name)  # new requests naming it get 404 from now on
            fmt = served.formats.pop(name)
            try:
                while not await between_steps(served, lambda: _unload_if_idle(served, name)):
                    await asyncio.sleep(POLL_S)
            except BaseException:
                served.adapters[name], served.formats[name] = source, fmt  # still in the model: keep serving it
                raise
        finally:
            busy.discard(name)
        return {"id": name, "object": "model", "deleted": True}


def _unload_if_idle(served, name: str) -> bool:
    """In the engine's thread: unload ``name`` unless a request in flight (running or waiting) still uses it."""
    engine = served.engine
    with engine.waiting.mutex:
        waiting = [r.adapter for r in engine.waiting.queue]
    if name in waiting or any(row.request.adapter == name for row in engine.prefilling + engine.active):
        return False
    served.loader.unload(name)
    return True
