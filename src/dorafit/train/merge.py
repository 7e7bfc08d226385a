"""Merge a run's adapter into its base model and write a standalone transformers folder.

For each adapted layer the saved weight is W' = W0 + dW (LoRA, VeRA) or W' = (m / ||W0 + dW||) * (W0 + dW)
(DoRA, DVoRA, magnitude-only), computed by the same functions as the adapted forward; the trained head is
already in place. The folder is then loaded back with plain ``transformers`` and its outputs on a few test
examples are compared with the adapted model's: the predictions must be identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..inject import merge_and_unload
from .tasks import ANSWER_PREFIX, left_pad
from .run import load_trained, save_model_folder


@torch.no_grad()
def outputs(task, model, examples: list, device) -> torch.Tensor:
    """Classification: logits (N, classes). Commonsense: next-token logits after "the correct answer is" (N, V)."""
    model.eval()
    if task.kind == "classification":
        return task.predict(model, [t for t, _ in examples], device)
    prefix = task.tokens(ANSWER_PREFIX)
    rows = [task.context(r, len(prefix)) + prefix for r in examples]
    batch = {k: v.to(device) for k, v in left_pad(rows, task.tokenizer.pad_token_id).items()}
    return model(**batch, logits_to_keep=1).logits[:, -1].float().cpu()


def load_plain(folder: Path, kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    return auto.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def merge_run(run_dir: Path, out: Path, check: int = 16) -> dict:
    """Write the merged model of ``run_dir`` to ``out``; returns {"checked": N, "max_abs_diff": d}."""
    setup = load_trained(run_dir, device="cpu")
    model, task = setup.model, setup.task
    examples = next(iter(setup.data.test_sets().values()))[:check]
    before = outputs(task, model, examples, setup.device) if examples else None
    if setup.cfg.method != "full":
        model = merge_and_unload(model)
    save_model_folder(model, setup.loaded.tokenizer, out)
    if before is None:
        return {"checked": 0, "max_abs_diff": None}
    merged = load_plain(out, task.kind)
    after = outputs(task, merged, examples, torch.device("cpu"))
    diff = float((after - before).abs().max())
    differ = int((after.argmax(-1) != before.argmax(-1)).sum())
    if differ:
        raise ValueError(f"the merged model in {out} predicts differently from the adapted model on {differ} of "
                         f"{len(examples)} test examples (max |logit difference| {diff:.3g})")
    print(f"checked: the merged model predicts what the adapted model predicts on {len(examples)} test examples "
          f"(max |logit difference| {diff:.2g})")
    return {"checked": len(examples), "max_abs_diff": diff}
