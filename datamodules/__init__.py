"""Datasets for industrial anomaly detection: layout scanners, checks, the Dataset, the DataModule
and anomaly synthesis. See ARCHITECTURE.md for the contracts.

Names are imported on first use (PEP 562), so `import datamodules.records` or
`datamodules.embedded` does not pull in Lightning and albumentations."""

from importlib import import_module

_EXPORTS = {
    "AnomalyDataModule": "datamodules.datamodule",
    "ShardSampler": "datamodules.datamodule",
    "AnomalyDataset": "datamodules.dataset",
    "read_image": "datamodules.dataset",
    "read_mask": "datamodules.dataset",
    "LAYOUTS": "datamodules.layouts",
    "list_categories": "datamodules.layouts",
    "load_defects_config": "datamodules.layouts",
    "scan": "datamodules.layouts",
    "SampleRecord": "datamodules.records",
    "CutPaste": "datamodules.synthesis",
    "PerlinAnomaly": "datamodules.synthesis",
    "build_synthesis": "datamodules.synthesis",
    "DatasetError": "datamodules.validate",
    "validate_records": "datamodules.validate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
