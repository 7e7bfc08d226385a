"""Handing freed memory back to the system."""

from __future__ import annotations

import ctypes
import gc


def return_freed_memory() -> None:
    """Collect garbage, then ask glibc to give free heap pages back (``malloc_trim(0)``): glibc otherwise keeps
    freed heap memory for its own reuse, and the process stays as large as it ever was. Elsewhere: only the
    collection."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
