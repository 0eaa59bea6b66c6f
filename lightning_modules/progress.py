"""Progress a log file can show: plain lines instead of a live bar, and a line for every long phase.

Rich's live progress bar redraws one line in place; written to a file (a cluster job, `> train.log`) it leaves
one line for a whole run. Off a terminal, ``PlainProgress`` prints a line every so many training steps and at
each epoch's end instead, and ``phase`` names the long steps between epochs (feature statistics, calibration,
metrics) with their duration, on a terminal too. Lightning has no plain-text bar besides tqdm's, which also
redraws in place, hence this one.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info


def wants_plain_progress() -> bool:
    """True when stdout is not a terminal (a file or a pipe): a live bar would not show there."""
    return not sys.stdout.isatty()


@contextmanager
def phase(description: str) -> Iterator[None]:
    """Print `description…` when a long step starts and `description: done in N s` when it ends (rank 0)."""
    rank_zero_info(f"{description}…")
    started = time.monotonic()
    yield
    rank_zero_info(f"{description}: done in {time.monotonic() - started:.1f} s")


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class PlainProgress(ProgressBar):
    """One plain line `lines_per_epoch` times an epoch (step, loss, speed, time left) and one at each epoch's end."""

    def __init__(self, lines_per_epoch: int = 4) -> None:
        super().__init__()
        self.lines_per_epoch = max(1, lines_per_epoch)
        self._enabled = True
        self._fit_started = self._epoch_started = 0.0
        self._steps_at_start = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(text, flush=True)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_started, self._steps_at_start = time.monotonic(), trainer.global_step

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_started = time.monotonic()

    def _loss_text(self, trainer: Any, pl_module: Any) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        losses = {key: value for key, value in metrics.items() if "loss" in key and "epoch" not in key}
        return " ".join(f"{key.removeprefix('train/').removesuffix('_step')} {float(value):.4g}"
                        for key, value in losses.items() if isinstance(value, (int, float)))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        total = self.total_train_batches
        every = max(1, math.ceil(total / self.lines_per_epoch)) if math.isfinite(total) else 50
        step = batch_idx + 1
        if step % every and step != total:
            return
        done = trainer.global_step - self._steps_at_start
        elapsed = time.monotonic() - self._fit_started
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = max(trainer.estimated_stepping_batches - trainer.global_step, 0)
        eta = f", {_duration(remaining / rate)} left" if rate > 0 and math.isfinite(remaining) else ""
        of_total = f"/{total}" if math.isfinite(total) else ""
        self._line(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {step}{of_total}: "
                   f"{self._loss_text(trainer, pl_module)} ({rate:.2f} steps/s{eta})")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._line(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done in "
                   f"{time.monotonic() - self._epoch_started:.1f} s")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._line(f"validation: {sum(trainer.num_val_batches)} batches of held-out normal images")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._line(f"testing: {sum(trainer.num_test_batches)} batches")
