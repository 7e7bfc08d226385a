"""Evaluate a task's model in eval mode (DoRA's norm cached) and hand back the model in the mode it was in."""

from __future__ import annotations


def evaluate(task, model, device, limit: int | None = None, batch_size: int = 32,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """(metrics as the task reports them, generated samples if the task generates text, else [])."""
    was_training = model.training
    model.eval()
    try:
        result = task.evaluate(model, device, limit, batch_size, progress)
    finally:
        model.train(was_training)
    samples = result.pop("samples", [])
    return result, samples
