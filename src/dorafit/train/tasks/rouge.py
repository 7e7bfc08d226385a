"""ROUGE-L F-measure from Google's ``rouge-score`` (the paper's and Hugging Face ``evaluate``'s implementation),
with Porter stemming, as the instruction tasks report it.

``rouge_score`` imports the whole ``nltk`` package for its Porter stemmer, and ``nltk``'s ``__init__`` imports
every nltk module, among them a wrapper of scikit-learn's classifiers that loads scikit-learn and SciPy when they
are installed (lm-evaluation-harness installs them): about 60 MiB of resident memory, in the training process,
for classifiers ROUGE never calls. The scorer is therefore imported with scikit-learn hidden (the wrapper treats
it as absent, as on a machine without it); an ``import sklearn`` anywhere later works as usual.
"""

from __future__ import annotations

import functools
import sys


@functools.cache
def _scorer():
    if "nltk" in sys.modules or "sklearn" in sys.modules:  # loaded already: hiding it now would save nothing
        from rouge_score import rouge_scorer
    else:
        sys.modules["sklearn"] = None  # "import sklearn" raises ImportError while this is set
        try:
            from rouge_score import rouge_scorer
        finally:
            del sys.modules["sklearn"]
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, generated: str) -> float:
    """ROUGE-L F-measure of ``generated`` against ``reference`` (stemmed words, longest common subsequence)."""
    return _scorer().score(reference, generated)["rougeL"].fmeasure
