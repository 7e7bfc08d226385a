"""Merge a run's adapter into its base model and write a standalone transformers folder.

For each adapted layer the saved weight is W' = W0 + dW (LoRA, VeRA) or W' = (m / ||W0 + dW||) * (W0 + dW)
(DoRA, DVoRA, magnitude-only), computed by the same functions as the adapted forward; the trained head is
already in place. An instruction-tuning run's chat template is saved with the tokenizer. The folder is then
loaded back with plain ``transformers`` (the task's own loader) and its outputs on a few test examples are
compared with the adapted model's (the task's ``check_outputs``): the predictions must be identical.

The folder is written in the base's dtype (the run's ``--dtype``, or ``dtype``): each merged weight is computed
in float32 from the base weight (dequantized, for a quantized base) and the float32 adapter, then cast once.
"""

from __future__ import annotations

from pathlib import Path

from ..inject import merge_and_unload
from . import precision
from .quantized_load import LoadOptions, loading
from .runner import save_model_folder
from .setup import load_trained


def check_examples(setup, n: int) -> list:
    """The first ``n`` examples of the run's first test set."""
    return next(iter(setup.data.test_sets().values()))[:n]


def merge_run(run_dir: Path, out: Path, check: int = 16, device: str = "cpu", threads: int | None = None,
              dtype: str | None = None) -> dict:
    """Write the merged model of ``run_dir`` to ``out``, merged on ``device`` with ``threads`` CPU threads (default:
    the run's) in the base's dtype (default: the run's ``--dtype``); returns {"checked": N, "max_abs_diff": d}."""
    setup = load_trained(run_dir, device, threads, dtype)
    model, task = setup.model, setup.task
    examples = check_examples(setup, check)
    before = task.check_outputs(model.eval(), examples, setup.device) if examples else None
    if setup.cfg.method != "full":
        model = merge_and_unload(model)
    save_model_folder(model, setup.loaded.tokenizer, out, chat_template=task.stored().get("chat_template"),
                      processor=setup.loaded.processor)
    if before is None:
        return {"checked": 0, "max_abs_diff": None}
    dtype = precision.torch_dtype(precision.resolve(setup.cfg.dtype, setup.device, setup.cfg.method))
    with loading(LoadOptions(dtype)):  # as it was written
        merged = type(task).load_model(out, setup.data.extra).model.to(setup.device)
    after = task.check_outputs(merged, examples, setup.device)
    diff = float((after - before).abs().max())
    differ = int((after.argmax(-1) != before.argmax(-1)).sum())
    if differ:
        raise ValueError(f"the merged model in {out} predicts differently from the adapted model on {differ} of "
                         f"{len(examples)} test examples (max |logit difference| {diff:.3g})")
    print(f"checked: the merged model predicts what the adapted model predicts on {len(examples)} test examples "
          f"(max |logit difference| {diff:.2g})")
    return {"checked": len(examples), "max_abs_diff": diff}
