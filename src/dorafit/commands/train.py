"""``dorafit train``: fine-tune a model with full fine-tuning, LoRA, DoRA, VeRA or DVoRA (see dorafit.train)."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  dorafit train                                   # the demo: MiniLM + DoRA on tweet sentiment, 300 steps
  dorafit train --threads 1                       # the same on a busy machine (see below)
  dorafit train --method lora --rank 16 --alpha 32 --out runs/lora16
  dorafit train --task bbc --method full --lr 3e-5 --epochs 2
  dorafit train --model gemma-3-270m --task commonsense --steps 200 --eval-limit 100
  dorafit train --task my.jsonl --model path/to/hf_folder --targets query value
  dorafit train --config run.yaml --seed 1          # options from a file, overridden here
  dorafit train --resume runs/lora16               # continue an interrupted run
  torchrun --standalone --nproc-per-node 4 -m dorafit train --out runs/ddp4   # 4 processes (GPUs), DDP
  torchrun --standalone --nproc-per-node 4 -m dorafit train --distributed fsdp  # FSDP2: sharded
  dorafit train --model gemma-3-270m --task bbc-headlines --steps 120 --batch-size 4   # instruction tuning
  dorafit train --model DIR --task chats.jsonl    # Alpaca / messages / ShareGPT records
  dorafit train --model Qwen/Qwen2.5-0.5B --task hf:tatsu-lab/alpaca --targets all-linear   # Hugging Face Hub ids
  dorafit train --model llava-gemma-270m --task fashion-mnist-captions --targets none --head multi_modal_projector
  dorafit train --model DIR --task vqa.jsonl --head multi_modal_projector   # LLaVA: records with "images"

time: the demo trains 300 steps in about 9 minutes on a 2-core CPU that another job keeps half busy, with
--threads 1. torch uses one thread per core by default; when other processes keep the cores busy those threads
stall each other (the same run took 18 minutes with 2 threads on a loaded machine), so on a shared machine give
--threads 1.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model and write a run folder",
        description="Fine-tune a model; writes a run folder with the resolved config, metrics.jsonl, eval.json, "
        "the adapter (or model), loss.png and a resumable checkpoint. With no options: MiniLM + DoRA on tweets.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ..train.options import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        from ..train.options import config_from_args
        from ..train.runner import train

        cfg, explicit = config_from_args(args)
        return train(cfg, explicit)

    return report_errors(command)
