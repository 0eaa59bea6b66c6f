"""Callbacks that interrupt training mid-epoch, for the resume tests (an interruption that loses nothing)."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class KillAtStep(Callback):
    """`kill -9` of the training process itself: no exception handler, no cleanup, nothing saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
