"""``dorafit eval RUN``: re-evaluate a finished run's adapter (or fully fine-tuned model) on its test data."""

from __future__ import annotations

import argparse

from .common import add_compute_arguments
from .merge import add_dtype_argument


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="re-evaluate a run's trained adapter on its test data",
        description="Rebuild a run's model (base model + RUN/adapter, or RUN/model for full fine-tuning), evaluate "
        "it on the run's test data and print the task's metrics per test set (accuracy; for instruction tuning: "
        "held-out loss, perplexity, ROUGE-L and exact match of greedy generations).",
    )
    parser.add_argument("run", metavar="RUN", help="a run folder written by dorafit train")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="at most this many test examples per test set (default: the run's own setting)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: the run's)")
    add_compute_arguments(parser, device=None)
    add_dtype_argument(parser)
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the result to FILE (JSON)")
    parser.add_argument("--samples", metavar="FILE", default=None,
                        help="generative tasks: also write the (prompt, reference, generated) samples to FILE (JSONL)")
    parser.set_defaults(func=main)


def _check(args) -> None:
    from ..fields import problem

    for name, value in (("eval_limit", args.eval_limit), ("batch_size", args.batch_size)):
        why = problem(int, False, True, {"minimum": 1}, value)
        if why:
            raise ValueError(f"--{name.replace('_', '-')} {why}, got {value}")


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        import json
        from pathlib import Path

        from ..files import atomic_write_json, atomic_write_text
        from ..train.evaluate import evaluate
        from ..train.report import show_progress
        from ..train.setup import load_trained

        _check(args)
        setup = load_trained(Path(args.run), args.device, args.threads, args.dtype)
        cfg = setup.cfg
        limit = args.eval_limit if args.eval_limit is not None else cfg.eval_limit
        result, samples = evaluate(setup.task, setup.model, setup.device, limit,
                                   args.batch_size or cfg.eval_batch_size, show_progress())
        print(f"{args.run} ({cfg.method} on {cfg.model}, {cfg.task}):")
        print(setup.task.format_result(result))
        if args.json:
            atomic_write_json(args.json, result)
        if args.samples:
            atomic_write_text(args.samples, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        return 0

    return report_errors(command)

