"""How two trained classification runs differ on the test set: predictions that differ, the largest logit difference.

    python experiments/compare_predictions.py RUN_A RUN_B

Used in docs/RESULTS.md to check that equal accuracies of LoRA and DoRA runs come from different models (a few
predictions change in both directions) and not from one run standing in for the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dorafit.train.run import load_trained  # noqa: E402


@torch.no_grad()
def test_logits(run: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, classes], labels [n]) of the run's trained model on its task's first test set."""
    setup = load_trained(Path(run), "cpu")
    setup.model.eval()
    examples = next(iter(setup.task.data.test_sets().values()))
    logits = [setup.task.predict(setup.model, [t for t, _ in examples[i:i + 64]], setup.device)
              for i in range(0, len(examples), 64)]
    return torch.cat(logits), torch.tensor([y for _, y in examples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (a, labels), (b, _) = test_logits(args.run_a), test_logits(args.run_b)
    pa, pb = a.argmax(-1), b.argmax(-1)
    differ = pa != pb
    print(f"{len(labels)} test examples; correct: A {int((pa == labels).sum())}, B {int((pb == labels).sum())}; "
          f"predictions differ on {int(differ.sum())} (A right there: {int((differ & (pa == labels)).sum())}, "
          f"B right there: {int((differ & (pb == labels)).sum())}); max |logit A - logit B| "
          f"{float((a - b).abs().max()):.4f} (mean |logit| {float(a.abs().mean()):.4f})")


if __name__ == "__main__":
    main()
