"""Which adapted layers' outputs does the backward graph keep, and who keeps them? (LoRA vs DoRA)

    .venv/bin/python benchmarks/saved_inventory.py [--model llama|minilm] [--layers 4] [--seq 256] ...

For every adapted layer, the storage of its output is looked up among the tensors saved for backward during
one forward pass; each saver is named by the module whose forward was running when it saved (the adapted
layer itself, i.e. DoRA's scale, or e.g. the attention or MLP module that consumes the output). An output
that only the adapted layer itself keeps is memory DoRA adds over LoRA; one that the next op keeps anyway
costs nothing extra. Totals are per layer name, summed over blocks.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch import nn

import dorafit
from dorafit.bench.models import WorkloadSpec, build_variant, build_workload, llama_sizes

MIB = 2**20


def inventory(workload, variant: str) -> dict[str, dict]:
    model = build_variant(workload, variant).train()
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # storage -> (adapted layer, output kept alive)
    savers: dict[int, set] = collections.defaultdict(set)
    adapted = {layer for _, layer in dorafit.adapted_modules(model)}

    def pre_hook(module, args):
        running.append(names.get(module, "?"))

    def post_hook(module, args, out):
        running.pop()
        if module in adapted:
            outputs[out.untyped_storage().data_ptr()] = (names[module], out)

    def pack(t):
        savers[t.untyped_storage().data_ptr()].add(running[-1] if running else "(top level)")
        return t

    handles = [nn.modules.module.register_module_forward_pre_hook(pre_hook),
               nn.modules.module.register_module_forward_hook(post_hook)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            workload.loss(model, workload.inputs)
    finally:
        for h in handles:
            h.remove()
    rows: dict[str, dict] = {}
    for ptr, (name, out) in outputs.items():
        parts = name.split(".")
        kind = ".".join(parts[-2:]) if parts[-1] == "dense" else parts[-1]  # BERT: intermediate.dense, output.dense
        keepers = sorted({"itself" if w == name else w.split(".")[-1] for w in savers.get(ptr, ())})
        status = "kept by " + " + ".join(keepers) if keepers else "not kept"
        row = rows.setdefault(kind, {"mib": 0.0, "status": collections.Counter(), "extra_mib": 0.0})
        size = out.untyped_storage().nbytes() / MIB
        row["mib"] += size
        row["status"][status] += 1
        if keepers == ["itself"]:
            row["extra_mib"] += size
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama", choices=["llama", "minilm"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    args = p.parse_args()
    if args.model == "llama":
        spec = WorkloadSpec(model="llama", batch=args.batch or 4, seq=args.seq or 256,
                            sizes=llama_sizes(layers=args.layers, vocab=args.vocab))
    else:
        spec = WorkloadSpec(model="minilm", batch=args.batch or 32, seq=args.seq or 128)
    workload = build_workload(spec)
    print(f"{workload.description}\n")
    print("| variant | adapted layer | output MiB (all blocks) | who keeps the output for backward "
          "| kept only by the layer itself MiB |")
    print("|---|---|---:|---|---:|")
    for variant in ("lora", "dora"):
        for kind, row in inventory(workload, variant).items():
            status = "; ".join(f"{s} (x{c})" for s, c in row["status"].items())
            print(f"| {variant} | {kind} | {row['mib']:.1f} | {status} | {row['extra_mib']:.1f} |")


if __name__ == "__main__":
    main()
