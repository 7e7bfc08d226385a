"""What the sub-commands that compute share, declared once: ``--device`` and ``--threads``.

Every command that runs a model (train through its options, eval, generate, chat, serve, merge, export, analyze,
bench) takes both. ``--threads N`` sets torch's CPU threads (``torch.set_num_threads``) before the command computes;
torch's default is one per core, which stalls when other processes keep the cores busy, so on a shared machine
give ``--threads 1``. This module imports no torch: ``dorafit --help`` stays fast.
"""

from __future__ import annotations

import argparse

#: the devices a run folder's model can be rebuilt on (as ``dorafit train --device``)
RUN_DEVICES = ("auto", "cpu", "cuda")
THREADS_HELP = ("CPU threads for torch (default: torch's choice, one per core; give 1 on a machine other jobs keep "
                "busy)")


def threads_count(text: str) -> int:
    """``--threads``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def add_compute_arguments(parser: argparse.ArgumentParser, device: str | None = "auto",
                          devices: tuple[str, ...] | None = RUN_DEVICES, device_help: str | None = None) -> None:
    """``--device`` (one of ``devices``, or free text the command checks, e.g. ``cuda:1``, with ``devices=None``;
    default ``device``, None: the run's own) and ``--threads``."""
    default = "the run's" if device is None else device
    about = device_help or ("where to compute: " + ", ".join(devices) if devices else "where to compute")
    parser.add_argument("--device", choices=devices, default=device, help=f"{about} (default: {default})")
    parser.add_argument("--threads", type=threads_count, default=None, metavar="N", help=THREADS_HELP)


def use_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (nothing without it)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
