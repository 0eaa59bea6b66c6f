"""CRAD (Lee et al., ECCV 2024): one unified model for all categories, reading normal features off continuous grids.

Spec: ``../shared/specs/crad.md``. The model (``networks.crad.CRADModel``) holds the networks and the
scoring; this module holds the loss and the optimiser. Nothing is fitted on data besides the weights and the
decision threshold (held-out normal images). Deviations from the official code, on purpose: the last
checkpoint is tested (the official code keeps the one with the best test-set image AUROC, spec §6), and an
AUROC below 0.5 is reported as it is (the official evaluator flips it, spec §5).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_modules.base import AnomalyDetector
from lightning_modules.feature_cache import FrozenFeatureCache
from networks.crad import CRADModel


class CRAD(AnomalyDetector):
    """CRAD: coordinates → local and global grids → MobileNetV3 fusion → refinement; one model for all categories.

    Args:
        backbone: timm name of the frozen feature extractor (the paper: tf_efficientnet_b4).
        layers: backbone blocks resized to the finest one and concatenated (b4: blocks.2 + blocks.4 = 56 + 160
            channels at strides 8 and 16).
        pretrained: true (fail without weights), "auto" (random weights with a warning), "file" (weights_file only:
            the paper configs, whose weights no timm tag is shown to equal) or false.
        weights_file: a local weights file for the backbone (timm layout, or lukemelas, e.g. efficientnet-b4-6ed6700e.pth).
        backbone_padding: dynamic (timm's TF "same" padding, computed per input) or lukemelas (the static padding of
            the lukemelas EfficientNet-PyTorch port that the official code runs, computed for b4's 380 px).
        image_size: taken from data.image_size; leave unset (a multiple of the layers' largest stride).
        grids: both (the paper), local (pixel-wise grid only) or global (image-wise grid only).
        local_grid_size: resolution R of the local grid, R×R cells of C-d vectors (8).
        global_grid_size: resolution R of the global grid, R×R cells each holding a C×H×W map (4).
        blocks: MobileNetV3 bottlenecks in the fusion CNN (11).
        expansion_ratio: their expansion width over the fusion width: 2.0 = CRAD (864 with b4), 0.5 = CRAD-S (216).
        jitter_std: σ of the Gaussian noise on the local coordinates in training (0.05; 0 turns jitter off).
        jitter_probability: probability that a training batch's local coordinates are jittered (0.5).
        refinement: blend input and reconstruction by the similarity S (the paper); false trains and scores f^n.
        weighted_loss: the loss on the refined x̂, i.e. (1 − S)²-weighted (the official code); false = the spec's
            unweighted variant, MSE(f^n, x), with the refinement kept for scoring.
        gate_weight: weight of the binary MSE gate M in S (0.3).
        cosine_weight: weight of the cosine similarity in S (0.7).
        gate_scale: M = 1 − round(clip(gate_scale · MSE, 0, 1)): the gate opens at MSE ≤ 0.5 / gate_scale (0.05 → 10).
        smoothing_size: box filter applied to the upsampled disparity map (21 at 224 px).
        score_pool_size: image score = max of the map's mean over windows of this size, stride 1 (32 at 224 px).
        lr: AdamW learning rate of everything but the grids (1e-3).
        grid_lr: AdamW learning rate of the grids (0.1).
        weight_decay: AdamW weight decay, grids included (0.01).
        lr_step_epochs: StepLR step size in epochs (40 of 50); the rates drop ×0.1 there.
        cache_features: compute the frozen backbone's features once per training image (no augmentation).
        threshold_fpr: target false-positive rate of the decision threshold on validation normal images.
        max_maps_per_category: how many test maps per category are saved as images.
    """

    trainer_defaults: ClassVar[dict[str, Any]] = {"max_epochs": 50, "gradient_clip_val": 0.1}

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b4",
        layers: list[str] | None = None,
        pretrained: bool | str = True,
        weights_file: str | None = None,
        backbone_padding: str = "dynamic",
        image_size: int | None = None,
        grids: str = "both",
        local_grid_size: int = 8,
        global_grid_size: int = 4,
        blocks: int = 11,
        expansion_ratio: float = 2.0,
        jitter_std: float = 0.05,
        jitter_probability: float = 0.5,
        refinement: bool = True,
        weighted_loss: bool = True,
        gate_weight: float = 0.3,
        cosine_weight: float = 0.7,
        gate_scale: float = 0.05,
        smoothing_size: int = 21,
        score_pool_size: int = 32,
        lr: float = 1e-3,
        grid_lr: float = 0.1,
        weight_decay: float = 0.01,
        lr_step_epochs: int = 40,
        cache_features: bool = True,
        threshold_fpr: float = 0.05,
        max_maps_per_category: int = 6,
    ) -> None:
        super().__init__(threshold_fpr=threshold_fpr, max_maps_per_category=max_maps_per_category)
        self.save_hyperparameters()
        self.model = CRADModel(
            backbone=backbone, layers=layers or ["blocks.2", "blocks.4"], pretrained=pretrained,
            weights_file=weights_file, backbone_padding=backbone_padding, image_size=image_size or 224, grids=grids, local_grid_size=local_grid_size,
            global_grid_size=global_grid_size, blocks=blocks, expansion_ratio=expansion_ratio, jitter_std=jitter_std,
            jitter_probability=jitter_probability, refinement=refinement, gate_weight=gate_weight,
            cosine_weight=cosine_weight, gate_scale=gate_scale, smoothing_size=smoothing_size,
            score_pool_size=score_pool_size,
        )
        self.weights_source = self.model.weights_source
        self.feature_cache = FrozenFeatureCache(enabled=cache_features)

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """MSE between the refined output x̂ and the input features x (spec §4), or MSE(f^n, x) unweighted."""
        features = self.feature_cache(batch["index"], batch["image"], self.model.extract_features)
        reconstruction = self.model.reconstruct(features)
        output = self.model.refined(features, reconstruction) if self.hparams.weighted_loss else reconstruction
        return {"loss_mse": (output - features).pow(2).mean()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.log_losses(self.loss_terms(batch), batch_size=batch["image"].shape[0])

    def build_optimizers(self, total_steps: int) -> dict[str, Any]:
        """AdamW, two groups: the grids at grid_lr, the rest at lr; weight decay on both (spec §6, surprise 6)."""
        grids = {id(p) for p in self.model.grid_parameters()}
        network = [p for p in self.model.parameters() if p.requires_grad and id(p) not in grids]
        groups = [{"params": network, "lr": self.hparams.lr},
                  {"params": self.model.grid_parameters(), "lr": self.hparams.grid_lr}]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.hparams.lr_step_epochs, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "grids": self.model.grids, "refinement": self.model.refinement,
                "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
