"""Turn examples into model inputs and a training loss, for the two kinds of task.

* :class:`ClassificationTask` - text -> label with a sequence-classification model; loss = cross-entropy.
* :class:`CommonsenseTask` - instruction -> "the correct answer is X" with a causal LM, in the prompt format of
  LLM-Adapters (the DoRA paper's commonsense code). Loss = next-token cross-entropy on the response tokens
  (with ``train_on_prompt``: on all tokens). Sequences are padded on the LEFT, so every response ends at the last
  position and the output layer runs only on the last K positions (``logits_to_keep``): with Gemma's
  262k-word vocabulary the output layer would otherwise cost more than the rest of the model.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ANSWER_PREFIX = "the correct answer is "
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+?)\s*$")


class ClassificationTask:
    kind = "classification"

    def __init__(self, data, tokenizer, max_length: int):
        self.data, self.tokenizer, self.max_length = data, tokenizer, max_length
        self.train = data.train

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def batch(self, examples: list[tuple[str, int]]) -> dict[str, Tensor]:
        inputs = self.encode([t for t, _ in examples])
        inputs["labels"] = torch.tensor([y for _, y in examples])
        return inputs

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits  # (B, classes)
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def predict(self, model, texts: list[str], device) -> Tensor:
        """Logits (N, classes) for ``texts`` (one batch)."""
        inputs = {k: v.to(device) for k, v in self.encode(texts).items()}
        return model(**inputs).logits.float().cpu()


def prompt_of(record: dict) -> str:
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT.format(instruction=record["instruction"])


def answer_choices(record: dict, fallback: list[str]) -> list[str]:
    """The allowed answer labels, read from the instruction's "Answer format: a/b/c" line."""
    match = _ANSWER_FORMAT.search(record["instruction"])
    if match:
        choices = [c.strip() for c in match.group(1).split("/") if c.strip()]
        if record["answer"] in choices:
            return choices
    return fallback


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (0 at each row's first real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


class CommonsenseTask:
    kind = "commonsense"

    def __init__(self, data, tokenizer, max_length: int, train_on_prompt: bool = False):
        self.data, self.tokenizer, self.max_length = data, tokenizer, max_length
        self.train_on_prompt = train_on_prompt
        self.train = data.train
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context(self, record: dict, room: int) -> list[int]:
        """BOS + prompt tokens, the prompt cut from the left so that ``room`` tokens still fit after it."""
        body = self.tokens(prompt_of(record))
        keep = max(1, self.max_length - room - len(self.bos))
        return self.bos + body[-keep:]

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
        batch["keep"] = torch.tensor(0 if self.train_on_prompt else max(n_response) + 1)
        return batch

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        """Mean next-token cross-entropy over the labelled tokens, with logits only at the last ``keep`` positions."""
        keep = int(batch["keep"])
        labels = batch["labels"]
        width = labels.shape[1]
        keep = width if keep == 0 or keep > width else keep
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=keep)
        logits = out.logits[:, :-1].float()  # (B, keep-1, V): position t predicts token t+1
        targets = labels[:, width - keep + 1:]  # (B, keep-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
