"""ULSAD (Patra & Ben Taieb, TMLR 2024): local feature reconstruction + global attention branch.

Spec: ``../shared/specs/ulsad.md``. What is particular to ULSAD lives here: the loss stack, the
feature standardisation fitted before training, and the map quantiles fitted on held-out normal
images after training. The reference code's evaluation leaks are fixed (spec §8): quantiles come
from the validation split (never test images), the tested checkpoint is the last one (no choice
on test metrics), and evaluation loaders drop no image.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from lightning_modules.base import DEFAULT_IMAGE_SIZE, AnomalyDetector, DetectorOutput
from networks.ulsad import ULSADNetwork, attention_pool, feature_distance

MAX_QUANTILE_VALUES = 2**24  # torch.quantile's input limit; the reference code subsamples the same way


class ULSAD(AnomalyDetector):
    """ULSAD detector.

    ``feature_channels``: C, the width the two backbone layers are channel-averaged to (the paper's
    384 = WideResNet-50's 512 + 1024 channels in groups of four); at most their sum (the sum keeps
    every channel, e.g. 152 for EfficientNet-Lite0's blocks.2 + blocks.4).

    Table 3 ablation switches (all config keys):
      ``alpha_local``      α, cosine weight of the local loss and local map (0 = plain L2 reconstruction)
      ``beta_global``      β, cosine weight of the tying loss and global map
      ``lambda_attn_cos``  cosine weight of the attention loss; ``None`` ties it to β as the official
                           code does (spec §8.1)
      ``use_attention_loss``  False → the AE regresses the pretrained features directly, D(F, A)
      ``use_tie_loss``     False → drop the tying loss; the global map then becomes the attention
                           consistency distance D(SA(F), CA(A, F)), since R_glb is untrained (spec §7)
    """

    checkpoint_init_overrides: ClassVar[dict[str, Any]] = {"pretrained": False, "weights_file": None}

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.racm_in1k",
        layers: list[str] | None = None,
        pretrained: bool | str = True,
        weights_file: str | None = None,
        image_size: int | None = None,
        feature_channels: int = 384,
        alpha_local: float = 0.5,
        beta_global: float = 0.5,
        lambda_attn_cos: float | None = None,
        use_attention_loss: bool = True,
        use_tie_loss: bool = True,
        frn_final_relu: bool = True,
        frn_hidden_scale: float = 1.0,
        q_low: float = 0.9,
        q_high: float = 0.995,
        map_blur_sigma: float = 4.0,
        combine_weights: tuple[float, float] = (0.5, 0.5),
        lr: float = 2e-4,
        weight_decay: float = 2e-5,
        lr_milestones: list[int] | None = None,
        cache_features: bool = True,
        max_maps_per_category: int = 6,
    ) -> None:
        super().__init__(max_maps_per_category=max_maps_per_category)
        image_size = image_size or DEFAULT_IMAGE_SIZE  # the CLI passes data.image_size
        self.save_hyperparameters()
        self.network = ULSADNetwork(
            backbone=backbone, layers=layers or ["layer2", "layer3"], pretrained=pretrained,
            weights_file=weights_file, image_size=image_size, feature_channels=feature_channels,
            frn_final_relu=frn_final_relu, frn_hidden_scale=frn_hidden_scale,
        )
        self.weights_source = self.network.feature_extractor.weights_source
        self.attention_cosine_weight = beta_global if lambda_attn_cos is None else lambda_attn_cos
        # (q_low, q_high) of the local map, then of the global map; zeros = not fitted yet.
        self.register_buffer("map_quantiles", torch.zeros(4))
        self._feature_cache: dict[int, Tensor] = {}
        self.register_buffer("constant_feature_channels", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ features
    def _standardized_features(self, batch: dict[str, Any]) -> Tensor:
        """F for a training batch; the frozen backbone runs once per image when caching is on."""
        images = batch["image"]
        if not self.hparams.cache_features:
            return self.network.standardize(self.network.extract_features(images))
        indices = batch["index"].tolist()
        missing = [i for i, key in enumerate(indices) if key not in self._feature_cache]
        if missing:
            raw = self.network.extract_features(images[missing])
            for position, features in zip(missing, raw):
                self._feature_cache[indices[position]] = features.detach()
        raw = torch.stack([self._feature_cache[key] for key in indices]).to(images.device)
        return self.network.standardize(raw)

    def fit_pre_training_statistics(self, dataloader) -> None:
        """Per-channel mean/std of the fused features over the training images (spec §1)."""
        if self.network.statistics_fitted:
            return  # restored from a checkpoint
        def channel_sums(batch):
            raw = self.network.extract_features(batch["image"]).double()
            return {"sum": raw.sum(dim=(2, 3)), "sum_sq": (raw**2).sum(dim=(2, 3)),
                    "count": torch.full((raw.shape[0],), raw.shape[2] * raw.shape[3], dtype=torch.float64,
                                        device=raw.device)}
        sums = self.collect(dataloader, channel_sums)
        count = sums["count"].sum()
        mean = sums["sum"].sum(0) / count
        std = (sums["sum_sq"].sum(0) / count - mean**2).clamp_min(0).sqrt()
        # The reference divides without an epsilon. A channel that is constant over the training set (a dead
        # ReLU, common with random weights) would divide by zero; it carries no information, so it is
        # standardised with std 1 (it becomes 0) and every other channel is untouched.
        constant = std <= 1e-12
        self.constant_feature_channels.fill_(int(constant.sum()))
        std = torch.where(constant, torch.ones_like(std), std)
        self.network.set_feature_statistics(mean.float(), std.float())

    # ------------------------------------------------------------------ losses
    def loss_terms(self, features: Tensor, images: Tensor) -> dict[str, Tensor]:
        """The three ULSAD loss terms for standardised features F of a batch of images (spec §4)."""
        hp = self.hparams
        local, global_support = self.network.frn(features).split(self.network.feature_channels, dim=1)
        autoencoder = self.network.autoencoder(images)
        terms = {"loss_local": feature_distance(features, local, hp.alpha_local).mean()}
        if hp.use_attention_loss:
            with torch.no_grad():
                target = attention_pool(features, features)
            attended = attention_pool(autoencoder, features)
            terms["loss_global"] = feature_distance(target, attended, self.attention_cosine_weight).mean()
        else:
            terms["loss_global"] = feature_distance(features, autoencoder, self.attention_cosine_weight).mean()
        if hp.use_tie_loss:
            terms["loss_tie"] = feature_distance(autoencoder, global_support, hp.beta_global).mean()
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        features = self._standardized_features(batch)
        terms = self.loss_terms(features, batch["image"])
        loss = self.total_loss(terms)
        batch_size = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        parameters = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        milestones = self.hparams.lr_milestones or [200]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ maps
    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Local and global maps, upsampled to the input size and blurred, before normalisation."""
        hp = self.hparams
        outputs = self.network(images)
        features, autoencoder = outputs["features"], outputs["autoencoder"]
        local_map = feature_distance(features, outputs["local"], hp.alpha_local)
        if hp.use_tie_loss:
            global_map = feature_distance(autoencoder, outputs["global_support"], hp.beta_global)
        else:
            global_map = feature_distance(attention_pool(features, features), attention_pool(autoencoder, features),
                                          self.attention_cosine_weight)
        # Post-processing in float32: under bf16 autocast the blur's convolution would round the maps
        # to 8 mantissa bits, which creates ties between images and distorts the quantiles.
        with torch.autocast(device_type=images.device.type, enabled=False):
            maps = torch.stack([local_map, global_map], dim=1).float()  # B×2×h×w
            maps = torch.nn.functional.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
            return self._blur(maps[:, :1]), self._blur(maps[:, 1:])

    def _blur(self, maps: Tensor) -> Tensor:
        sigma = self.hparams.map_blur_sigma
        if sigma <= 0:
            return maps
        kernel = 2 * int(4 * sigma + 0.5) + 1
        return gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[sigma, sigma])

    def _normalize(self, local_map: Tensor, global_map: Tensor) -> tuple[Tensor, Tensor]:
        """0.1·(M − q_low)/(q_high − q_low) per branch; linear, so it commutes with the blur (spec §5.7)."""
        if not bool(self.map_quantiles.abs().sum() > 0):
            return local_map, global_map
        q = self.map_quantiles
        return (0.1 * (local_map - q[0]) / (q[1] - q[0]), 0.1 * (global_map - q[2]) / (q[3] - q[2]))

    def predict(self, images: Tensor) -> DetectorOutput:
        local_map, global_map = self._normalize(*self.raw_maps(images))
        w_local, w_global = self.hparams.combine_weights
        return DetectorOutput(anomaly_map=w_local * local_map + w_global * global_map)

    # ------------------------------------------------------------------ calibration
    def calibration_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        normal = batch["label"] == 0
        local_map, global_map = self.raw_maps(batch["image"][normal])
        return {"local": local_map.flatten(1), "global": global_map.flatten(1)}

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """Map quantiles from the validation split's normal images (spec §5, minus the test-set leak)."""
        hp = self.hparams
        levels = torch.tensor([hp.q_low, hp.q_high], device=self.device)
        fitted = []
        for name in ("local", "global"):
            values = collected[name].flatten()
            if values.numel() > MAX_QUANTILE_VALUES:
                generator = torch.Generator(device=values.device).manual_seed(0)
                values = values[torch.randperm(values.numel(), generator=generator, device=values.device)
                                [:MAX_QUANTILE_VALUES]]
            fitted.append(torch.quantile(values.to(self.device), levels))
        self.map_quantiles.copy_(torch.cat(fitted))

    def is_calibrated(self) -> bool:
        return bool(self.map_quantiles.abs().sum() > 0)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints written before this buffer existed count no constant channels.
        checkpoint["state_dict"].setdefault("constant_feature_channels", torch.zeros((), dtype=torch.long))

    def run_info(self) -> dict[str, Any]:
        q = self.map_quantiles.tolist()
        extractor = self.network.feature_extractor
        return {**super().run_info(), "map_quantiles": {"local": q[:2], "global": q[2:]},
                "backbone_input_normalization": {"mean": list(extractor.input_mean), "std": list(extractor.input_std)},
                "feature_statistics_fitted": self.network.statistics_fitted,
                "constant_feature_channels": int(self.constant_feature_channels)}
