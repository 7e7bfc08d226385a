"""The ``dorafit`` command line: one sub-command per module under :mod:`dorafit.commands`.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code). Command modules import heavy libraries
(torch, transformers) only inside ``func``: ``dorafit --help``, ``--version`` and ``dorafit COMMAND --help`` import
neither.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

# sub-command modules under dorafit.commands, in the order `dorafit --help` lists them
COMMANDS = ("train", "eval", "generate", "chat", "serve", "merge", "export", "analyze", "bench")


#: loggers of libraries that transformers imports when they are installed (torchao, with the quant extra), whose
#: import-time warnings (missing GPU kernels, deprecations) and per-call notes (int8 casts) say nothing about the
#: user's run
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.autograd._functions")


def quiet_imports() -> None:
    """Before the libraries are imported: torchao, for one, logs at import that it cannot load its CUDA kernels
    (``Failed to load ..._C_cutlass_90a.abi3.so``), which on a CPU-only torch is expected and harmless."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def progress_bars_on_terminal_only() -> None:
    """Progress bars only where stderr is a terminal (or with DORAFIT_PROGRESS=1, as dorafit's own bars): in a log
    file every redraw of a bar would be kept. Off through the libraries' own switches (tqdm's ``TQDM_DISABLE``,
    huggingface_hub's ``HF_HUB_DISABLE_PROGRESS_BARS``, which transformers' bars follow), set before they are
    imported, and transformers' switch where it already is."""
    if sys.stderr.isatty() or os.environ.get("DORAFIT_PROGRESS") == "1":
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


#: glibc's mallopt parameters, and the values :func:`return_large_blocks` sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 64 << 10
TRIM_THRESHOLD_BYTES = 4 << 20


def return_large_blocks() -> None:
    """glibc only (elsewhere nothing): blocks of 64 KiB and more (a tensor of 16 K float32 values) are mapped
    on their own and handed back to the system when freed, and free heap above 4 MiB is trimmed.

    By default glibc raises its mapping threshold to the largest block freed so far (up to 32 MiB), after
    which a layer's temporaries (an upcast block of a weight, a layer's activations) come from the heap, and the
    heap keeps what was freed for reuse: the process's resident set grows by whatever the largest step of a
    load or a training step left behind, and blocks freed between live ones stay as holes (adding DoRA, 17 MiB of
    adapter tensors, to the 110 nf4 layers of a TinyLlama-shaped model grew the process by 59 MiB with a 1 MiB
    threshold, by 21 MiB with 256 KiB; a one-step bfloat16 run of that model peaked 20 MiB lower with 64 KiB and
    a 4 MiB trim threshold than with 256 KiB and 32 MiB: docs/quantized.md). A user's own
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` are left as they are."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            return
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: an unknown argument is reported with the sub-command's usage line (argparse leaves
    unknown arguments to the top-level parser, whose usage says nothing about the sub-command's options)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="dorafit", description="Fine-tune pretrained models with LoRA, DoRA and their relatives."
    )
    parser.add_argument("--version", action="version", version=f"dorafit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for name in COMMANDS:
        importlib.import_module(f"dorafit.commands.{name}").register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM outside the training steps (which stop gracefully on their own)."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    return_large_blocks()
    quiet_imports()
    parser = build_parser()
    args = parser.parse_args(argv)
    progress_bars_on_terminal_only()
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
