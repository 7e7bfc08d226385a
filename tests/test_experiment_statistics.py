"""The paired statistics behind docs/RESULTS.md's verdicts (experiments/common.py)."""

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from common import T95, paired_difference, verdict  # noqa: E402


def test_paired_difference_matches_the_textbook_t_interval():
    a = [0.71, 0.72, 0.70, 0.74, 0.69]
    b = [0.70, 0.715, 0.705, 0.72, 0.685]
    d = [x - y for x, y in zip(a, b)]
    half = 2.776 * statistics.stdev(d) / math.sqrt(5)  # t(0.975, 4)
    p = paired_difference(a, b)
    assert p["n"] == 5 and p["t"] == 2.776
    assert p["mean"] == pytest.approx(statistics.fmean(d))
    assert p["ci95"] == pytest.approx([statistics.fmean(d) - half, statistics.fmean(d) + half])
    assert (p["a_ahead"], p["b_ahead"], p["ties"]) == (4, 1, 0)
    assert p["sign_test_p"] == pytest.approx(2 * (1 + 5) / 2**5)  # P(X <= 1), X ~ Binomial(5, 1/2), two-sided


def test_sign_test_leaves_ties_out_and_never_exceeds_one():
    ten_wins = paired_difference([1.0] * 10 + [0.5], [0.0] * 10 + [0.5])
    assert ten_wins["ties"] == 1 and ten_wins["sign_test_p"] == pytest.approx(2 / 2**10)
    balanced = paired_difference([1.0, 0.0, 0.5], [0.0, 1.0, 0.5])
    assert balanced["sign_test_p"] == 1.0
    assert paired_difference([0.5, 0.5], [0.5, 0.5])["sign_test_p"] == 1.0


def test_paired_difference_refuses_unpaired_or_too_many_values():
    with pytest.raises(ValueError, match="two equal lists"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="two equal lists"):
        paired_difference([0.1], [0.1])
    with pytest.raises(ValueError, match="t table"):
        paired_difference([0.0] * (len(T95) + 2), [0.0] * (len(T95) + 2))


@pytest.mark.parametrize("ci, smallest, expected", [
    ([0.001, 0.02], 0.007, "reproduced"),
    ([-0.003, 0.005], 0.007, "not reproduced"),       # above 0 not shown, and a paper-sized edge is excluded
    ([-0.003, 0.012], 0.007, "undecided at this scale"),
    ([-0.02, -0.001], 0.0, "not reproduced"),        # B ahead
    ([-0.01, 0.03], 0.0, "undecided at this scale"),
])
def test_verdict(ci, smallest, expected):
    assert verdict(ci, smallest) == expected
