"""Filters for upstream messages that tell a user of this repository nothing.

Each run printed about six of them (issue 11), and the one line a user needs got lost among them. Only
these exact messages are dropped; any other warning or log line from Lightning, torch or W&B still shows.
"""

from __future__ import annotations

import logging
import warnings

# Warning message starts (regular expressions, matched at the start of the message) and why each says nothing here.
NOISE_WARNINGS = (
    r"LightningCLI's args parameter is intended",  # train.train(args) passes the command line on purpose
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of a torch API, not ours
    r"Precision bf16-mixed is not supported by the model summary",  # the summary's size estimate only
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen backbones, on purpose
)
# Logger name → message starts dropped from it.
NOISE_LOG_RECORDS = {
    "lightning.pytorch.trainer.connectors.checkpoint_connector": ("`weights_only` was not set",),  # every epoch
    # rank_zero_info logs through whichever of these two lightning_utilities was last pointed at
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),  # an advertisement
    "lightning.fabric.utilities.rank_zero": ("💡 Tip: For seamless cloud logging",),
}


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def silence_upstream_noise() -> None:
    """Install the filters (idempotent: warnings.filterwarnings and the logger filters replace their duplicates)."""
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, starts in NOISE_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(starts))
