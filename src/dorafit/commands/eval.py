"""``dorafit eval RUN``: re-evaluate a finished run's adapter (or fully fine-tuned model) on its test data."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="re-evaluate a run's trained adapter on its test data",
        description="Rebuild a run's model (base model + RUN/adapter, or RUN/model for full fine-tuning), evaluate "
        "it on the run's test data and print accuracy per task and the average.",
    )
    parser.add_argument("run", metavar="RUN", help="a run folder written by dorafit train")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="at most this many test examples per task (default: the run's own setting)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: the run's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: the run's")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the result to FILE (JSON)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        from pathlib import Path

        from ..files import atomic_write_json
        from ..train.evaluate import evaluate
        from ..train.run import format_accuracy, load_trained, show_progress

        import torch

        setup = load_trained(Path(args.run), args.device)
        if args.threads:  # after loading: the run's own --threads was applied there
            torch.set_num_threads(args.threads)
        cfg = setup.cfg
        limit = args.eval_limit if args.eval_limit is not None else cfg.eval_limit
        result = evaluate(setup.task, setup.model, setup.device, limit, args.batch_size or cfg.eval_batch_size,
                          show_progress())
        print(f"test accuracy of {args.run} ({cfg.method} on {cfg.model}, {cfg.task}):")
        print(format_accuracy(result))
        if args.json:
            atomic_write_json(args.json, result)
        return 0

    return report_errors(command)
