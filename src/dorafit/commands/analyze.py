"""``dorafit analyze RUN [RUN ...] --out DIR``: the weight-decomposition analysis (DoRA paper, Figure 2) of runs.

Reads the snapshots a run kept with ``dorafit train --save-every N`` and, per adapted layer and snapshot step,
computes the magnitude change dM and direction change dD of the layer's weight against the pretrained weight
(see :mod:`dorafit.analysis`). Writes ``DIR/decomposition.csv`` (one row per run, step and layer),
``DIR/decomposition.png`` (one panel per method, dD on x, dM on y, fitted slope and correlation) and
``DIR/summary.json`` (slope and correlation per method, next to the paper's).
"""

from __future__ import annotations

import argparse

from .common import add_compute_arguments, use_threads

EPILOG = """\
examples:
  dorafit train --method full --lr 2e-5 --save-every 25 --out runs/ft
  dorafit train --method lora --save-every 25 --out runs/lora
  dorafit train --method dora --save-every 25 --out runs/dora
  dorafit analyze runs/ft runs/lora runs/dora --out runs/analysis --modules query value
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="magnitude / direction change of the weights over training (the paper's Figure 2)",
        description="Weight-decomposition analysis of runs trained with --save-every: for every snapshot step and "
        "adapted layer, the mean magnitude change dM = mean_j | ||W_t[j]|| - ||W0[j]|| | and direction change "
        "dD = mean_j (1 - cos(W_t[j], W0[j])) over output units j, against the pretrained weight W0 (LoRA/DoRA: the "
        "merged weight). Writes decomposition.csv, decomposition.png and summary.json into --out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by dorafit train --save-every N")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for the CSV, the PNG and summary.json")
    parser.add_argument("--modules", nargs="+", metavar="NAME", default=None,
                        help="analyse only these modules (names or name suffixes, e.g. query value; default: every "
                        "module the snapshots hold)")
    parser.add_argument("--label", nargs="+", metavar="TEXT", default=None,
                        help="one panel label per RUN (default: the run's method; runs with the same label share a "
                        "panel)")
    parser.add_argument("--title", default="", help="title over the panels")
    add_compute_arguments(parser, device="cpu")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        from pathlib import Path

        from ..analysis import analyze_runs

        if args.label is not None and len(args.label) != len(args.runs):
            raise ValueError(f"--label needs one label per run: {len(args.runs)} runs, {len(args.label)} labels")
        use_threads(args)
        summary = analyze_runs([Path(r) for r in args.runs], Path(args.out), modules=args.modules,
                               labels=args.label, title=args.title, device=args.device)
        for label, s in summary["methods"].items():
            paper = f" (paper {s['paper_correlation']:+.2f})" if s.get("paper_correlation") is not None else ""
            fit = "(no fit: too few distinct points)" if s["correlation"] is None else \
                f"slope {s['slope']:.4g}  correlation {s['correlation']:+.3f}{paper}"
            print(f"  {label:<12} {s['points']:4d} points  {fit}")
        print(f"wrote {Path(args.out).resolve()}/{{decomposition.csv, decomposition.png, summary.json}}")
        return 0

    return report_errors(command)
