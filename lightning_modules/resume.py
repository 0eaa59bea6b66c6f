"""What makes a run resumable: the rolling `last.ckpt` and a training log that survives a resume.

`ResumeCheckpoint` rewrites `checkpoints/last.ckpt` at the end of every training epoch (whatever the
validation cadence: the quickstart and the EfficientAD configs validate once, after training),
every N optimizer steps when asked, and when training on one process dies with an exception. Each
write goes to a temporary file that then replaces the old one, so a `kill -9` mid-write leaves the
previous checkpoint whole. The checkpoint also holds every process's random-number-generator
states; the train sampler and the synthesis draw from those generators, so a run resumed from an
epoch-end checkpoint draws the numbers, and the data order, the uninterrupted run would have drawn.
A mid-epoch checkpoint restores the step count and optimizer state, but Lightning cannot skip into a
plain DataLoader, so the rest of that epoch draws its batches afresh (close, not equal).

`ResumableCSVLogger` keeps the curves logged before the checkpoint when a run resumes, instead of
Lightning's default of deleting `metrics.csv`.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read; the message names the file."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Open a checkpoint (memory-mapped: cheap) or fail with one message naming the file.

    torch's own error for a truncated file ("failed finding central directory") says neither which
    file nor what probably happened.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(error).__name__}: {str(error).splitlines()[0]}). The file "
            "is probably truncated (an interrupted save or copy) or is not a Lightning checkpoint."
        ) from error


def rng_states() -> dict[str, Any]:
    """The states of every random-number generator a run draws from (torch, CUDA, numpy, Python), as
    tensors and plain Python values: Lightning reads checkpoints with torch.load(weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeCheckpoint(Checkpoint):
    """Keeps `last.ckpt` current (see the module docstring). A `Checkpoint` subclass, so Lightning runs it
    where it runs its own checkpoint callbacks, after the module's epoch-end hook."""

    def __init__(self, path: str | Path, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be a positive number of steps, got {every_n_steps}")
        self.path = Path(path)
        self.every_n_steps = every_n_steps

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"

    def save(self, trainer, weights_only: bool = False) -> None:
        """Write to a temporary file, then replace `last.ckpt` with it (rank 0, after every process has written).
        ``weights_only``: the model alone (a fit-only detector's pass: there is no loop or optimiser to resume)."""
        partial = self.path.with_name(self.path.name + ".partial")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(partial, weights_only=weights_only)  # every process takes part; it returns after a barrier
        if trainer.is_global_zero:
            os.replace(partial, self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Not for a diverged loss (nothing worth resuming), not before the first step, and not under DDP,
        # where the other processes would never reach the save's barrier (the epoch checkpoints cover it).
        if (trainer.state.fn == "fit" and trainer.global_step > 0 and trainer.world_size == 1
                and not getattr(exception, "diverged", False)):
            self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        """Every process's generator states, indexed by rank (called on every process when saving)."""
        local = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, local)
            return {"rng_states": everyone}
        return {"rng_states": [local]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng_states") or []
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        if rank < len(states):
            set_rng_states(states[rank])


class _KeepEarlierRowsWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv keeps its rows logged before `keep_below_step`."""

    def __init__(self, log_dir: str, keep_below_step: int | None) -> None:
        self.keep_below_step = keep_below_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.keep_below_step is None or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        with open(self.metrics_file_path, newline="") as stream:
            reader = csv.DictReader(stream)
            header = list(reader.fieldnames or [])
            # Rows from before the checkpoint stay; later ones belong to the steps the resumed run repeats.
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) < self.keep_below_step]
        with open(self.metrics_file_path, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = header


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that, when a run resumes from a checkpoint at step S, keeps the rows logged before step S."""

    def __init__(self, *args: Any, keep_below_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_below_step = keep_below_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepEarlierRowsWriter(self.log_dir, self.keep_below_step)
        return self._experiment
