"""``dorafit merge RUN --out DIR``: a standalone model folder with the adapter folded into the weights."""

from __future__ import annotations

import argparse

from .common import add_compute_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge", help="write a run's model with the adapter merged in, as a plain transformers folder",
        description="Fold a run's adapter into the base weights (W' = m/n * (W0 + dW) for DoRA, W0 + dW for LoRA) and "
        "save the model and tokenizer with save_pretrained. The folder loads with plain transformers, with no dorafit "
        "needed, and costs exactly what the base model costs. Afterwards the folder is loaded back and its "
        "predictions are checked against the adapted model's on a few test examples.",
    )
    parser.add_argument("run", metavar="RUN", help="a run folder written by dorafit train")
    parser.add_argument("--out", metavar="DIR", required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--check", type=int, default=16, metavar="N",
                        help="compare the merged and the adapted model on N test examples (0: skip; default: 16)")
    add_compute_arguments(parser, device="cpu")
    add_dtype_argument(parser, "the merged weights' dtype (each merged in float32, then cast once): auto, float32, "
                       "bfloat16 or float16 (default: the run's --dtype)")
    parser.set_defaults(func=main)


def add_dtype_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--dtype``: the dtype a run's base model is loaded in, for the commands that read a run folder."""
    from ..train.options import DTYPES

    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help=help or "the base model's dtype: auto (bfloat16 on a CUDA GPU that supports it, float32 "
                        "on a CPU), float32, bfloat16 or float16 (default: the run's --dtype)")


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        from pathlib import Path

        from ..train.merge import merge_run

        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not an empty folder; choose another --out or remove it")
        merge_run(Path(args.run), out, check=args.check, device=args.device, threads=args.threads, dtype=args.dtype)
        print(f"merged model folder: {out.resolve()}")
        return 0

    return report_errors(command)
