"""Where a run's numbers go: ``RUN/metrics.jsonl`` always, TensorBoard event files with ``--log tensorboard``.

One row per optimizer step (step, loss, lr, seconds, tokens_per_s); evaluation metrics are logged by step as
``eval/<test set>/<metric>`` scalars. metrics.jsonl is rewritten atomically as a whole (at checkpoints, at the
end and at most every 10 s), so after a kill it holds exactly the steps of the last checkpoint or more.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import rundir

TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    def __init__(self, run_dir: Path, rows: list[dict], tensorboard: bool, enabled: bool = True):
        self.run_dir, self.rows, self.enabled = run_dir, rows, enabled
        self.last_write = time.monotonic()
        self.writer = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=len(rows) + 1)

    def step(self, row: dict, force_write: bool) -> None:
        """Record one optimizer step's row (the loop has appended it to ``rows``)."""
        if not self.enabled:
            return
        if self.writer is not None:
            for key in ("loss", "lr", "tokens_per_s"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])
        if force_write or time.monotonic() - self.last_write > 10:
            self.write()

    def evaluation(self, result: dict, step: int) -> None:
        if self.writer is None:
            return
        for name, metrics in result.get("tasks", {}).items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "n":
                    self.writer.add_scalar(f"eval/{name}/{key}", value, step)
        self.writer.flush()

    def write(self) -> None:
        if self.enabled:
            rundir.write_metrics(self.run_dir, self.rows)
            if self.writer is not None:
                self.writer.flush()
            self.last_write = time.monotonic()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
