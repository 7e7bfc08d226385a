"""ROUGE-L as the instruction tasks report it: rouge-score's values, without nltk pulling in scikit-learn."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from dorafit.train.tasks.rouge import rouge_l
pairs = [("The cats were sitting on the mat.", "the cat sat on a mat"), ("running fast", "runs"), ("", "x"),
         ("a b c d", "a b c d")]
ours = [rouge_l(r, g) for r, g in pairs]
hidden = "sklearn" not in sys.modules
import sklearn  # an import after it works as usual
from rouge_score import rouge_scorer
scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
print(ours == [scorer.score(r, g)["rougeL"].fmeasure for r, g in pairs], hidden, ours[0] > 0.5, ours[3] == 1.0)
"""


def test_rouge_l_is_rouge_scores_and_leaves_scikit_learn_unloaded():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        script = SCRIPT.replace("import sklearn  # an import after it works as usual", "")
    else:
        script = SCRIPT
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True", "True", "True"]
