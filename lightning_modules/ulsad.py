"""ULSAD (Patra & Ben Taieb, TMLR 2024): local feature reconstruction + global attention branch.

Spec: ``../shared/specs/ulsad.md``. The model (``networks.ulsad.ULSADModel``) holds the networks,
the fitted statistics and the map post-processing; this module holds the loss stack and says when
each statistic is fitted: feature standardisation on the training images before training, map
quantiles on held-out normal images after it. The reference code's evaluation leaks are fixed
(spec §8): quantiles come from the validation split (never test images), the tested checkpoint is
the last one (no choice on test metrics), and evaluation loaders drop no image.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_modules.base import DEFAULT_IMAGE_SIZE, AnomalyDetector
from lightning_modules.feature_cache import FrozenFeatureCache
from networks.statistics import channel_moments, channel_sums
from networks.ulsad import ULSADModel, attention_pool, feature_distance


class ULSAD(AnomalyDetector):
    """ULSAD: a local feature-reconstruction branch and a global autoencoder branch with attention.

    Args:
        backbone: timm name of the frozen feature extractor (the paper: WideResNet-50).
        layers: the two backbone layers fused into the features; the first must have stride 8.
        pretrained: true (fail without weights), "auto" (random weights with a warning), "file" (weights_file only:
            the paper configs, whose weights no timm tag is shown to equal) or false.
        weights_file: a local weights file for the backbone (timm layout, or lukemelas for tf_efficientnet).
        image_size: taken from data.image_size; leave unset.
        feature_channels: C, the width the two layers are channel-averaged to (the paper's 384 = 512 + 1024
            channels in groups of four); at most their sum (e.g. 152 keeps every channel of Lite0's blocks.2 + blocks.4).
        alpha_local: α, cosine weight of the local loss and map (0 = plain L2 reconstruction).
        beta_global: β, cosine weight of the tying loss and the global map.
        lambda_attn_cos: cosine weight of the attention loss; null ties it to β as the official code does (spec §8.1).
        use_attention_loss: false makes the autoencoder regress the features directly, D(F, A).
        use_tie_loss: false drops the tying loss; R_glb is then untrained, so the global map becomes the distance the
            autoencoder was trained on: the attention consistency D(SA(F), CA(A, F)) (spec §7), or D(F, A) with
            use_attention_loss false (Table 3 rows 2 and 7).
        global_branch: false trains and scores the local branch alone (Table 3 rows 1 and 6): no autoencoder, an FRN
            that outputs R_loc only; beta_global, lambda_attn_cos, use_attention_loss, use_tie_loss and
            combine_weights are then unused.
        frn_final_relu: keep the reference ReLU after the FRN's last layer (spec surprise #2).
        frn_hidden_scale: scale of the FRN's hidden widths (1.0 = the paper's network).
        q_low: lower map quantile of the normalisation, fitted on validation normal images.
        q_high: upper map quantile of the normalisation.
        map_blur_sigma: σ of the Gaussian blur of each map (0 = none).
        combine_weights: weights of the normalised local and global maps in the final map.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        lr_milestones: epochs at which the learning rate drops ×0.1 (default [200]).
        cache_features: compute the frozen backbone's features once per training image.
        threshold_fpr: target false-positive rate of the decision threshold on validation normal images.
        max_maps_per_category: how many test maps per category are saved as images.
    """

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
        global_branch: bool = True,
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
        threshold_fpr: float = 0.05,
        max_maps_per_category: int = 6,
    ) -> None:
        super().__init__(threshold_fpr=threshold_fpr, max_maps_per_category=max_maps_per_category)
        image_size = image_size or DEFAULT_IMAGE_SIZE  # the CLI passes data.image_size
        self.save_hyperparameters()
        self.model = ULSADModel(
            backbone=backbone, layers=layers or ["layer2", "layer3"], pretrained=pretrained,
            weights_file=weights_file, image_size=image_size, feature_channels=feature_channels,
            frn_final_relu=frn_final_relu, frn_hidden_scale=frn_hidden_scale, alpha_local=alpha_local,
            beta_global=beta_global, attention_cosine_weight=beta_global if lambda_attn_cos is None else lambda_attn_cos,
            use_tie_loss=use_tie_loss, use_attention_loss=use_attention_loss, map_blur_sigma=map_blur_sigma,
            combine_weights=combine_weights, global_branch=global_branch,
        )
        self.weights_source = self.model.weights_source
        self.feature_cache = FrozenFeatureCache(enabled=cache_features)

    # ------------------------------------------------------------------ statistics on training images
    def fit_training_statistics(self, training_batches: Iterable[dict[str, Any]]) -> None:
        """Per-channel mean/std of the fused features over the training images (spec §1)."""
        if self.model.feature_statistics_fitted:
            return  # restored from a checkpoint
        sums = self.collect(training_batches, lambda batch: channel_sums(self.model.extract_features(batch["image"])))
        self.model.set_feature_statistics(*channel_moments(sums))

    # ------------------------------------------------------------------ losses
    def loss_terms(self, features: Tensor, images: Tensor) -> dict[str, Tensor]:
        """The three ULSAD loss terms for standardised features F of a batch of images (spec §4)."""
        hp, model = self.hparams, self.model
        if not model.global_branch:
            return {"loss_local": feature_distance(features, model.frn(features), hp.alpha_local).mean()}
        local, global_support = model.frn(features).split(model.feature_channels, dim=1)
        autoencoder = model.autoencoder(images)
        terms = {"loss_local": feature_distance(features, local, hp.alpha_local).mean()}
        if hp.use_attention_loss:
            with torch.no_grad():
                target = attention_pool(features, features)
            attended = attention_pool(autoencoder, features)
            terms["loss_global"] = feature_distance(target, attended, model.attention_cosine_weight).mean()
        else:
            terms["loss_global"] = feature_distance(features, autoencoder, model.attention_cosine_weight).mean()
        if hp.use_tie_loss:
            terms["loss_tie"] = feature_distance(autoencoder, global_support, hp.beta_global).mean()
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not self.model.feature_statistics_fitted:
            raise RuntimeError("ULSAD feature mean/std are not fitted; fit_training_statistics runs before training.")
        raw = self.feature_cache(batch["index"], batch["image"], self.model.extract_features)
        terms = self.loss_terms(self.model.standardize(raw), batch["image"])
        return self.log_losses(terms, batch_size=batch["image"].shape[0])

    def build_optimizers(self, total_steps: int) -> dict[str, Any]:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        milestones = self.hparams.lr_milestones or [200]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ calibration on held-out normal images
    def calibration_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        local_map, global_map = self.model.raw_maps(batch["image"][batch["label"] == 0])
        if global_map is None:
            return {"local": local_map.flatten(1)}
        return {"local": local_map.flatten(1), "global": global_map.flatten(1)}

    def fit_calibration(self, collected: dict[str, Tensor], training_batches: Iterable[dict[str, Any]]) -> None:
        """Map quantiles from the validation split's normal images (spec §5, minus the test-set leak)."""
        self.model.set_map_quantiles(collected["local"], collected.get("global"), self.hparams.q_low,
                                     self.hparams.q_high)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints written before this buffer existed count no constant channels.
        checkpoint["state_dict"].setdefault("model.constant_feature_channels", torch.zeros((), dtype=torch.long))

    def run_info(self) -> dict[str, Any]:
        q = self.model.map_quantiles.tolist()
        extractor = self.model.feature_extractor
        return {**super().run_info(), "map_quantiles": {"local": q[:2], "global": q[2:]},
                "backbone_input_normalization": {"mean": list(extractor.input_mean), "std": list(extractor.input_std)},
                "feature_statistics_fitted": self.model.feature_statistics_fitted,
                "constant_feature_channels": int(self.model.constant_feature_channels)}
