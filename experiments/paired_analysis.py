"""The paired analysis of every comparison in docs/RESULTS.md that has at least two seeds: one verdict per claim.

    python experiments/paired_analysis.py

Trains nothing: it reads the committed experiments/results/<experiment>/results.json of the other experiments.
For each comparison A - B (runs of the same seed share the data order, so they pair by seed) it reports the mean
paired difference with its 95% t-interval, the seeds where each is ahead, the exact sign test
(common.paired_difference) and a verdict (common.verdict):

  "A > B" claims (DoRA vs LoRA, DVoRA vs VeRA, the learning pattern's correlations): "reproduced" when the whole
      interval is above 0; "not reproduced" when its top is below the smallest gain the paper reports on that
      scale (DoRA vs LoRA accuracy: +0.7 points; DVoRA vs VeRA: the paper's scale is MT-Bench, and the
      correlations have no such figure, so only the sign counts); else "undecided at this scale" (a claim about the
      sign of one method's correlation is a comparison with 0);
  "A costs nothing" claims (the detached norm): "reproduced" when the bottom of the interval is above -0.7
      points (no loss as large as the paper's smallest DoRA gain), "not reproduced" when its top is below -0.7.

With 3 seeds t(0.975, 2) = 4.303 makes the intervals wide, and three equal pairs give a zero-width interval
(marked "all pairs equal"): that says the two runs barely differ, not that the difference is known exactly.

Writes experiments/results/paired_analysis/: results.json, results.md.
"""

from __future__ import annotations

import json

from common import RESULTS, SMALLEST_PAPER_GAIN, markdown_table, paired_difference, verdict, write_results

NAME = "paired_analysis"
RANKS = ("4", "8", "16", "32", "64")


def read(experiment: str, *keys: str):
    """A value from experiments/results/<experiment>/results.json, or None if that experiment has not run."""
    path = RESULTS / experiment / "results.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text())
    for key in keys:
        value = value[key]
    return value


def no_loss_verdict(ci95: list[float], margin: float) -> str:
    """Of the claim "A costs nothing against B": the interval of A - B against a loss of ``margin``."""
    low, high = ci95
    if low > -margin:
        return "reproduced"
    if high < -margin:
        return "not reproduced"
    return "undecided at this scale"


def comparisons() -> list[dict]:
    """Every paired comparison, as {section, claim, setting, a, b, kind}; a and b: test accuracies by seed."""
    found = []

    def add(section: str, claim: str, setting: str, a, b, kind: str = "ahead", threshold: float = 0.0,
            scale: float = 100) -> None:
        if a is not None and b is not None:
            found.append({"section": section, "claim": claim, "setting": setting, "a": a, "b": b, "kind": kind,
                          "threshold": threshold, "scale": scale})

    for task in ("tweets", "bbc"):
        acc = lambda variant: read("method_comparison", "results", task, variant, "test_accuracy")  # noqa: E731,B023
        add("1", "DoRA r8 > LoRA r8", f"MiniLM {task}", acc("dora"), acc("lora"), threshold=SMALLEST_PAPER_GAIN)
        add("1", "DoRA r4 (half rank) > LoRA r8", f"MiniLM {task}", acc("dora_half_rank"), acc("lora"),
            threshold=SMALLEST_PAPER_GAIN)
        add("1", "DoRA qkv + magnitude-only rest > LoRA r8", f"MiniLM {task}", acc("dora_reduced"), acc("lora"),
            threshold=SMALLEST_PAPER_GAIN)
    for experiment, tasks, lr in (("rank_robustness", ("tweets", "bbc"), "tuned lr"),
                                  ("rank_robustness_tweets_lr1e-3", ("tweets",), "lr 1e-3")):
        for task in tasks:
            for r in RANKS:
                acc = lambda method: read(experiment, "results", task, method, r, "test_accuracy")  # noqa: E731,B023
                add("2", f"DoRA > LoRA at r {r}", f"MiniLM {task}, {lr}", acc("dora"), acc("lora"),
                    threshold=SMALLEST_PAPER_GAIN)
    for task in ("tweets", "bbc"):
        acc = lambda variant: read("detach_norm", "accuracy", task, variant, "test_accuracy")  # noqa: E731,B023
        add("3", "detached norm costs no accuracy", f"MiniLM {task}, DoRA r8", acc("detached"), acc("full_gradient"),
            kind="no loss", threshold=SMALLEST_PAPER_GAIN)
        acc = lambda variant: read("vera_dvora", "results", task, variant, "test_accuracy")  # noqa: E731,B023
        add("4", "DVoRA > VeRA", f"MiniLM {task}", acc("dvora"), acc("vera"))
    per_seed = read("learning_pattern", "per_seed")
    if per_seed:  # the dM-dD correlation of each method (paper Figure 2: full -0.62, DoRA -0.31, LoRA +0.83)
        corr = {m: [per_seed[s][m]["correlation"] for s in sorted(per_seed, key=int)] for m in ("full", "lora", "dora")}
        zero = [0.0] * len(corr["lora"])
        add("5", "LoRA's correlation > DoRA's", "MiniLM tweets (correlation)", corr["lora"], corr["dora"], scale=1)
        add("5", "0 > DoRA's correlation (paper -0.31)", "MiniLM tweets (correlation)", zero, corr["dora"], scale=1)
        add("5", "0 > full FT's correlation (paper -0.62)", "MiniLM tweets (correlation)", zero, corr["full"],
            scale=1)
        add("5", "LoRA's correlation > 0 (paper +0.83)", "MiniLM tweets (correlation)", corr["lora"], zero, scale=1)
    acc = lambda variant: read("vision_fashion_mnist", "results", variant, "test_accuracy")  # noqa: E731
    add("7", "DoRA r8 > LoRA r8", "EfficientNet-Lite0 Fashion-MNIST", acc("dora"), acc("lora"),
        threshold=SMALLEST_PAPER_GAIN)
    for r in (8, 16):
        score = lambda variant: read("gemma_headlines", "results", variant, "rouge_l")  # noqa: E731,B023
        a, b = score(f"dora_r{r}"), score(f"lora_r{r}")
        if a is not None and len(a) >= 2:
            add("8", f"DoRA r{r} > LoRA r{r} (ROUGE-L x 100)", "Gemma-3-270M bbc-headlines", a, b)
    for task in ("tweets", "bbc"):
        acc = lambda method: read("paired_seeds", "results", task, method, "test_accuracy")  # noqa: E731,B023
        add("9", "DoRA r8 > LoRA r8", f"MiniLM {task}", acc("dora"), acc("lora"), threshold=SMALLEST_PAPER_GAIN)
    return sorted(found, key=lambda c: int(c["section"]))  # stable: within a section, in the order above


def main() -> None:
    rows, out = [], []
    for c in comparisons():
        p = paired_difference(c["a"], c["b"])
        p["verdict"] = (no_loss_verdict(p["ci95"], c["threshold"]) if c["kind"] == "no loss"
                        else verdict(p["ci95"], c["threshold"]))
        out.append({**c, "paired": p})
        low, high = p["ci95"]
        equal, x = " (all pairs equal)" if p["sd"] == 0 else "", c["scale"]
        rows.append([c["section"], c["claim"], c["setting"], p["n"], f"{x * p['mean']:+.2f}",
                     f"[{x * low:+.2f}, {x * high:+.2f}]{equal}",
                     f"{p['a_ahead']} / {p['b_ahead']} / {p['ties']}", f"{p['sign_test_p']:.2g}", p["verdict"]])
    gain = f"{100 * SMALLEST_PAPER_GAIN:.1f}"
    md = ["# Paired analysis of every comparison with seeds\n\n`python experiments/paired_analysis.py` (reads the "
          "other experiments' results.json; trains nothing). A - B per seed in points (accuracy x 100, or ROUGE-L x "
          "100; correlations as they are), 95% t-interval of the mean, the seeds where A / B is ahead / tied, the "
          "exact two-sided sign test, and the verdict. \"A > B\": reproduced when the interval is above 0, not "
          f"reproduced when its top is below the paper's smallest DoRA gain (+{gain} points; 0 for DVoRA vs VeRA, "
          "ROUGE-L and correlations, which have no paper figure on this scale). \"Costs no accuracy\": reproduced "
          f"when its bottom is above -{gain} points. Section numbers are docs/RESULTS.md's.\n\n"]
    md.append(markdown_table(["section", "claim (A > B)", "setting", "seeds", "A - B", "95% CI", "A / B / tie",
                              "sign p", "verdict"], rows))
    write_results(NAME, {"smallest_paper_gain": SMALLEST_PAPER_GAIN, "comparisons": out}, "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
