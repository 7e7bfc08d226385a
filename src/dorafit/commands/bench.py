"""``dorafit bench``: speed and memory of our LoRA and DoRA against the frozen base model and PEFT, side by side.

Everything is measured in one process with the variants interleaved (see :mod:`dorafit.bench`); the table
goes to stdout (Markdown) and the full record to a JSON file under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys

from .common import add_compute_arguments, use_threads

DESCRIPTION = (
    "Measure training-step time, activations saved for backward, peak memory and inference latency of the frozen "
    "base model, dorafit LoRA/DoRA/VeRA/DVoRA and PEFT LoRA/DoRA/VeRA, on a float and a quantized base (QLoRA, "
    "QDoRA), on a LLaMA-shaped model and all-MiniLM-L6-v2."
)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="speed and memory benchmark against PEFT", description=DESCRIPTION)
    p.add_argument("--models", default="llama,minilm", help="comma-separated: llama, minilm (default: both)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the variants (the frozen base always runs): "
                        "lora, dora, dora_full_norm, vera, dvora, peft_lora, peft_dora, peft_vera, and on a "
                        "quantized base qlora, qdora, peft_qlora, peft_qdora (default: all, the quantized ones where "
                        "bitsandbytes is installed; the compile section runs those of lora, dora, peft_dora)")
    p.add_argument("--quantize", default="nf4", choices=["nf4", "fp4", "int8"],
                   help="the quantized variants' base (bitsandbytes; default: nf4)")
    p.add_argument("--sections", default="standard",
                   help="comma-separated: standard (the variants above), compile (eager and torch.compile side by "
                        "side: base, LoRA, DoRA, PEFT DoRA), memory (DoRA's magnitude gradient saved or recomputed, "
                        "activation checkpointing) (default: standard)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile section (default: inductor)")
    add_compute_arguments(p, device="cpu", devices=None, device_help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--warmup", type=int, default=2, help="rounds run and discarded before timing (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant (default: 5)")
    p.add_argument("--inference-steps", type=int, default=7, help="timed forward passes per variant (default: 7)")
    p.add_argument("--peak-steps", type=int, default=2,
                   help="training steps for the peak-memory measurement, 0 to skip it (default: 2)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc malloc's settings alone (by default freed memory is kept for reuse, see README)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<device>-<date>.json)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("adapter")
    g.add_argument("--r", type=int, default=16, help="rank (default: 16)")
    g.add_argument("--alpha", type=float, default=32.0, help="alpha (default: 32)")
    g.add_argument("--vera-r", type=int, default=256,
                   help="rank of VeRA's and DVoRA's shared random projections (default: 256)")
    g = p.add_argument_group("llama workload (random weights)")
    g.add_argument("--hidden", type=int, default=1024)
    g.add_argument("--intermediate", type=int, default=2816)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--vocab", type=int, default=32000, help="default: LLaMA-2's 32,000")
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--seq", type=int, default=256)
    g = p.add_argument_group("greedy generation (llama workload)")
    g.add_argument("--generation-steps", type=int, default=3,
                   help="timed generate calls per variant, 0 to skip generation (default: 3)")
    g.add_argument("--gen-batch", type=int, default=1, help="prompts generated at once (default: 1)")
    g.add_argument("--gen-prompt", type=int, default=64, help="prompt tokens (default: 64)")
    g.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per prompt (default: 32)")
    g = p.add_argument_group("minilm workload (all-MiniLM-L6-v2)")
    g.add_argument("--minilm-batch", type=int, default=32, help="even: the loss pairs the two halves (default: 32)")
    g.add_argument("--minilm-seq", type=int, default=128)
    p.set_defaults(func=lambda args: run(args, p))


def _names(option: str, value: str, known) -> tuple[str, ...]:
    """A comma-separated option's names, each one of ``known``; otherwise an error listing them."""
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names or any(v not in known for v in names):
        raise SystemExit(f"dorafit bench: --{option} takes a comma-separated list of {', '.join(known)}; "
                         f"got {value!r}")
    return names


def _variants(args) -> tuple[str, ...] | None:
    from dorafit.bench.models import INFERENCE_VARIANTS, TRAIN_VARIANTS, train_variants

    if args.variants is None:
        return None
    known = sorted(set(TRAIN_VARIANTS + INFERENCE_VARIANTS) - {"base", "dora_merged"})
    names = _names("variants", args.variants, known)
    missing = [v for v in names if v in TRAIN_VARIANTS and v not in train_variants()]
    if missing:
        raise SystemExit(f"dorafit bench: --variants {', '.join(missing)} need bitsandbytes: scripts/bootstrap quant")
    return names


def _sections(args) -> tuple[str, ...]:
    from dorafit.bench.suite import SECTIONS

    return _names("sections", args.sections, SECTIONS)


def _check(args) -> list[str]:
    import torch

    from dorafit.bench.models import MODELS

    models = list(_names("models", args.models, MODELS))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("dorafit bench: --device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise SystemExit(f"dorafit bench: --device must be cpu or cuda[:N], got {args.device!r}")
    for name in ("steps", "inference_steps", "r", "vera_r", "gen_batch", "gen_prompt", "gen_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"dorafit bench: --{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "peak_steps", "generation_steps"):
        if getattr(args, name) < 0:
            raise SystemExit(f"dorafit bench: --{name.replace('_', '-')} must not be negative")
    return models


def _command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """``dorafit bench`` with every option that differs from its default: how to reproduce this run."""
    words = ["dorafit", "bench"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value != action.default:
            words += [action.option_strings[0]] + ([] if isinstance(value, bool) else [str(value)])
    return shlex.join(words)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    models = _check(args)
    variants = _variants(args)
    sections = _sections(args)
    from dorafit.bench import measure, report
    from dorafit.bench.models import WorkloadSpec, llama_sizes
    from dorafit.bench.suite import run_workload

    kept = False if args.system_malloc else measure.keep_freed_memory()
    use_threads(args)
    common = dict(r=args.r, alpha=args.alpha, vera_r=args.vera_r, device=args.device, dtype=args.dtype, seed=args.seed,
                  quantize=args.quantize)
    specs = {
        "llama": WorkloadSpec(model="llama", batch=args.batch, seq=args.seq, sizes=llama_sizes(
            args.hidden, args.intermediate, args.layers, args.heads, args.vocab), **common),
        "minilm": WorkloadSpec(model="minilm", batch=args.minilm_batch, seq=args.minilm_seq, **common),
    }
    meta = {**report.machine(), "device": args.device, "dtype": args.dtype, "malloc_keeps_freed_memory": kept,
            "command": _command_line(args, parser),
            "load_average_start": report.load_average()}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    generation = dict(repeats=args.generation_steps, batch=args.gen_batch, prompt=args.gen_prompt,
                      new_tokens=args.gen_tokens)
    workloads = {}
    for name in models:
        result = run_workload(specs[name], args.warmup, args.steps, args.inference_steps, args.peak_steps,
                              args.threads or 0, log, variants, sections, args.compile_backend, generation)
        result["ratios"] = report.ratios(result)
        workloads[name] = result
    meta["load_average_end"] = report.load_average()
    record = {"meta": meta, "workloads": workloads}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = report.write_json(record, args.out or f"benchmarks/results/{args.device.replace(':', '')}-{stamp}.json")
    print(report.markdown(record))
    log(f"wrote {path}")
    return 0
