"""Test accuracy: per test set, and the average over test sets (the DoRA paper's commonsense average).

Classification: argmax of the logits against the label.

Commonsense: a question is answered by the allowed label with the highest likelihood as the continuation of
``prompt + "the correct answer is "``. The candidate sequences ``prompt + answer_i`` share a common token prefix;
only the tokens after it differ, so a candidate's score is the summed log-probability of its tokens after that
prefix (the shared tokens add the same amount to every candidate). When every candidate differs in one token
(``answer1``/``answer2``...), one forward pass of the shared prefix scores all of them. The output layer runs
only at the scored positions (``logits_to_keep``, left padding).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .tasks import ANSWER_PREFIX, answer_choices, left_pad


def limited(examples: list, limit: int | None) -> list:
    return examples if limit is None else examples[:limit]


def text_length(example) -> int:
    """Characters of a (text, label) pair or a commonsense record's prompt."""
    if isinstance(example, dict):
        return len(example["instruction"]) + len(example.get("input") or "")
    return len(example[0])


def summary(per_task: dict[str, dict]) -> dict:
    """{"tasks": {name: {"accuracy", "correct", "n"}}, "average": mean accuracy over tasks}."""
    return {"tasks": per_task, "average": sum(t["accuracy"] for t in per_task.values()) / len(per_task)}


@torch.no_grad()
def evaluate(task, model, device, limit: int | None = None, batch_size: int = 32, progress: bool = True) -> dict:
    was_training = model.training
    model.eval()
    try:
        score = classification_accuracy if task.kind == "classification" else commonsense_accuracy
        per_task = {}
        for name, examples in task.data.test_sets().items():
            examples = sorted(limited(examples, limit), key=text_length)  # similar lengths batch with less padding
            correct = score(task, model, examples, device, batch_size, progress and len(examples) > batch_size, name)
            per_task[name] = {"accuracy": correct / len(examples), "correct": correct, "n": len(examples)}
        return summary(per_task)
    finally:
        model.train(was_training)


@torch.no_grad()
def classification_accuracy(task, model, examples, device, batch_size, progress, name) -> int:
    correct = 0
    for start in tqdm(range(0, len(examples), batch_size), desc=f"eval {name}", disable=not progress, leave=False):
        chunk = examples[start : start + batch_size]
        logits = task.predict(model, [t for t, _ in chunk], device)  # (B, classes)
        correct += int((logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
    return correct


def _requests(task, record: dict, fallback: list[str]) -> tuple[list[str], list[tuple[list[int], list[int]]]]:
    """(choices, [(fed tokens, scored tokens)] per choice): fed = shared context + scored[:-1]."""
    choices = answer_choices(record, fallback)
    answers = [task.tokens(ANSWER_PREFIX + c) for c in choices]
    room = max(len(a) for a in answers)
    context = task.context(record, room)
    full = [context + a for a in answers]
    shared = min(len(f) for f in full)
    for i in range(shared):  # length of the common token prefix of all candidates
        if any(f[i] != full[0][i] for f in full):
            shared = i
            break
    shared = min(shared, min(len(f) for f in full) - 1)  # every candidate keeps at least one scored token
    return choices, [(f[: len(f) - 1], f[shared:]) for f in full]


def commonsense_accuracy(task, model, records, device, batch_size, progress, name) -> int:
    correct = 0
    scored = choice_scores(task, model, records, device, batch_size, progress, name)
    for record, (choices, scores) in zip(records, scored):
        correct += int(choices[max(range(len(scores)), key=scores.__getitem__)] == record["answer"])
    return correct


@torch.no_grad()
def choice_scores(task, model, records, device, batch_size=32, progress=False, name="") -> list[tuple[list, list]]:
    """(choices, log-likelihood of each choice's tokens after the candidates' common prefix) per record."""
    fallback = sorted({r["answer"] for r in records})
    pad = task.tokenizer.pad_token_id
    result = []
    for start in tqdm(range(0, len(records), batch_size), desc=f"eval {name}", disable=not progress, leave=False):
        chunk = records[start : start + batch_size]
        fed_rows: dict[tuple, int] = {}  # unique fed sequences in this chunk -> row
        plans = []
        for record in chunk:
            choices, reqs = _requests(task, record, fallback)
            plans.append((choices, [(fed_rows.setdefault(tuple(f), len(fed_rows)), s) for f, s in reqs]))
        rows = [list(f) for f in fed_rows]
        keep = max(len(s) for _, reqs in plans for _, s in reqs)
        batch = {k: v.to(device) for k, v in left_pad(rows, pad).items()}
        logits = model(**batch, logits_to_keep=keep).logits.float()  # (R, keep, V)
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for choices, reqs in plans:
            scores = []
            for row, scored in reqs:
                positions = logp[row, keep - len(scored):]  # (len(scored), V): position j predicts scored[j]
                scores.append(float(positions[torch.arange(len(scored)), torch.tensor(scored)].sum()))
            result.append((choices, scores))
    return result
