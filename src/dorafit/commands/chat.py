"""``dorafit chat RUN|MODEL_DIR``: talk to a trained run's model in the terminal.

Each line you type is a user turn; the answer streams as it is generated, and the conversation so far is the
context of the next answer (cut from the left when it outgrows the model's context). ``/reset`` starts a new
conversation, ``/exit`` (or end of input) leaves. Prompts use the chat template the run was trained with (a
model folder: its tokenizer's, or dorafit's plain role-tagged template if it has none). With a vision-language
model, ``/image PATH`` (or ``--image PATH`` at the start) shows an image with your next line (``<image>`` in the
line marks where; else it comes first); the images stay in the conversation until ``/reset``.
"""

from __future__ import annotations

import argparse

from .common import use_threads

COMMANDS = {"/image PATH": "show an image with your next line", "/reset": "start a new conversation",
            "/exit": "leave"}


def register(subparsers) -> None:
    from .generate import add_model_arguments

    parser = subparsers.add_parser(
        "chat", help="an interactive chat with a trained run's model (or any causal LM)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--system", metavar="TEXT", default=None, help="a system message that opens the conversation")
    parser.add_argument("--image", metavar="FILE", action="append", default=[],
                        help="an image shown with your first line (a vision-language model; repeatable)")
    parser.set_defaults(func=main)


def chat(gen, options, system: str | None, read_line, write, images: list | None = None) -> None:
    """The conversation loop: ``read_line()`` gives the user's lines (None at the end), ``write`` shows text;
    ``images``: shown with the first line."""
    from transformers import TextStreamer

    from ..generation import generate_ids
    from ..train.tasks.base import DataError
    from ..train.vlm.inputs import with_placeholders
    from .generate import context_room, image_files

    opening = [{"role": "system", "content": system}] if system else []
    messages, shown, pending = list(opening), [], list(images or [])
    room = context_room(gen.model, options.max_new_tokens)
    streamer = TextStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        line = read_line()
        if line is None or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages, shown, pending = list(opening), [], []
            write("(new conversation)\n")
            continue
        if line.strip().startswith("/image"):
            path = line.strip()[len("/image"):].strip()
            try:
                if gen.images is None:
                    raise ValueError(f"{gen.source} reads text only; /image needs a vision-language model")
                pending += image_files([path]) if path else []
                write(f"(image {path} goes with your next line)\n" if path else "usage: /image PATH\n")
            except (ValueError, DataError) as exc:
                write(f"error: {exc}\n")
            continue
        if not line.strip():
            continue
        try:
            text = line.rstrip("\n")
            turn = {"role": "user", "content": with_placeholders(text, len(pending)) if gen.images is not None else text}
            ids, kept = gen.prompt_shown(messages + [turn], shown + pending, room)  # the oldest images may go
            if pending and kept[-len(pending):] != pending:
                raise ValueError("this line and its image(s) do not fit the model's context; lower "
                                 "--max-new-tokens or /reset")
        except ValueError as exc:
            write(f"error: {exc}\n")
            continue
        messages.append(turn)
        shown, pending = kept, []
        ids = generate_ids(gen.model, gen.tokenizer, [ids], options, streamer=streamer,
                           inputs=gen.image_inputs(shown))[0]  # the streamer ends the answer's line
        messages.append({"role": "assistant", "content": gen.tokenizer.decode(ids, skip_special_tokens=True).strip()})


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        import sys

        from ..chat_format import ChatFormat
        from ..fields import from_arguments
        from ..generation import SamplingOptions
        from ..train.generator import load_generator

        from .generate import image_files

        options = from_arguments(SamplingOptions, args)
        use_threads(args)
        images = image_files(args.image)
        gen = load_generator(args.source, args.device, args.dtype)
        if images and gen.images is None:
            raise ValueError(f"--image: {gen.source} reads text only; images need a vision-language model")
        if gen.format is None:
            gen.format = ChatFormat.choose(gen.tokenizer, "plain")
        interactive = sys.stdin.isatty()
        if interactive:
            import readline  # noqa: F401 - line editing and history for input()
        print(f"chatting with {gen.source}; chat format: {gen.format.describe()}. "
              + ", ".join(f"{c}: {what}" for c, what in COMMANDS.items()), flush=True)

        def read_line():
            try:
                return input("> ") if interactive else (sys.stdin.readline() or None)
            except EOFError:
                return None

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        chat(gen, options, args.system, read_line, write, images)
        return 0

    return report_errors(command)
