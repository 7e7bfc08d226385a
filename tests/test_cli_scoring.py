"""The commonsense scorer (logits only at scored positions, shared prefixes, left padding) against a plain one,
and the deterministic data order behind exact resumption."""

from __future__ import annotations

import pytest
import torch

from dorafit.train.loop import DataOrder, derived_seed
from dorafit.train.models import load_causal_lm
from dorafit.train.options import TrainConfig
from dorafit.train.tasks.multiple_choice import ANSWER_PREFIX, MultipleChoiceTask, load_commonsense

from .cli_support import assets  # noqa: F401 (fixture)


@torch.no_grad()
def plain_scores(task, model, record, choices) -> list[float]:
    """Each candidate alone, unpadded, full logits: summed log-probability of all its answer tokens."""
    scores = []
    for choice in choices:
        answer = task.tokens(ANSWER_PREFIX + choice)
        ids = task.context(record, max(len(task.tokens(ANSWER_PREFIX + c)) for c in choices)) + answer
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
        start = len(ids) - len(answer)
        scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))))
    return scores


@pytest.mark.parametrize("batch_size", [1, 5])
def test_choice_scores_match_plain_full_logit_scoring(assets, batch_size):  # noqa: F811
    data = load_commonsense(assets["commonsense"])
    loaded = load_causal_lm(assets["llama"])
    task = MultipleChoiceTask(data, loaded.tokenizer, TrainConfig(max_length=256))
    multi = {"instruction": "Pick one.\n\nAnswer format: apple pie/banana split cake/cherry", "input": "",
             "output": "the correct answer is cherry", "answer": "cherry"}  # candidates differ in 1-3 tokens
    records = data.test["task_a"][:6] + data.test["task_b"][:5] + [multi]
    ours = task.choice_scores(loaded.model, records, torch.device("cpu"), batch_size)
    for record, (choices, scores) in zip(records, ours):
        reference = plain_scores(task, loaded.model, record, choices)
        # the tokens shared by all candidates add the same amount to each: compare differences
        assert [s - scores[0] for s in scores] == pytest.approx([r - reference[0] for r in reference], abs=1e-4)
        assert max(range(len(scores)), key=scores.__getitem__) == max(range(len(reference)), key=reference.__getitem__)


def test_data_order_visits_every_example_once_per_epoch_and_depends_only_on_seed_and_position():
    order = DataOrder(n=23, batch_size=5, seed=7)
    assert order.batches_per_epoch == 5
    for epoch in range(3):
        seen = [i for m in range(5 * epoch, 5 * epoch + 5) for i in order.indices(m)]
        assert sorted(seen) == list(range(23))
    assert order.indices(4) != DataOrder(23, 5, 8).indices(4) or order.indices(0) != DataOrder(23, 5, 8).indices(0)
    fresh = DataOrder(23, 5, 7)
    assert fresh.indices(13) == order.indices(13)  # no hidden state: a resumed run gets the same batches
    assert derived_seed(1, 2, 3) == derived_seed(1, 2, 3) != derived_seed(1, 2, 4)
