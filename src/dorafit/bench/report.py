"""The benchmark's ratios, its Markdown table and its JSON record."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

import dorafit

from ..files import atomic_write_json
from .activation import markdown as memory_markdown
from .compiled import markdown as compile_markdown
from .tables import _fmt, ratio_table, table_ratios

# (key, label, section, numerator, denominator, target: the ratio must be <= it, or None)
# section "train" ratios compare step_ms, "saved" saved_mib, "peak" peak_mib, "inference" latency_ms.
RATIOS = [
    ("dora_vs_lora_step", "our DoRA step / our LoRA step", "train", "dora", "lora", 1.10),
    ("dora_vs_peft_dora_step", "our DoRA step / PEFT DoRA step", "train", "dora", "peft_dora", 0.85),
    ("lora_vs_peft_lora_step", "our LoRA step / PEFT LoRA step", "train", "lora", "peft_lora", None),
    ("peft_dora_vs_peft_lora_step", "PEFT DoRA step / PEFT LoRA step", "train", "peft_dora", "peft_lora", None),
    ("full_norm_vs_detached_step", "our DoRA step, norm not detached / detached", "train", "dora_full_norm", "dora",
     None),
    ("dvora_vs_vera_step", "our DVoRA step / our VeRA step", "train", "dvora", "vera", None),
    ("vera_vs_peft_vera_step", "our VeRA step / PEFT VeRA step", "train", "vera", "peft_vera", None),
    ("qdora_vs_peft_qdora_step", "our QDoRA step / PEFT QDoRA step (same quantized base)", "train", "qdora",
     "peft_qdora", 0.85),
    ("qdora_vs_qlora_step", "our QDoRA step / our QLoRA step", "train", "qdora", "qlora", 1.10),
    ("qlora_vs_peft_qlora_step", "our QLoRA step / PEFT QLoRA step", "train", "qlora", "peft_qlora", None),
    ("qdora_vs_dora_step", "our QDoRA step / our DoRA step on the float base", "train", "qdora", "dora", None),
    ("dora_vs_lora_saved", "our DoRA saved activations / our LoRA", "saved", "dora", "lora", 1.05),
    ("peft_dora_vs_peft_lora_saved", "PEFT DoRA saved activations / PEFT LoRA", "saved", "peft_dora", "peft_lora",
     None),
    ("dora_vs_peft_dora_saved", "our DoRA saved activations / PEFT DoRA", "saved", "dora", "peft_dora", None),
    ("full_norm_vs_detached_saved", "our DoRA saved, norm not detached / detached", "saved", "dora_full_norm", "dora",
     None),
    ("dvora_vs_vera_saved", "our DVoRA saved activations / our VeRA", "saved", "dvora", "vera", None),
    ("vera_vs_peft_vera_saved", "our VeRA saved activations / PEFT VeRA", "saved", "vera", "peft_vera", None),
    ("qdora_vs_peft_qdora_saved", "our QDoRA saved activations / PEFT QDoRA", "saved", "qdora", "peft_qdora", None),
    ("qdora_vs_qlora_saved", "our QDoRA saved activations / our QLoRA", "saved", "qdora", "qlora", None),
    ("dora_vs_lora_peak", "our DoRA peak memory / our LoRA", "peak", "dora", "lora", None),
    ("dora_vs_peft_dora_peak", "our DoRA peak memory / PEFT DoRA", "peak", "dora", "peft_dora", None),
    ("full_norm_vs_detached_peak", "our DoRA peak, norm not detached / detached", "peak", "dora_full_norm", "dora",
     None),
    ("vera_vs_peft_vera_peak", "our VeRA peak memory / PEFT VeRA", "peak", "vera", "peft_vera", None),
    ("qdora_vs_peft_qdora_peak", "our QDoRA peak memory / PEFT QDoRA (same quantized base)", "peak", "qdora",
     "peft_qdora", 0.80),
    ("qdora_vs_dora_peak", "our QDoRA peak memory / our DoRA on the float base", "peak", "qdora", "dora", None),
    ("merged_vs_base_inference", "our merged DoRA inference / base", "inference", "dora_merged", "base", 1.02),
    ("dora_vs_lora_inference", "our unmerged DoRA inference / our unmerged LoRA", "inference", "dora", "lora", 1.10),
    ("peft_dora_vs_dora_inference", "PEFT unmerged DoRA inference / ours", "inference", "peft_dora", "dora", None),
    ("dvora_vs_vera_inference", "our unmerged DVoRA inference / our unmerged VeRA", "inference", "dvora", "vera",
     None),
    # generation: time per generate call; <= 1/0.95 is the target "unmerged tokens/s >= 0.95x the merged model's"
    ("dora_vs_merged_generation", "our unmerged DoRA generation time / merged (tokens/s >= 0.95x merged)",
     "generation", "dora", "dora_merged", round(1 / 0.95, 4)),
    ("lora_vs_merged_generation", "our unmerged LoRA generation time / merged", "generation", "lora", "dora_merged",
     None),
    ("peft_dora_vs_dora_generation", "PEFT unmerged DoRA generation time / ours", "generation", "peft_dora", "dora",
     None),
]
# (key, label, field): the adapters' own saved activations, (DoRA - base) / (LoRA - base), which does not depend
# on how much the frozen model saves. (Not done for time: the base variant backpropagates into the first layer's
# input and the embeddings, which LoRA skips, so LoRA's step can take about as long as the base's.)
OVERHEAD_RATIOS = [
    ("dora_vs_lora_saved_over_base", "our DoRA / our LoRA saved activations above the frozen base", "saved_mib"),
    ("peft_dora_vs_peft_lora_saved_over_base", "PEFT DoRA / PEFT LoRA saved activations above the frozen base",
     "saved_mib"),
]
_FIELD = {"train": "step_ms", "saved": "saved_mib", "peak": "peak_mib", "inference": "latency_ms",
          "generation": "gen_ms"}


def ratios(result: dict) -> dict[str, dict]:
    """Every ratio of :data:`RATIOS` and :data:`OVERHEAD_RATIOS` computable from one workload's result."""
    if "train" not in result:  # only other sections were run
        return {}
    sections = {"train": result["train"], "saved": result["train"], "peak": result["train"],
                "inference": result["inference"], "generation": result.get("generation", {})}
    out = table_ratios(RATIOS, sections, _FIELD)
    train = result["train"]
    for key, label, field in OVERHEAD_RATIOS:
        prefix = "peft_" if key.startswith("peft") else ""
        names = ("base", prefix + "lora", prefix + "dora")
        if not all(v in train for v in names):
            continue
        base, lora, dora = (train[v][field] for v in names)
        if lora - base > 0:
            out[key] = {"label": label, "value": (dora - base) / (lora - base), "target": None, "met": None}
    return out


def machine() -> dict[str, Any]:
    """What the figures depend on: library versions, device, processor, threads, load."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dorafit": dorafit.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    for lib in ("transformers", "peft"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


# ---- the table -------------------------------------------------------------------------------------------
def markdown(record: dict) -> str:
    """The whole record as Markdown: one block of tables per workload."""
    meta = record["meta"]
    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['cpu']}, {meta['torch_threads']} threads"
        + (f", GPU {meta['gpu']}" if meta.get("gpu") else "")
        + f"; device {meta['device']}, {meta['dtype']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}; {meta['date_utc']} UTC; load average {meta['load_average_start']} at start, "
        f"{meta['load_average_end']} at the end.",
    ]
    for name, result in record["workloads"].items():
        steps = ""
        if "train" in result:
            steps = f" Median of {len(next(iter(result['train'].values()))['step_ms_all'])} steps."
        lines += ["", f"### {name}: {result['description']}", "", f"r = {result['spec']['r']}, alpha = "
                  f"{result['spec']['alpha']}, targets `{result['targets']}`, dropout 0.{steps}"]
        if "train" in result:
            lines += _standard_tables(result)
        if "compile" in result:
            lines += ["", *compile_markdown(result["compile"])]
        if "memory" in result:
            lines += ["", *memory_markdown(result["memory"])]
    return "\n".join(lines) + "\n"


def _standard_tables(result: dict) -> list[str]:
    """The default section: training and inference variants, and :data:`RATIOS`."""
    lines = ["", "| training variant | step ms | saved for backward MiB | peak MiB | peak above setup MiB | trainable "
             "| first loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for variant, r in result["train"].items():
        lines.append(
            f"| {variant} | {_fmt(r['step_ms'])} | {_fmt(r['saved_mib'])} | {_fmt(r.get('peak_mib'))} | "
            f"{_fmt(r.get('peak_over_setup_mib'))} | {r['trainable_params']:,} | {r['first_loss']:.6f} |"
        )
    lines += ["", "| inference variant | latency ms |", "|---|---:|"]
    for variant, r in result["inference"].items():
        lines.append(f"| {variant} | {_fmt(r['latency_ms'])} |")
    if result.get("generation"):
        first = next(iter(result["generation"].values()))
        lines += ["", f"Greedy generation of {first['new_tokens']} tokens after {first['batch']} x {first['prompt']} "
                  "prompt tokens (KV cache):", "",
                  "| generation variant | ms per call | tokens/s | same tokens as merged |", "|---|---:|---:|---|"]
        for variant, r in result["generation"].items():
            same = {True: "yes", False: "NO", None: ""}[r.get("same_tokens_as_merged")]
            lines.append(f"| {variant} | {_fmt(r['gen_ms'])} | {_fmt(r['tokens_per_s'])} | {same} |")
    return lines + ["", *ratio_table(result["ratios"])]


def write_json(record: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_json(path, record)
    return path
