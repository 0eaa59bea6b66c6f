"""Upstream messages that tell a user of this repository nothing are filtered; everything else still shows."""

from __future__ import annotations

import logging
import warnings

from lightning_modules.upstream_noise import silence_upstream_noise

NOISE = [
    "LightningCLI's args parameter is intended to run from within Python like if it were from the command line.",
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()`",
    "Precision bf16-mixed is not supported by the model summary.  Estimated model size in MB will not be accurate.",
    "Found 267 module(s) in eval mode at the start of training. This may lead to unexpected behavior during training.",
]


def test_noise_warnings_are_filtered_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_upstream_noise()
        for message in NOISE:
            warnings.warn(message, UserWarning, stacklevel=1)
        warnings.warn("The number of training batches (3) is smaller than the logging interval", UserWarning,
                      stacklevel=1)
    assert [str(w.message) for w in caught] == ["The number of training batches (3) is smaller than the logging interval"]


def test_noise_log_records_are_filtered_and_others_are_not(caplog):
    silence_upstream_noise()
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").info(
            "`weights_only` was not set, defaulting to `False`.")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info(
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://pypi.org)")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("Restoring states from the checkpoint path")
    assert [record.getMessage() for record in caplog.records] == ["Restoring states from the checkpoint path"]
