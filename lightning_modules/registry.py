"""The one list of detectors: each registers once here, and everything that needs "every detector" reads it.

The CLI imports each registered module so that ``--model=ULSAD`` (a short name) resolves and ``--help`` lists
them; ``python train.py --list-detectors`` prints the table; the shared test suites (contract, export, help
lines, configs) are parametrised over ``registered()`` with each entry's ``test_settings``, so a detector is
tested the moment it is registered and a missing piece (no test settings, a config naming another class, a
README row) is a failing test. A detector added elsewhere (a plugin, a test's temporary module) calls
``register`` with its own entry; ``ANOMALY_LAB_DETECTORS=pkg.module[,other.module]`` names such modules so that
every entry point (train.py and its DDP children, evaluate.py, export.py, the test suites) imports them with the
registry, with no edit of any file here.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DetectorEntry:
    """One detector: its LightningModule (``module``.``name``), what it is in one line, its paper, its config files
    (relative to the repository) and the tiny weights-free settings the shared suites build it with (image_size
    is the suite's). ``variants`` are further contract cases: name suffix → settings on top of ``test_settings``."""

    name: str
    module: str
    summary: str
    paper: str
    configs: tuple[str, ...]
    test_settings: dict[str, Any]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def class_path(self) -> str:
        return f"{self.module}.{self.name}"

    def load(self) -> type:
        """The LightningModule class (imports its module)."""
        return getattr(importlib.import_module(self.module), self.name)

    def contract_cases(self) -> dict[str, dict[str, Any]]:
        """Case name → init settings: the entry's own, then one per variant."""
        cases = {self.name: dict(self.test_settings)}
        cases.update({f"{self.name}-{suffix}": {**self.test_settings, **settings}
                      for suffix, settings in self.variants.items()})
        return cases


_REGISTRY: dict[str, DetectorEntry] = {}


def register(entry: DetectorEntry) -> DetectorEntry:
    """Add a detector; a second entry under a taken name is an error (two classes cannot share a short name)."""
    if entry.name in _REGISTRY and _REGISTRY[entry.name] != entry:
        raise ValueError(f"a detector named {entry.name!r} is already registered ({_REGISTRY[entry.name].class_path})")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> list[DetectorEntry]:
    """Every registered detector, in registration order."""
    return list(_REGISTRY.values())


def import_all() -> list[type]:
    """Import every registered detector's module: LightningCLI resolves short names among imported subclasses."""
    return [entry.load() for entry in registered()]


def detector_table() -> str:
    """One line per detector: name, what it is, paper (``train.py --list-detectors``)."""
    width = max(len(entry.name) for entry in registered())
    return "\n".join(f"{entry.name:<{width}}  {entry.summary} ({entry.paper})" for entry in registered())


_LITE0 = {"backbone": "tf_efficientnet_lite0", "pretrained": False}

register(DetectorEntry(
    name="ULSAD", module="lightning_modules.ulsad",
    summary="local feature reconstruction + global autoencoder with attention, one model per category",
    paper="Patra & Ben Taieb, TMLR 2024",
    configs=("configs/quickstart.yaml", "configs/quickstart_weights_free.yaml", "configs/ulsad/model.yaml",
             "configs/ulsad/mvtec_ad.yaml", "configs/ulsad/mvtec_loco.yaml", "configs/ulsad/visa.yaml", "configs/ulsad/btad.yaml",
             "configs/ulsad/mpdd.yaml"),
    test_settings={"backbone": "resnet18", "pretrained": False, "frn_hidden_scale": 0.125},
    # Table 3's rows without the tie loss: the global map is an attention distance (scaled_dot_product_attention)
    variants={"no-tie": {"use_tie_loss": False}},
))
register(DetectorEntry(
    name="EfficientAD", module="lightning_modules.efficientad",
    summary="PDN student-teacher + autoencoder, one model per category",
    paper="Batzner et al., WACV 2024",
    configs=("configs/efficientad/model.yaml", "configs/efficientad/quickstart.yaml",
             "configs/efficientad/mvtec_ad.yaml", "configs/efficientad/mvtec_loco.yaml"),
    test_settings={"teacher_pretrained": False},
))
register(DetectorEntry(
    name="PUAD", module="lightning_modules.puad",
    summary="EfficientAD (picturable anomalies) plus a feature-space Mahalanobis score (unpicturable ones)",
    paper="LeapMind/PUAD, 2024",
    configs=("configs/puad/model.yaml", "configs/puad/quickstart.yaml", "configs/puad/mvtec_ad.yaml",
             "configs/puad/mvtec_loco.yaml"),
    test_settings={"teacher_pretrained": False},
))
register(DetectorEntry(
    name="OneNIP", module="lightning_modules.onenip",
    summary="one unified model: prompt-guided transformer reconstruction, restoration and a refiner",
    paper="Gao et al., ECCV 2024",
    configs=("configs/onenip/model.yaml", "configs/onenip/quickstart.yaml", "configs/onenip/mvtec_ad.yaml",
             "configs/onenip/visa.yaml", "configs/onenip/btad.yaml"),
    # a unified detector whose forward picks each image's prompt from its pool (cosine similarity, argmax, gather)
    test_settings={**_LITE0, "hidden_dim": 64, "heads": 4, "ffn_dim": 128, "encoder_layers": 1,
                   "decoder_layers": 1, "prompts_per_category": 2},
    # ... or by the image's category (the released code): a second input, category_index, also in the export
    variants={"label": {"prompt_selection": "label"}},
))
register(DetectorEntry(
    name="CRAD", module="lightning_modules.crad",
    summary="one unified model: features read off learnable continuous grids, fused, refined",
    paper="Lee et al., ECCV 2024",
    configs=("configs/crad/model.yaml", "configs/crad/quickstart.yaml", "configs/crad/mvtec_ad.yaml", "configs/crad/visa.yaml"),
    # grid_sample at learned coordinates (per pixel and per image), MobileNetV3 fusion, refinement, box smoothing
    test_settings={**_LITE0, "blocks": 2, "expansion_ratio": 0.5, "smoothing_size": 13, "score_pool_size": 18},
))
register(DetectorEntry(
    name="PatchCore", module="lightning_modules.patchcore",
    summary="memory bank of normal patch features (k-center coreset), nearest-neighbour scores; no training",
    paper="Roth et al., CVPR 2022",
    configs=("configs/patchcore/model.yaml", "configs/patchcore/quickstart.yaml", "configs/patchcore/mvtec_ad.yaml",
             "configs/patchcore/visa.yaml", "configs/patchcore/mvtec_loco.yaml"),
    # a bank per category, searched by the category_index input (masked distances), coreset on a projection
    test_settings={**_LITE0, "layers": ["blocks.2", "blocks.4"], "coreset_ratio": 0.25},
    # ... or one float16 bank for all categories, no second input
    variants={"unified": {"bank": "unified", "bank_dtype": "float16"}},
))


PLUGINS_ENV = "ANOMALY_LAB_DETECTORS"


def import_plugins() -> None:
    """Import the modules named in ``ANOMALY_LAB_DETECTORS`` (comma-separated): each registers its detectors."""
    for name in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(name)


import_plugins()

__all__ = ["PLUGINS_ENV", "DetectorEntry", "detector_table", "import_all", "import_plugins", "register", "registered",
           "unregister"]
