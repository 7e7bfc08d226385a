"""Starting and stopping a ``dorafit serve`` subprocess for the server tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time


def start_server(*args, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``dorafit serve ARGS`` in a subprocess and its base URL (``http://127.0.0.1:PORT/v1``), once it says it is
    serving; its log is drained on a thread from then on (a full pipe would stall the server)."""
    command = [sys.executable, "-m", "dorafit", "serve", *map(str, args)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url, deadline = None, time.monotonic() + 120
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", proc.stderr.readline())
        url = found.group(1) if found else None
    assert url, f"the server did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, url


def stop_server(proc: subprocess.Popen, within_s: float | None = None) -> None:
    """SIGTERM, then check the server exited with status 0 (and, with ``within_s``, within that many seconds)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 0, "a clean exit on SIGTERM"
    if within_s is not None:
        assert time.monotonic() - started < within_s, "a prompt exit on SIGTERM"
