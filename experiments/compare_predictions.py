"""How two trained runs differ on their test sets: predictions that differ, and how concentrated they are.

    python experiments/compare_predictions.py RUN_A RUN_B [--eval-limit N]

For a classification run (MiniLM presets) every test example is predicted; for a commonsense run (Gemma) the first
``--eval-limit`` questions of each test set (default: the runs' own eval limit), scored as `dorafit eval` scores
them. Per test set: correct answers of A and B, predictions that differ and which run was right there, and the share
of the most frequent predicted answer (near 1: the model answers by a prior, not by the question), and the largest
difference between the two runs' scores (logits; for commonsense, each choice's log-likelihood). Used in
docs/RESULTS.md to check that equal accuracies of LoRA and DoRA runs come from different models and not from one
run standing in for the other.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dorafit.train.setup import load_trained  # noqa: E402
from dorafit.train.tasks.base import limited  # noqa: E402


@torch.no_grad()
def predictions(run: str, eval_limit: int | None) -> dict[str, tuple[list, list, torch.Tensor]]:
    """{test set: (predicted answers, correct answers, scores [examples, choices])} of the run's trained model."""
    setup = load_trained(Path(run), "cpu")
    setup.model.eval()
    task, out = setup.task, {}
    limit = eval_limit if eval_limit is not None else setup.cfg.eval_limit
    for name, examples in task.data.test_sets().items():
        examples = limited(examples, limit)
        if hasattr(task, "predict"):  # a classifier
            logits = torch.cat([task.predict(setup.model, [t for t, _ in examples[i:i + 64]], setup.device)
                                for i in range(0, len(examples), 64)])
            out[name] = (logits.argmax(-1).tolist(), [y for _, y in examples], logits)
        else:
            scored = task.choice_scores(setup.model, examples, setup.device, batch_size=8)
            out[name] = ([c[max(range(len(s)), key=s.__getitem__)] for c, s in scored],
                         [r["answer"] for r in examples], torch.tensor([x for _, s in scored for x in s]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--eval-limit", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    a, b = predictions(args.run_a, args.eval_limit), predictions(args.run_b, args.eval_limit)
    for name in a:
        (pa, gold, sa), (pb, _, sb) = a[name], b[name]
        differ = [i for i in range(len(gold)) if pa[i] != pb[i]]
        top = lambda p: collections.Counter(p).most_common(1)[0]  # noqa: E731
        print(f"{name}: {len(gold)} examples; correct: A {sum(x == y for x, y in zip(pa, gold))}, "
              f"B {sum(x == y for x, y in zip(pb, gold))}; predictions differ on {len(differ)} (A right there: "
              f"{sum(pa[i] == gold[i] for i in differ)}, B right there: {sum(pb[i] == gold[i] for i in differ)}); "
              f"most frequent prediction: A {top(pa)[0]!r} {top(pa)[1] / len(gold):.0%}, "
              f"B {top(pb)[0]!r} {top(pb)[1] / len(gold):.0%}; most frequent correct answer "
              f"{top(gold)[0]!r} {top(gold)[1] / len(gold):.0%}; max |score A - score B| "
              f"{float((sa - sb).abs().max()):.4f} (mean |score A| {float(sa.abs().mean()):.4f})")


if __name__ == "__main__":
    main()
