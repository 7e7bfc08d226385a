"""``dorafit generate RUN|MODEL_DIR --prompt TEXT``: what a trained (or any) causal LM writes.

``--prompts FILE.jsonl`` (or ``.parquet``, or ``hf:ORG/NAME[:SPLIT]``) reads one request per line (row)
(``{"prompt": str}``, ``{"messages": [...]}`` to continue a conversation, or Alpaca ``{"instruction", "input"}``)
and writes each row back with ``"generated"`` added, as JSON Lines (to ``--out FILE`` or standard output).
A vision-language model reads images: ``--image FILE`` (repeatable) with ``--prompt``, or an ``"images"`` list in a
request (paths relative to the file), one ``<image>`` placeholder per image in the text (none: the images come
first).
Prompts are rendered with the chat template the run was trained with (a model folder: its tokenizer's, if any);
``--raw`` sends the text as it is.
"""

from __future__ import annotations

import argparse

from .common import add_compute_arguments, use_threads

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``generate`` and ``chat`` share: the model, the device and how tokens are chosen."""
    from ..fields import add_arguments
    from ..generation import SamplingOptions

    parser.add_argument("source", metavar="RUN|MODEL_DIR",
                        help="a run folder of dorafit train (its adapter is kept unmerged), a merged folder of "
                        "dorafit merge, a model preset or any local causal-LM folder")
    add_arguments(parser, SamplingOptions)
    add_compute_arguments(parser)
    from .merge import add_dtype_argument

    add_dtype_argument(parser, "the model's dtype: auto (bfloat16 on a CUDA GPU that supports it, float32 on a CPU), "
                       "float32, bfloat16 or float16 (default: a run's --dtype; a model folder: auto)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="complete prompts with a trained run's model (or any causal LM)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="one prompt (a user message, rendered by the chat template)")
    what.add_argument("--prompts", metavar="FILE.jsonl", help="one request per line (or a .parquet file, or a Hub data "
                      "set hf:ORG/NAME[:SPLIT]); writes JSON Lines")
    parser.add_argument("--image", metavar="FILE", action="append", default=[],
                        help="with --prompt: an image the prompt shows (a vision-language model; repeat for more; "
                        "<image> in the prompt marks where each goes, else they come first)")
    parser.add_argument("--out", metavar="FILE", default=None, help="with --prompts: write here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=8, help="with --prompts: prompts per batch (default: 8)")
    parser.add_argument("--raw", action="store_true", help="use the prompt text as it is, without the chat template")
    parser.set_defaults(func=main)


def read_requests(path: str) -> list[dict]:
    """The rows of a --prompts file, each checked: "prompt", "messages" or "instruction" (+ "input"); their
    "images" read and checked (``"_images"``)."""
    from pathlib import Path

    from ..train.tasks import record_images, records
    from ..train.tasks.base import DataError

    rows = []
    try:
        src = records.require_file(records.source(path))  # a file, or a Hub data set hf:ORG/NAME[:SPLIT]
    except DataError as exc:
        raise DataError(f"--prompts: {exc}") from None
    for record in records.records(src):
        data = record.data
        ok = (isinstance(data.get("prompt"), str) or isinstance(data.get("instruction"), str)
              or isinstance(data.get("messages"), list))
        if not ok:
            raise records.field_error(src, record, "\"prompt\" (a string), \"messages\" (a list of turns) "
                                      "or \"instruction\" (+ \"input\")")
        folder = src.parent if isinstance(src, Path) else None
        images = record_images.read_images(data, folder, record.where, record.text)
        rows.append({**data, IMAGES: images} if images else data)
    return rows


IMAGES = "_images"  # a request's images, as read (not written back)


def image_files(paths: list[str]) -> list:
    """``--image`` files, each checked with Pillow (one error line naming a missing or unreadable one)."""
    from pathlib import Path

    from ..train.tasks import record_images

    paths = [str(Path(p).expanduser().resolve()) for p in paths]  # relative to the current folder
    return record_images.read_images({"images": paths}, None, "--image", " ".join(paths)) if paths else []


def messages_of(record: dict) -> list[dict]:
    if isinstance(record.get("messages"), list):
        return record["messages"]
    if isinstance(record.get("instruction"), str):
        turn = {"role": "user", "content": record["instruction"]}
        return [{**turn, "input": record["input"]} if record.get("input") else turn]
    return [{"role": "user", "content": record["prompt"]}]


def prompt_tokens(gen, record: dict, raw: bool, room: int | None) -> list[int]:
    """A request's prompt tokens: rendered by the chat format, or its text as it is (``--raw``, or no template);
    its images' tokens in place (:meth:`Generator.prompt`)."""
    from ..train.vlm.inputs import messages_with_placeholders, with_placeholders

    images = record.get(IMAGES, [])
    vlm = gen.images is not None  # one <image> per image, or none (they go first); a text model reads it as text
    if raw or gen.format is None:
        text = record.get("prompt") or record.get("instruction") or ""
        if not text:
            raise ValueError("--raw (or a model without a chat template) needs a \"prompt\" text, not messages")
        return gen.prompt(None, images, room, text=with_placeholders(text, len(images)) if vlm else text)
    messages = messages_of(record)
    return gen.prompt(messages_with_placeholders(messages, len(images)) if vlm else messages, images, room)


def context_room(model, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit beside ``max_new_tokens`` in the model's context (None: unknown)."""
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return max(1, window - max_new_tokens) if window else None


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        import json
        import sys

        from ..fields import from_arguments
        from ..files import atomic_write_text
        from ..generation import SamplingOptions, generate_text
        from ..train.generator import load_generator

        options = from_arguments(SamplingOptions, args)
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        use_threads(args)
        if args.image and not args.prompt:
            raise ValueError("--image goes with --prompt; in a --prompts file give each request an \"images\" list")
        images = image_files(args.image)
        rows = read_requests(args.prompts) if args.prompts else [{"prompt": args.prompt, IMAGES: images}]
        gen = load_generator(args.source, args.device, args.dtype)
        if gen.format is None and not args.raw:
            print(f"note: {gen.source} has no chat template: prompts are used as plain text", file=sys.stderr)
        room = context_room(gen.model, options.max_new_tokens)
        prompts = [prompt_tokens(gen, r, args.raw, room) for r in rows]
        texts = []
        for start in range(0, len(prompts), args.batch_size):
            batch = rows[start : start + args.batch_size]
            inputs = gen.image_inputs([image for r in batch for image in r.get(IMAGES, [])])
            texts += generate_text(gen.model, gen.tokenizer, prompts[start : start + args.batch_size], options,
                                   inputs=inputs)
        if not args.prompts:
            print(texts[0])
            return 0
        rows = [{k: v for k, v in r.items() if k != IMAGES} for r in rows]
        out = "".join(json.dumps({**r, "generated": t}, ensure_ascii=False) + "\n" for r, t in zip(rows, texts))
        if args.out:
            atomic_write_text(args.out, out)
        else:
            sys.stdout.write(out)
        return 0

    return report_errors(command)
