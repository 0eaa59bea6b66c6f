"""ULSAD networks (Patra & Ben Taieb, TMLR 2024), following the official code; see specs/ulsad.md.

Shapes for a 256×256 input (C = 384): pretrained features F 384×32×32, feature reconstruction
network output R 768×32×32 (R_loc | R_glb), global autoencoder output A 384×32×32.
``ULSADModel`` holds the networks, every fitted statistic and the map post-processing; the losses
live in the Lightning module. This file is pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from networks.anomaly_model import AnomalyModel, AnomalyOutput
from networks.backbones import FeatureExtractor, ImageNetNormalize, Pretrained, fuse_features
from networks.statistics import subsampled_quantiles

__all__ = [
    "FeatureReconstructionNetwork",
    "GlobalAutoencoder",
    "ULSADModel",
    "attention_pool",
    "feature_distance",
    "fuse_features",
]


def feature_distance(x: torch.Tensor, y: torch.Tensor, cosine_weight: float) -> torch.Tensor:
    """D_λ(X, Y) = mean_c (X − Y)² + λ·(1 − cos_c(X, Y)), per position: B×C×H×W → B×H×W (spec §4).

    Always computed in float32, also under bf16 autocast: it is a loss and an anomaly map.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        distance = (x - y).pow(2).mean(dim=1)
        if cosine_weight:
            distance = distance + cosine_weight * (1.0 - F.cosine_similarity(x, y, dim=1, eps=1e-8))
    return distance


def attention_pool(query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √C) · V over spatial tokens, with K = V = `key_value` and no projections.

    B×C×H×W in and out (the output has the query's spatial size). ULSAD uses it as
    self-attention of the features (query = F) and as cross-attention with the autoencoder
    output as query (spec §4.2). Float32; `scaled_dot_product_attention` avoids materialising
    the P×P attention matrix where a fused kernel exists.
    """
    height, width = query.shape[-2:]
    with torch.autocast(device_type=query.device.type, enabled=False):
        # One attention head made explicit (B×1×P×C): ONNX's attention translation takes 4-D inputs only.
        queries = einops.rearrange(query.float(), "b c h w -> b 1 (h w) c")
        keys = einops.rearrange(key_value.float(), "b c h w -> b 1 (h w) c")
        pooled = F.scaled_dot_product_attention(queries, keys, keys)  # default scale 1/√C
    return einops.rearrange(pooled, "b 1 (h w) c -> b c h w", h=height, w=width)


def _conv_block(conv: nn.Module, channels: int, relu: bool, **norm_kwargs) -> nn.Sequential:
    layers = [conv, nn.BatchNorm2d(channels, **norm_kwargs)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FeatureReconstructionNetwork(nn.Module):
    """The FRN (`FeatAE` with double_channel=True, spec §2): 384×32² → 768×32².

    Encoder: conv3×3 s2 → 768 (16²), conv3×3 s2 → 1536 (8²), conv3×3 s1 → 1536 (bottleneck,
    BN only). Decoder: deconv4×4 s2 → 768 (16²), deconv4×4 s2 → 384 (32²), deconv5×5 s1 → 768.
    BN + ReLU after every other layer, including the output (surprise #2: the output is ≥ 0
    while the standardised target is signed); `final_relu=False` removes that last ReLU.
    `hidden_scale` scales the 768/1536 hidden widths (1.0 = the paper's network).
    `double_output=False` outputs C channels, R_loc only (the official `double_channel=False`): the
    local-only model of Table 3 rows 1 and 6, which has no global branch to support.
    """

    def __init__(self, in_channels: int = 384, hidden_scale: float = 1.0, final_relu: bool = True,
                 double_output: bool = True) -> None:
        super().__init__()
        wide, wider = round(2 * in_channels * hidden_scale), round(4 * in_channels * hidden_scale)
        self.out_channels = 2 * in_channels if double_output else in_channels
        self.encoder = nn.Sequential(
            _conv_block(nn.Conv2d(in_channels, wide, 3, stride=2, padding=1), wide, relu=True),
            _conv_block(nn.Conv2d(wide, wider, 3, stride=2, padding=1), wider, relu=True),
            _conv_block(nn.Conv2d(wider, wider, 3, stride=1, padding=1), wider, relu=False),
        )
        self.decoder = nn.Sequential(
            _conv_block(nn.ConvTranspose2d(wider, wide, 4, stride=2, padding=1), wide, relu=True),
            _conv_block(
                nn.ConvTranspose2d(wide, in_channels, 4, stride=2, padding=1), in_channels, relu=True
            ),
            _conv_block(
                nn.ConvTranspose2d(in_channels, self.out_channels, 5, stride=1, padding=2),
                self.out_channels,
                relu=final_relu,
            ),
        )
        gain = nn.init.calculate_gain("leaky_relu")
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(module.weight, gain=gain)
        self.to(memory_format=torch.channels_last)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.encoder(features))


def _check_image_size(image_size: int) -> None:
    if image_size < 128 or image_size % 64:
        raise ValueError(
            f"image_size must be a multiple of 64 and at least 128 (the autoencoder resizes to "
            f"image_size/64 − 1 and encodes to 1×1), got {image_size}."
        )


class GlobalAutoencoder(nn.Module):
    """ULSAD's global autoencoder-like network (`ConvAutoEncoder`, spec §3): image → 384×(S/8)².

    EfficientAD's autoencoder with BatchNorm(affine=False, eps=1e-4) + ReLU after every conv
    except the output one, including the 1×1 bottleneck; no dropout. Takes [0, 1] images and
    ImageNet-normalises them itself. Sizes follow the code's formulas for image size S:
    decoder resizes to S/64−1, S/32, S/16−1, S/8−1, S/4−1 and S/8. The bottleneck kernel is
    S/32 (8 at 256 px, as in the code) so the encoder reaches 1×1 at other sizes too.
    """

    def __init__(self, out_channels: int = 384, image_size: int = 256) -> None:
        super().__init__()
        _check_image_size(image_size)
        self.image_size = image_size
        self.normalize = ImageNetNormalize()
        norm = {"eps": 1e-4, "affine": False}
        encoder_channels = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 64)]
        for index, (cin, cout) in enumerate(encoder_channels, start=1):  # each halves the size
            self.add_module(
                f"enconv{index}",
                _conv_block(nn.Conv2d(cin, cout, 4, stride=2, padding=1), cout, True, **norm),
            )
        self.enconv6 = _conv_block(nn.Conv2d(64, 64, image_size // 32), 64, True, **norm)  # → 64×1×1
        # Each decoder stage: resize, then conv4×4 pad 2 grows the map by one pixel.
        self.decoder_sizes = [
            image_size // 64 - 1,
            image_size // 32,
            image_size // 16 - 1,
            image_size // 8 - 1,
            image_size // 4 - 1,
        ]
        for index in range(1, 6):
            self.add_module(
                f"deconv{index}", _conv_block(nn.Conv2d(64, 64, 4, stride=1, padding=2), 64, True, **norm)
            )
        self.last_size = image_size // 8
        # No "deconv6" in the reference code: numbering jumps from 5 to 7.
        self.deconv7 = _conv_block(nn.Conv2d(64, 64, 3, stride=1, padding=1), 64, True, **norm)
        self.deconv8 = nn.Conv2d(64, out_channels, 3, stride=1, padding=1)
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        for index in range(1, 7):
            x = getattr(self, f"enconv{index}")(x)
        for index, size in enumerate(self.decoder_sizes, start=1):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = getattr(self, f"deconv{index}")(x)
        x = F.interpolate(x, size=self.last_size, mode="bilinear", align_corners=False)
        return self.deconv8(self.deconv7(x))


class ULSADModel(AnomalyModel):
    """ULSAD's whole inference path: frozen features, the two branches, their maps, normalisation and fusion.

    Fitted buffers: ``feature_mean`` / ``feature_std`` (1×C×1×1, standardise the fused backbone
    features per channel, fitted on the training images before training, spec §1; zeros = not
    fitted), ``map_quantiles`` ((q_low, q_high) of the local then the global map on held-out normal
    images, spec §5) and the decision threshold of ``AnomalyModel``.

    Map settings (Table 3 switches, also recorded with the quantiles): ``alpha_local`` / ``beta_global``
    are the cosine weights of the local and global distances. ``use_tie_loss=False`` makes the global map
    the distance the global branch was trained on, with weight ``attention_cosine_weight``: the attention
    consistency D(SA(F), CA(A, F)) (spec §7), or D(F, A) when ``use_attention_loss=False`` (Table 3 rows 2, 7).
    ``global_branch=False`` is the local branch alone (Table 3 rows 1 and 6): no autoencoder, an FRN that
    outputs R_loc only, and the normalised local map as the anomaly map (the global settings are unused).
    """

    FITTED_SETTINGS = ("global_branch", "alpha_local", "beta_global", "attention_cosine_weight", "use_tie_loss",
                       "use_attention_loss", "map_blur_sigma", "combine_weights")

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.racm_in1k",
        layers: Sequence[str] = ("layer2", "layer3"),
        pretrained: Pretrained = True,
        weights_file: str | None = None,
        image_size: int = 256,
        feature_channels: int = 384,
        frn_final_relu: bool = True,
        frn_hidden_scale: float = 1.0,
        alpha_local: float = 0.5,
        beta_global: float = 0.5,
        attention_cosine_weight: float = 0.5,
        use_tie_loss: bool = True,
        use_attention_loss: bool = True,
        map_blur_sigma: float = 4.0,
        combine_weights: Sequence[float] = (0.5, 0.5),
        global_branch: bool = True,
    ) -> None:
        super().__init__(image_size)
        if len(layers) != 2:
            raise ValueError(
                f"ULSAD fuses exactly two backbone layers (a shallow and a deep one), got {list(layers)}."
            )
        _check_image_size(image_size)
        self.feature_channels = feature_channels
        self.alpha_local, self.beta_global = alpha_local, beta_global
        self.attention_cosine_weight, self.use_tie_loss = attention_cosine_weight, use_tie_loss
        self.use_attention_loss, self.global_branch = use_attention_loss, global_branch
        self.map_blur_sigma, self.combine_weights = map_blur_sigma, tuple(combine_weights)
        self.feature_extractor = FeatureExtractor(backbone, layers, pretrained, weights_file)
        if self.feature_extractor.reductions[0] != 8:
            raise ValueError(
                f"The first layer must have stride 8 so the features are image_size/8 like the "
                f"autoencoder output; {layers[0]} of {backbone} has stride {self.feature_extractor.reductions[0]}."
            )
        available = sum(self.feature_extractor.channels)
        if feature_channels > available:
            raise ValueError(
                f"feature_channels={feature_channels} exceeds the {available} channels of {backbone} {list(layers)} "
                f"({' + '.join(map(str, self.feature_extractor.channels))}); channel pooling can only average "
                f"channels together, not create new ones. Set feature_channels to at most {available} "
                f"({available} keeps every channel)."
            )
        self.frn = FeatureReconstructionNetwork(
            feature_channels, hidden_scale=frn_hidden_scale, final_relu=frn_final_relu, double_output=global_branch
        )
        self.autoencoder = GlobalAutoencoder(feature_channels, image_size) if global_branch else None
        self.register_buffer("feature_mean", torch.zeros(1, feature_channels, 1, 1))
        self.register_buffer("feature_std", torch.zeros(1, feature_channels, 1, 1))
        self.register_buffer("constant_feature_channels", torch.zeros((), dtype=torch.long))
        self.register_buffer("map_quantiles", torch.zeros(4))

    @property
    def weights_source(self) -> str:
        return self.feature_extractor.weights_source

    @property
    def feature_statistics_fitted(self) -> bool:
        return bool(self.feature_std.abs().sum() > 0)

    def statistics_fitted(self) -> bool:
        return self.feature_statistics_fitted and bool(self.map_quantiles.abs().sum() > 0)

    def describe_input(self) -> dict:
        extractor = self.feature_extractor
        return {**super().describe_input(), "normalisation_inside": {
            "backbone": {"mean": list(extractor.input_mean), "std": list(extractor.input_std)},
            "autoencoder": "ImageNet mean/std"}}

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """F_raw: the fused backbone features, B×C×(S/8)², float32, no gradient."""
        shallow, deep = self.feature_extractor(images)
        return fuse_features(shallow, deep, self.feature_channels)

    @torch.no_grad()
    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-channel mean/std (any shape with C elements).

        The reference divides without an epsilon. A channel that is constant over the training set (a
        dead ReLU, common with random weights) would divide by zero; it carries no information, so it
        is standardised with std 1 (it becomes 0), counted in ``constant_feature_channels``, and every
        other channel is untouched.
        """
        mean, std = mean.reshape(self.feature_mean.shape).float(), std.reshape(self.feature_std.shape).float()
        bad = (~torch.isfinite(std) | ~torch.isfinite(mean)).flatten().nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"Feature statistics are not finite for channels {bad[:16]}; cannot standardise.")
        constant = std <= 1e-12
        self.constant_feature_channels.fill_(int(constant.sum()))
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.where(constant, torch.ones_like(std), std))

    def standardize(self, features_raw: torch.Tensor) -> torch.Tensor:
        return (features_raw.float() - self.feature_mean) / self.feature_std

    def branch_outputs(self, images: torch.Tensor, features_raw: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run all three networks. Pass `features_raw` (from `extract_features`) to reuse cached backbone features.

        Returns features F (standardised target), local R_loc, global_support R_glb and
        autoencoder A, each B×C×(S/8)²; without the global branch, F and R_loc only.
        """
        if not torch.jit.is_tracing() and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"ULSAD was built for {self.image_size}px images, got {tuple(images.shape[-2:])}."
            )
        if features_raw is None:
            features_raw = self.extract_features(images)
        features = self.standardize(features_raw)
        if not self.global_branch:
            return {"features": features, "local": self.frn(features)}
        local, global_support = self.frn(features).split(self.feature_channels, dim=1)
        return {"features": features, "local": local, "global_support": global_support,
                "autoencoder": self.autoencoder(images)}

    # ------------------------------------------------------------------ maps
    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Local and global maps (B×1×S×S), upsampled to the input size and blurred, before normalisation.

        Without the global branch the global map is None.
        """
        outputs = self.branch_outputs(images)
        features = outputs["features"]
        local_map = feature_distance(features, outputs["local"], self.alpha_local)
        if not self.global_branch:
            return self._upsample_and_blur(images, local_map), None
        autoencoder = outputs["autoencoder"]
        if self.use_tie_loss:
            global_map = feature_distance(autoencoder, outputs["global_support"], self.beta_global)
        elif self.use_attention_loss:
            global_map = feature_distance(attention_pool(features, features), attention_pool(autoencoder, features),
                                          self.attention_cosine_weight)
        else:  # the autoencoder regressed the features: score what it learned
            global_map = feature_distance(features, autoencoder, self.attention_cosine_weight)
        maps = self._upsample_and_blur(images, torch.stack([local_map, global_map], dim=1))
        return maps[:, :1], maps[:, 1:]

    def _upsample_and_blur(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """B×h×w or B×K×h×w maps → B×K×S×S. Float32: under bf16 autocast the blur's convolution would round
        the maps to 8 mantissa bits, which creates ties between images and distorts the quantiles."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            maps = maps.float() if maps.dim() == 4 else maps.float().unsqueeze(1)
            maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
            return self._blur(maps)

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        sigma = self.map_blur_sigma
        if sigma <= 0:
            return maps
        kernel = 2 * int(4 * sigma + 0.5) + 1
        return gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[sigma, sigma])

    @torch.no_grad()
    def set_map_quantiles(self, local_values: torch.Tensor, global_values: torch.Tensor | None,
                          q_low: float, q_high: float) -> None:
        """(q_low, q_high) quantiles of each branch's maps on held-out normal images (spec §5).

        Without the global branch its pair stays (0, 0): it is never used.
        """
        fitted = [subsampled_quantiles(values, [q_low, q_high]) for values in (local_values, global_values)
                  if values is not None]
        self.map_quantiles[: 2 * len(fitted)].copy_(torch.cat(fitted).to(self.map_quantiles.device))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """0.1·(M − q_low)/(q_high − q_low) per branch (linear, so it commutes with the blur, spec §5.7), fused."""
        local_map, global_map = self.raw_maps(images)
        q = self.map_quantiles
        local_map = 0.1 * (local_map - q[0]) / (q[1] - q[0])
        if global_map is None:  # the local branch alone
            return AnomalyOutput(local_map, local_map.amax(dim=(-3, -2, -1)))
        global_map = 0.1 * (global_map - q[2]) / (q[3] - q[2])
        w_local, w_global = self.combine_weights
        anomaly_map = w_local * local_map + w_global * global_map
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(-3, -2, -1)))
