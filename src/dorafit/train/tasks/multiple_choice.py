"""Multiple choice by likelihood with a causal LM: the DoRA paper's commonsense reasoning format.

Data: instruction / answer records in the LLM-Adapters format the paper uses: a folder with one sub-folder per
task holding ``train.json`` and/or ``test.json``. The ``commonsense`` preset is the copy vendored in this package
(``dorafit/data/commonsense``, ODC-By, see its DATA_LICENSE). Training: instruction -> "the correct answer is X",
loss = next-token cross-entropy on the response tokens (``--train-on-prompt``: on all tokens). Sequences are
padded on the LEFT, so every response ends at the last position and the output layer runs only on the last K
positions (``logits_to_keep``): with Gemma's 262k-word vocabulary it would otherwise cost more than the rest.

Evaluation: a question is answered by the allowed label with the highest likelihood as the continuation of
``prompt + "the correct answer is "``. The candidate sequences ``prompt + answer_i`` share a common token prefix;
only the tokens after it differ, so a candidate's score is the summed log-probability of its tokens after that
prefix. When every candidate differs in one token (``answer1``/``answer2``...), one forward pass of the shared
prefix scores all of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...chat_format import ALPACA_TEMPLATE, ChatFormat
from .. import models
from .base import DataError, TaskData, clip, format_metrics, left_pad, limited
from .classification import accuracy_summary
from .lm import alpaca_prompt, causal_lm_loss
from .registry import register

COMMONSENSE_DIR = Path(__file__).resolve().parents[2] / "data" / "commonsense"
ANSWER_PREFIX = "the correct answer is "
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+?)\s*$")
KEYS = ("instruction", "output", "answer")


def _read_file(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        bad = text.splitlines()[exc.lineno - 1] if text.splitlines() else ""
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}): {clip(bad)}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records with {', '.join(KEYS)}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or any(not isinstance(r.get(k), str) for k in KEYS):
            raise DataError(f"{path}: record {i} (0-based) lacks string field(s) "
                            f"{', '.join(k for k in KEYS if not isinstance(r, dict) or k not in r)}: "
                            f"{clip(json.dumps(r))}")
    return records


def _task_folders(folder: Path) -> list[Path]:
    has_data = lambda p: (p / "test.json").is_file() or (p / "train.json").is_file()  # noqa: E731
    return sorted(p for p in folder.iterdir() if p.is_dir() and has_data(p))


def load_commonsense(folder: Path) -> TaskData:
    """All ``*/train.json`` concatenated (in sorted task order) for training; each ``*/test.json`` a test set."""
    tasks = _task_folders(folder)
    if not tasks:
        raise DataError(f"{folder} holds no task folders with train.json / test.json (the commonsense format)")
    train, test = [], {}
    for task in tasks:
        if (task / "train.json").is_file():
            train.extend(_read_file(task / "train.json"))
        if (task / "test.json").is_file():
            test[task.name] = _read_file(task / "test.json")
    if not train:
        raise DataError(f"{folder}: no task has a train.json")
    if not test:
        raise DataError(f"{folder}: no task has a test.json")
    return TaskData(folder.name, train, test, max_length=256, duration=("epochs", 3))


def answer_choices(record: dict, fallback: list[str]) -> list[str]:
    """The allowed answer labels, read from the instruction's "Answer format: a/b/c" line."""
    match = _ANSWER_FORMAT.search(record["instruction"])
    if match:
        choices = [c.strip() for c in match.group(1).split("/") if c.strip()]
        if record["answer"] in choices:
            return choices
    return fallback


@register
class MultipleChoiceTask:
    kind = "multiple-choice"
    generative = True  # dorafit generate / chat prompt it with chat_format()
    has_head = False  # a freshly initialised head trains beside the adapter
    presets = {"commonsense": "the DoRA paper's 8 commonsense reasoning tasks (vendored)"}

    def __init__(self, data: TaskData, tokenizer, cfg):
        self.data, self.tokenizer, self.max_length = data, tokenizer, cfg.max_length
        self.train_on_prompt = cfg.train_on_prompt
        self.train = data.train
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    @classmethod
    def claims(cls, path: Path) -> bool:
        return isinstance(path, Path) and path.is_dir() and bool(_task_folders(path))

    @classmethod
    def load_data(cls, spec: str, cfg) -> TaskData:
        return load_commonsense(COMMONSENSE_DIR if spec == "commonsense" else Path(spec).expanduser())

    @classmethod
    def load_model(cls, folder: Path, info: dict):
        return models.load_causal_lm(folder)

    def describe(self) -> str:
        return f"{len(self.data.test)} test sets"

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context(self, record: dict, room: int) -> list[int]:
        """BOS + prompt tokens, the prompt cut from the left so that ``room`` tokens still fit after it."""
        body = self.tokens(alpaca_prompt(record["instruction"], record.get("input")))
        keep = max(1, self.max_length - room - len(self.bos))
        return self.bos + body[-keep:]

    def stored(self) -> dict:
        return {}

    @classmethod
    def chat_format(cls, tokenizer, resolved: dict) -> ChatFormat:
        return ChatFormat(tokenizer, "alpaca", ALPACA_TEMPLATE)  # the prompt it was trained with

    def batch(self, records: list[dict]) -> dict[str, Tensor]:
        rows, n_response = [], []
        for r in records:
            response = self.tokens(r["output"]) + self.eos
            rows.append(self.context(r, len(response)) + response)
            n_response.append(len(response))
        batch = left_pad(rows, self.tokenizer.pad_token_id)
        labels = batch["input_ids"].clone()  # (B, T)
        labels[batch["attention_mask"] == 0] = -100
        if not self.train_on_prompt:
            for i, n in enumerate(n_response):
                labels[i, : labels.shape[1] - n] = -100
        batch["labels"] = labels
        return batch

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        return causal_lm_loss(model, batch)

    # ---- evaluation ----------------------------------------------------------------------------------------
    def _requests(self, record: dict, fallback: list[str]) -> tuple[list[str], list[tuple[list[int], list[int]]]]:
        """(choices, [(fed tokens, scored tokens)] per choice): fed = shared context + scored[:-1]."""
        choices = answer_choices(record, fallback)
        answers = [self.tokens(ANSWER_PREFIX + c) for c in choices]
        context = self.context(record, max(len(a) for a in answers))
        full = [context + a for a in answers]
        shared = min(len(f) for f in full)
        for i in range(shared):  # length of the common token prefix of all candidates
            if any(f[i] != full[0][i] for f in full):
                shared = i
                break
        shared = min(shared, min(len(f) for f in full) - 1)  # every candidate keeps at least one scored token
        return choices, [(f[: len(f) - 1], f[shared:]) for f in full]

    @torch.no_grad()
    def choice_scores(self, model, records, device, batch_size=32, progress=False, name="") -> list[tuple]:
        """(choices, log-likelihood of each choice's tokens after the candidates' common prefix) per record."""
        fallback = sorted({r["answer"] for r in records})
        result = []
        for start in tqdm(range(0, len(records), batch_size), desc=f"eval {name}", disable=not progress, leave=False):
            chunk = records[start : start + batch_size]
            fed_rows: dict[tuple, int] = {}  # unique fed sequences in this chunk -> row
            plans = []
            for record in chunk:
                choices, reqs = self._requests(record, fallback)
                plans.append((choices, [(fed_rows.setdefault(tuple(f), len(fed_rows)), s) for f, s in reqs]))
            keep = max(len(s) for _, reqs in plans for _, s in reqs)
            padded = left_pad([list(f) for f in fed_rows], self.tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in padded.items()}
            logp = torch.log_softmax(model(**batch, logits_to_keep=keep).logits.float(), dim=-1).cpu()  # (R, keep, V)
            for choices, reqs in plans:
                scores = []
                for row, scored in reqs:
                    positions = logp[row, keep - len(scored):]  # (len(scored), V): position j predicts scored[j]
                    scores.append(float(positions[torch.arange(len(scored)), torch.tensor(scored)].sum()))
                result.append((choices, scores))
        return result

    def evaluate(self, model, device, limit: int | None, batch_size: int, progress: bool) -> dict:
        """Accuracy per test set and the average over test sets (the DoRA paper's commonsense average)."""
        per_task = {}
        for name, records in self.data.test_sets().items():
            records = sorted(limited(records, limit), key=lambda r: len(r["instruction"]) + len(r.get("input") or ""))
            scored = self.choice_scores(model, records, device, batch_size, progress and len(records) > batch_size,
                                        name)
            correct = sum(int(choices[max(range(len(s)), key=s.__getitem__)] == r["answer"])
                          for r, (choices, s) in zip(records, scored))
            per_task[name] = {"accuracy": correct / len(records), "correct": correct, "n": len(records)}
        return accuracy_summary(per_task)

    @torch.no_grad()
    def check_outputs(self, model, examples: list, device) -> Tensor:
        """Next-token logits after "the correct answer is" (N, V)."""
        prefix = self.tokens(ANSWER_PREFIX)
        rows = [self.context(r, len(prefix)) + prefix for r in examples]
        batch = {k: v.to(device) for k, v in left_pad(rows, self.tokenizer.pad_token_id).items()}
        return model(**batch, logits_to_keep=1).logits[:, -1].float().cpu()

    def format_result(self, result: dict, before: dict | None = None) -> str:
        return format_metrics(result, before, ("accuracy",), average="accuracy")
