"""CRAD networks (Lee et al., ECCV 2024): normal features read from learnable continuous grids.

Follows the official code (tae-mo/CRAD, "Final Ver." c8f8e43) as ``../shared/specs/crad.md``
records it. Shapes at 224 px with EfficientNet-b4 levels of strides 8 and 16:

- frozen features x: 56×28×28 and 160×14×14 → the coarse level resized ×2 (align_corners=True) and
  concatenated: C×H×W = 216×28×28;
- coordinates: per pixel, v^l = tanh(conv1×1(tanh(conv1×1(x)))) ∈ (−1, 1)^{2×H×W}; per image,
  v^g = tanh(linear(tanh(linear(mean_hw x)))) ∈ (−1, 1)^2;
- grids, read with ``grid_sample`` (bilinear, align_corners=False, zero padding): the local grid
  G_l (C×8×8, one lattice of C-d vectors shared by every pixel) at v^l gives f^l (C×H×W); the
  global grid G_g ((C·H·W)×4×4, each cell a whole feature map) at v^g gives f^g (C×H×W);
- fusion: [f^g; f^l] (2C channels) → 11 MobileNetV3 bottlenecks → 1×1 "recover" conv → f^n (C×H×W);
- refinement: S = 0.3·M + 0.7·cos(f^n, x) per pixel, M = 1 where mean_c (f^n − x)² ≤ 10; x̂ = S·x + (1 − S)·f^n;
- scoring: d = ‖x̂ − x‖₂ over channels, bilinear up to the image (align_corners=True), a 21×21 box
  filter, and the image score = max of the 32×32 (stride 1) window mean.

Every size follows from the backbone and the image: nothing here knows 216, 432 or 28. The losses
and the optimiser live in ``lightning_modules/crad.py``. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.anomaly_model import AnomalyModel, AnomalyOutput
from networks.backbones import FeatureExtractor, Pretrained
from networks.feature_maps import at_least_float32, fuse_to_stride, window_mean

GRID_CHOICES = ("both", "local", "global")


# ---------------------------------------------------------------------------------------------- pieces
def sample_local_grid(grid: Tensor, coordinates: Tensor) -> Tensor:
    """f^l: the local grid (1×C×R×R) read at every pixel's coordinate (B×2×H×W, (u, v) = (width, height)
    in [−1, 1]); bilinear, align_corners=False, zero padding (spec §2c). Returns B×C×H×W."""
    batch = coordinates.shape[0]
    return F.grid_sample(grid.expand(batch, -1, -1, -1), coordinates.permute(0, 2, 3, 1), mode="bilinear",
                         padding_mode="zeros", align_corners=False)


def sample_global_grid(grid: Tensor, coordinates: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """f^g: the global grid (1×(C·H·W)×R×R, each cell a whole C×H×W map) read at each image's coordinate
    (B×2); bilinear, align_corners=False, zero padding. The sampled vector is the map with channel index
    c·H·W + h·W + w, as the official reshape has it (spec §2c). Returns B×C×H×W."""
    sampled = F.grid_sample(grid, coordinates.reshape(1, -1, 1, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # 1×(C·H·W)×B×1
    channels, height, width = shape
    return einops.rearrange(sampled, "1 (c h w) b 1 -> b c h w", c=channels, h=height, w=width)


def refine(features: Tensor, reconstruction: Tensor, gate_weight: float = 0.3, cosine_weight: float = 0.7,
           gate_scale: float = 0.05) -> Tensor:
    """CRAD's feature refinement (spec §3), per pixel over channels:
    M = 1 − round(clip(gate_scale · mean_c (f^n − x)², 0, 1)) (binary: 1 where the MSE ≤ 0.5 / gate_scale),
    S = gate_weight·M + cosine_weight·cos(f^n, x), x̂ = S·x + (1 − S)·f^n. The cosine is not detached."""
    squared_error = (reconstruction - features).pow(2).mean(dim=1)
    gate = 1 - torch.round((gate_scale * squared_error).clamp(0, 1))
    cosine = F.cosine_similarity(reconstruction, features, dim=1, eps=1e-8)
    similarity = (gate_weight * gate + cosine_weight * cosine).unsqueeze(1)
    return similarity * features + (1 - similarity) * reconstruction


def box_smooth(maps: Tensor, size: int) -> Tensor:
    """``avg_pool2d(maps, size, stride=1, padding=size // 2)`` with the zero padding counted (the border sum over
    size², spec §5), computed separably: a 21×21 box is 42 additions per pixel instead of 441."""
    half = size // 2
    rows = F.avg_pool2d(maps, (size, 1), stride=1, padding=(half, 0))
    return F.avg_pool2d(rows, (1, size), stride=1, padding=(0, half))


class HardSigmoid(nn.Module):
    """relu6(x + 3) / 6, the official ``Hsigmoid``. Not ``nn.Hardsigmoid``: its backward multiplies by float32's 1/6
    even in float64 (3e-8 off), which put a float64 training step 1e-9 away from the official one; this one
    is 1e-12 away. In float32 the two agree to rounding."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3.0) / 6.0


class InvertedResidual(nn.Module):
    """The official ``MobileBottleneck`` (k=3, stride 1, SE, h-swish), spec §3: 1×1 expand (no bias) → BN →
    h-swish → 3×3 depthwise (no bias) → BN → squeeze-excitation → h-swish → 1×1 project (no bias) → BN, plus
    the identity. Written out because torchvision's ``InvertedResidual`` orders SE after the depthwise
    activation and gives its SE biased convolutions with rounded widths: other numbers, other parameters."""

    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, expansion, 1, bias=False), nn.BatchNorm2d(expansion),
                                    nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(expansion, expansion, 3, padding=1, groups=expansion, bias=False),
                                       nn.BatchNorm2d(expansion))
        self.excitation = nn.Sequential(nn.Linear(expansion, expansion // 4, bias=False), nn.ReLU(),
                                        nn.Linear(expansion // 4, expansion, bias=False), HardSigmoid())
        self.activation = nn.Hardswish()
        self.project = nn.Sequential(nn.Conv2d(expansion, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.depthwise(self.expand(x))
        hidden = hidden * self.excitation(hidden.mean(dim=(2, 3)))[:, :, None, None]
        return x + self.project(self.activation(hidden))


def _normal_init(module: nn.Module, std: float = 0.01) -> None:
    """The official initializer (method "normal", spec §2a): N(0, 0.01²) weights and zero biases for every
    Conv2d and Linear, BN γ = 1, β = 0. Applied to the trained parts only, never to the backbone."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------------------------- the model
class CRADModel(AnomalyModel):
    """CRAD: backbone, coordinate predictors, grids, fusion CNN, refinement and scoring (module docstring).

    grids: "both" (the paper), "local" or "global" (ablations: the fusion CNN then takes C channels, not 2C).
    expansion_ratio: the bottlenecks' expansion width over the fusion width: 2.0 for CRAD (864 = 2 × 432 with b4),
        0.5 for CRAD-S (216).
    refinement: false scores and trains the plain reconstruction f^n (x̂ = f^n).
    jitter_std / jitter_probability: Gaussian noise on the local coordinates, drawn for a whole batch with that
        probability, in training mode only (spec §2d).
    """

    # The decision threshold is a quantile of scores computed under these settings.
    FITTED_SETTINGS = ("refinement", "gate_weight", "cosine_weight", "gate_scale", "smoothing_size", "score_pool_size")

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b4",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        pretrained: Pretrained = True,
        weights_file: str | None = None,
        backbone_padding: str = "dynamic",
        image_size: int = 224,
        grids: str = "both",
        local_grid_size: int = 8,
        global_grid_size: int = 4,
        blocks: int = 11,
        expansion_ratio: float = 2.0,
        jitter_std: float = 0.05,
        jitter_probability: float = 0.5,
        refinement: bool = True,
        gate_weight: float = 0.3,
        cosine_weight: float = 0.7,
        gate_scale: float = 0.05,
        smoothing_size: int = 21,
        score_pool_size: int = 32,
    ) -> None:
        super().__init__(image_size)
        if grids not in GRID_CHOICES:
            raise ValueError(f"grids must be one of {GRID_CHOICES}, got {grids!r}")
        if smoothing_size < 1 or smoothing_size % 2 == 0:
            raise ValueError(f"smoothing_size must be odd (a centred box filter), got {smoothing_size}")
        if not 1 <= score_pool_size <= image_size:
            raise ValueError(f"score_pool_size must lie in [1, image_size={image_size}], got {score_pool_size}")
        self.feature_extractor = FeatureExtractor(backbone, layers, pretrained, weights_file, backbone_padding)
        stride = min(self.feature_extractor.reductions)
        if image_size % max(self.feature_extractor.reductions):
            raise ValueError(f"image_size {image_size} must be a multiple of the backbone layers' largest stride "
                             f"{max(self.feature_extractor.reductions)}")
        self.channels = sum(self.feature_extractor.channels)
        self.feature_size = image_size // stride
        self.grids, self.refinement = grids, refinement
        self.jitter_std, self.jitter_probability = float(jitter_std), float(jitter_probability)
        self.gate_weight, self.cosine_weight, self.gate_scale = float(gate_weight), float(cosine_weight), float(gate_scale)
        self.smoothing_size, self.score_pool_size = int(smoothing_size), int(score_pool_size)
        channels, size = self.channels, self.feature_size

        self.local_coordinates = self.global_coordinates = None
        self.local_grid = self.global_grid = None
        if grids in ("both", "local"):
            self.local_coordinates = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.Tanh(),
                                                   nn.Conv2d(channels, 2, 1), nn.Tanh())
            self.local_grid = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, channels, local_grid_size,
                                                                              local_grid_size)))
        if grids in ("both", "global"):
            self.global_coordinates = nn.Sequential(nn.Linear(channels, channels), nn.Tanh(),
                                                    nn.Linear(channels, 2), nn.Tanh())
            self.global_grid = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, channels * size * size,
                                                                               global_grid_size, global_grid_size)))
        fusion_channels = channels * (2 if grids == "both" else 1)
        self.fusion = nn.Sequential(*(InvertedResidual(fusion_channels, round(expansion_ratio * fusion_channels))
                                      for _ in range(blocks)))
        self.recover = nn.Conv2d(fusion_channels, channels, 1, bias=False)
        for trained in (self.local_coordinates, self.global_coordinates, self.fusion, self.recover):
            if trained is not None:
                _normal_init(trained)

    # ------------------------------------------------------------------ state
    @property
    def weights_source(self) -> str:
        return self.feature_extractor.weights_source

    def grid_parameters(self) -> list[nn.Parameter]:
        """The grids: the optimiser gives them their own learning rate (spec §6)."""
        return [grid for grid in (self.local_grid, self.global_grid) if grid is not None]

    # ------------------------------------------------------------------ features, coordinates, reconstruction
    def extract_features(self, images: Tensor) -> Tensor:
        """Frozen backbone maps, all resized to the finest level (align_corners=True) and concatenated:
        B×C×H×W float32 (spec §1)."""
        return fuse_to_stride(self.feature_extractor(images), (self.feature_size, self.feature_size))

    def coordinates(self, features: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(v^l B×2×H×W, v^g B×2), both in (−1, 1), before any jitter; None for a grid the model does not have.
        Float32 even under autocast: a bf16 coordinate would move the sample by up to 1/60 of a local cell."""
        with torch.autocast(features.device.type, enabled=False):
            features = at_least_float32(features)
            local = None if self.local_coordinates is None else self.local_coordinates(features)
            pooled = features.mean(dim=(2, 3))
            global_ = None if self.global_coordinates is None else self.global_coordinates(pooled)
        return local, global_

    def jitter(self, local: Tensor) -> Tensor:
        """Training only: with probability ``jitter_probability`` per batch, N(0, jitter_std²) on every local
        coordinate, after the tanh and not clipped (spec §2d)."""
        if self.training and self.jitter_std > 0 and float(torch.rand(())) < self.jitter_probability:
            return local + torch.randn_like(local) * self.jitter_std
        return local

    def sample_grids(self, features: Tensor) -> Tensor:
        """The fusion CNN's input: [f^g; f^l] (those the model has), float32."""
        local, global_ = self.coordinates(features)
        sampled = []
        with torch.autocast(features.device.type, enabled=False):
            if global_ is not None:
                shape = (self.channels, self.feature_size, self.feature_size)
                sampled.append(sample_global_grid(at_least_float32(self.global_grid), global_, shape))
            if local is not None:
                sampled.append(sample_local_grid(at_least_float32(self.local_grid), self.jitter(local)))
        return torch.cat(sampled, dim=1)

    def reconstruct(self, features: Tensor) -> Tensor:
        """f^n: the normal features the grids and the fusion CNN give for these features, B×C×H×W float32."""
        fused = self.fusion(self.sample_grids(features).contiguous(memory_format=torch.channels_last))
        return at_least_float32(self.recover(fused))

    def refined(self, features: Tensor, reconstruction: Tensor) -> Tensor:
        """x̂ (spec §3), or f^n itself when refinement is off."""
        if not self.refinement:
            return reconstruction
        return refine(at_least_float32(features), at_least_float32(reconstruction), self.gate_weight,
                      self.cosine_weight, self.gate_scale)

    # ------------------------------------------------------------------ inference
    def maps_and_score(self, features: Tensor, reconstruction: Tensor) -> AnomalyOutput:
        """d = ‖x̂ − x‖₂ over channels, bilinear (align_corners=True) to the image, box-smoothed; score = max of the
        score_pool_size² window mean, stride 1, no padding (spec §5)."""
        disparity = (self.refined(features, reconstruction) - at_least_float32(features)).norm(dim=1, keepdim=True)
        upsampled = F.interpolate(disparity, size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=True)
        anomaly_map = box_smooth(upsampled, self.smoothing_size)
        return AnomalyOutput(anomaly_map, window_mean(anomaly_map, self.score_pool_size).flatten(1).amax(dim=1))

    def forward(self, images: Tensor) -> AnomalyOutput:
        features = self.extract_features(images)
        return self.maps_and_score(features, self.reconstruct(features))


__all__ = [
    "GRID_CHOICES",
    "CRADModel",
    "InvertedResidual",
    "box_smooth",
    "refine",
    "sample_global_grid",
    "sample_local_grid",
]
