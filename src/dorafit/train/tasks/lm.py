"""What the causal-LM task types share: the Alpaca prompt and the next-token loss on labelled tokens only.

Batches are padded on the left (:func:`dorafit.train.tasks.base.left_pad`) and carry ``labels`` (-100: not
trained). The output layer runs only from the first labelled position on (``logits_to_keep``): with Gemma's
262k-word vocabulary the output layer would otherwise cost more than the rest of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt (Taori et al. 2023), also LLM-Adapters' (the DoRA paper's commonsense code)."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


TEXT_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")


def token_losses(model, batch: dict[str, Tensor], all_positions: bool = False) -> tuple[Tensor, Tensor]:
    """(per-token negative log-likelihoods [B, K-1], mask of the labelled ones) for a left-padded batch.

    Position t predicts token t+1, so the logits needed are those from one before the first labelled column on
    (``all_positions``: at every position, for comparison).
    """
    labels = batch["labels"]  # (B, T), -100 where not trained
    width = labels.shape[1]
    labelled = (labels != -100).any(0).nonzero()
    first = max(1, int(labelled[0])) if len(labelled) and not all_positions else 1
    keep = width - first + 1
    extra = {key: value for key, value in batch.items() if key not in TEXT_KEYS}  # e.g. a VLM's pixel_values
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep, **extra)
    logits = out.logits[:, :-1].float()  # (B, keep-1, V)
    targets = labels[:, first:]  # (B, keep-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="none").view(targets.shape)
    return nll, targets != -100


def causal_lm_loss(model, batch: dict[str, Tensor], all_positions: bool = False) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens of the batch."""
    nll, mask = token_losses(model, batch, all_positions)
    return nll.sum() / mask.sum().clamp(min=1)


def label_rows(rows: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, Tensor]:
    """A left-padded batch of (token ids, trained flags) rows, with ``labels`` = ids where trained, else -100."""
    from .base import left_pad

    batch = left_pad([ids for ids, _ in rows], pad_id)
    labels = torch.full_like(batch["input_ids"], -100)  # (B, T)
    width = labels.shape[1]
    for i, (ids, trained) in enumerate(rows):
        flags = torch.tensor(trained, dtype=torch.bool)
        row = torch.tensor(ids, dtype=torch.long)
        labels[i, width - len(ids):] = torch.where(flags, row, torch.tensor(-100))
    batch["labels"] = labels
    return batch
