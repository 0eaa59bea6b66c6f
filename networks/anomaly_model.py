"""The detector contract without Lightning: one ``nn.Module`` per detector that scores images alone.

Like anomalib's ``torch_model``, an ``AnomalyModel`` owns every fitted buffer (feature statistics,
map quantiles, Gaussians, the decision threshold), so a checkpoint's ``state_dict`` is all it needs,
and in eval mode its ``forward`` returns the final anomaly map at the input size and one score per
image, post-processing included. That one graph is what evaluation, prediction on new images, the
benchmark and ONNX / TorchScript export all run. Training (losses, optimisers, when to fit what) is
the LightningModule's business, in ``lightning_modules/``.

``forward`` has no data-dependent branches (no "is it fitted yet?" checks), so it traces and
exports; callers check ``is_calibrated()`` first.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn


class AnomalyOutput(NamedTuple):
    """What ``AnomalyModel.forward`` returns for a batch of B images of S×S pixels."""

    anomaly_map: Tensor  # B×1×S×S float32, larger = more anomalous
    image_score: Tensor  # B float32


class FittedSettingsMismatch(ValueError):
    """A checkpoint's fitted statistics were fitted under a setting that differs from the model's."""


def _plain(value: Any) -> Any:
    """JSON-comparable form of a setting (tuples and lists compare equal)."""
    return json.loads(json.dumps(value))


class AnomalyModel(nn.Module, ABC):
    """Base of every detector's model: the decision threshold and the fitted-settings record.

    Subclasses set ``input_fields`` to the batch fields their ``forward`` takes besides the image
    (e.g. a category id or a prompt image) and ``FITTED_SETTINGS`` to the attributes that change how
    their fitted statistics must be read (e.g. PUAD's ``feature_source``): those are recorded when
    the statistics are fitted, saved in the checkpoint, and loading the checkpoint into a model
    configured otherwise raises ``FittedSettingsMismatch`` instead of scoring silently wrong.
    """

    input_fields: ClassVar[tuple[str, ...]] = ()
    FITTED_SETTINGS: ClassVar[tuple[str, ...]] = ()
    #: Buffers whose size depends on the data (a memory bank, a prompt pool): loading a checkpoint takes the
    #: checkpoint's shape for them, so any checkpoint loads into a freshly built model with no detector code.
    DATA_SIZED_BUFFERS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        # Decision threshold (see fit_decision_threshold); NaN = not fitted.
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.register_buffer("normal_image_score", torch.tensor(float("nan")))
        self.register_buffer("normal_pixel_value", torch.tensor(float("nan")))
        self.fitted_with: dict[str, Any] = {}
        # The categories the fitted state knows, in the order of any category_index input (unified models).
        self.category_names: list[str] = []

    # ------------------------------------------------------------------ the contract
    @abstractmethod
    def forward(self, images: Tensor, **fields: Tensor) -> AnomalyOutput:
        """Anomaly map (B×1×S×S, the input size) and image score (B) of [0, 1] RGB images, in eval mode."""

    def statistics_fitted(self) -> bool:
        """True once the detector's own statistics (quantiles, Gaussians, ...) are fitted."""
        return True

    def is_calibrated(self) -> bool:
        """True when ``forward`` and the threshold are meaningful: statistics and threshold are fitted."""
        return self.statistics_fitted() and self.threshold_fitted()

    def example_fields(self, batch_size: int) -> dict[str, Tensor]:
        """Valid example values of each ``input_fields`` entry for ``batch_size`` images (what export traces with)."""
        return {}

    def describe_input(self) -> dict[str, Any]:
        """What a deployment must feed ``forward`` (written beside an export)."""
        return {"shape": ["batch", 3, self.image_size, self.image_size], "dtype": "float32",
                "range": "[0, 1] RGB, resized to image_size×image_size (normalisation happens inside)",
                "fields": list(self.input_fields)}

    # ------------------------------------------------------------------ decision threshold
    def threshold_fitted(self) -> bool:
        return bool(torch.isfinite(self.image_threshold)) and bool(torch.isfinite(self.pixel_threshold))

    @torch.no_grad()
    def fit_decision_threshold(self, scores: Tensor, anomaly_maps_max: Tensor, anomaly_maps_median: Tensor,
                               false_positive_rate: float) -> None:
        """Thresholds from held-out NORMAL images only, at a target false-positive rate.

        image_threshold: the (1 − fpr) quantile of their image scores, so about fpr of normal images
        score above it. pixel_threshold: the (1 − fpr) quantile of their maps' maxima, so about fpr
        of normal images show any predicted-anomalous pixel. The medians anchor the normalised
        score (0 = a typical normal image, 0.5 = the threshold).
        """
        if not 0 < false_positive_rate < 1:
            raise ValueError(f"the false-positive rate must lie in (0, 1), got {false_positive_rate}")
        level = torch.tensor([1 - false_positive_rate, 0.5], dtype=torch.float64)
        image = torch.quantile(scores.detach().double().cpu(), level)
        pixel = torch.quantile(anomaly_maps_max.detach().double().cpu(), level[:1])
        self.image_threshold.fill_(float(image[0]))
        self.normal_image_score.fill_(float(image[1]))
        self.pixel_threshold.fill_(float(pixel[0]))
        self.normal_pixel_value.fill_(float(anomaly_maps_median.detach().double().cpu().median()))

    def predicted_label(self, image_score: Tensor) -> Tensor:
        """1 where the image score is above the decision threshold."""
        return (image_score > self.image_threshold).long()

    def predicted_mask(self, anomaly_map: Tensor) -> Tensor:
        """1 where the map is above the pixel threshold."""
        return (anomaly_map > self.pixel_threshold).to(torch.uint8)

    def normalized_score(self, image_score: Tensor) -> Tensor:
        """0 at a typical normal image, 0.5 at the threshold, 1 at twice that distance; clipped to [0, 1]."""
        return _normalize(image_score, self.normal_image_score, self.image_threshold)

    def normalized_map(self, anomaly_map: Tensor) -> Tensor:
        """The map on the same scale: 0.5 at the pixel threshold (what the map PNGs show)."""
        return _normalize(anomaly_map, self.normal_pixel_value, self.pixel_threshold)

    # ------------------------------------------------------------------ fitted-settings record
    def current_settings(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self.FITTED_SETTINGS}

    def record_fitted_settings(self) -> None:
        """Call after fitting statistics: remember the settings they were fitted under."""
        self.fitted_with = self.current_settings()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for name in self.DATA_SIZED_BUFFERS:
            if prefix + name in state_dict:
                current = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_extra_state(self) -> dict[str, Any]:
        return {"fitted_with": dict(self.fitted_with), "category_names": list(self.category_names)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        stored = dict((state or {}).get("fitted_with", {}))
        current = self.current_settings()
        different = {name: (value, current[name]) for name, value in stored.items()
                     if name in current and _plain(value) != current[name]}
        if different:
            details = "; ".join(f"{name}={fitted!r} in the checkpoint but {now!r} now"
                                for name, (fitted, now) in different.items())
            raise FittedSettingsMismatch(
                f"This {type(self).__name__} checkpoint's fitted statistics were fitted under other settings: {details}. "
                "They cannot be read under the new setting (the scores would be silently wrong). Evaluate with the "
                "checkpoint's own setting, re-fit the statistics under the new one (evaluate.py --recalibrate), or train a "
                "model with it."
            )
        self.fitted_with = stored
        self.category_names = list((state or {}).get("category_names", []))


def _normalize(values: Tensor, normal: Tensor, threshold: Tensor) -> Tensor:
    scale = (threshold - normal).clamp_min(1e-12)
    return (0.5 + 0.5 * (values - threshold) / scale).clamp(0, 1)
