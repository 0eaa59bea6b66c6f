"""OneNIP (Gao, ECCV 2024): one unified model for all categories, guided by one normal image prompt.

Spec: ``../shared/specs/onenip.md``. The model (``networks.onenip.OneNIPModel``) holds the networks,
the prompt pool and the map fusion; this module holds the loss stack and says when each statistic is
fitted:

- before training, on the training images: the prompt pool (per category, the ``prompts_per_category``
  images whose mean-pooled backbone features are closest to the category's mean), with their backbone
  features cached in the model, so no test batch runs the backbone on a prompt again;
- during training: each image is reconstructed from noisy (jittered) tokens guided by a random normal
  image of its category (``prompt_image``, served by the data module), and a synthetic anomaly of it
  (CutPaste or Perlin) is restored towards its clean features; the refiner learns the synthetic mask;
- after training, on held-out normal images: the fusion scale of the reconstruction and refiner maps
  (the official code takes it over the test set, spec surprise 5), then the decision threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_modules.base import AnomalyDetector
from lightning_modules.distributed import gather_samples
from lightning_modules.feature_cache import FrozenFeatureCache
from networks.onenip import OneNIPModel, dice_loss


class OneNIP(AnomalyDetector):
    """OneNIP: prompt-guided unified feature reconstruction, restoration of synthetic anomalies and a refiner.

    Args:
        backbone: timm name of the frozen feature extractor (the paper: tf_efficientnet_b4).
        layers: backbone blocks whose maps are resized to stride 16 and concatenated (b4: strides 2/4/8/16, 272 channels).
        pretrained: true (fail without weights), "auto" (random weights with a warning), "file" (weights_file only:
            the paper configs, whose weights no timm tag is shown to equal) or false.
        weights_file: a local weights file for the backbone (timm layout, or lukemelas, e.g. efficientnet-b4-6ed6700e.pth).
        backbone_padding: dynamic (timm's TF "same" padding, computed per input) or lukemelas (the static padding of
            the lukemelas EfficientNet-PyTorch port that the official code runs, computed for b4's 380 px).
        image_size: taken from data.image_size; leave unset (a multiple of 16).
        hidden_dim: transformer width (256).
        heads: attention heads (8).
        ffn_dim: encoder feed-forward and decoder MLP width (1024).
        dropout: dropout of attention weights and residual branches (0.1).
        encoder_layers: encoder depth (4).
        decoder_layers: decoder depth (4, plus the final unmasked attention).
        neighbour_window: window of the neighbour mask; null = grid // 2 as the official code (7 at 224 px).
        jitter_scale: feature-jitter scale α (20); 0 turns jitter off.
        jitter_probability: probability that a training batch is jittered (1.0).
        prompt: dynamic (a random normal image of the category, the paper), static (one fixed pool image per
            category) or none (learned queries; with restoration and refiner off, the UniAD-like baseline).
        prompt_selection: similarity (cosine of pooled projected tokens, the paper; needs only the image) or
            label (the pool prompt of the image's category, as the released code; needs the category).
        prompts_per_category: size of each category's prompt pool (1 = the paper's one prompt per class).
        restoration: regress the synthetic anomaly's features towards the clean image's features.
        use_refiner: train and use the refiner (Dice loss on the synthetic masks).
        refiner_loss_weight: weight of the Dice loss (0.5).
        fusion_weights: weights of the reconstruction map and the rescaled refiner map (0.5, 0.5).
        score_pool_size: image score = max of the map average-pooled over this window, stride 1 (16).
        lr: AdamW learning rate (1e-4).
        weight_decay: AdamW weight decay (1e-4).
        lr_step_epochs: StepLR step size in epochs (800 of 1000 in the paper); the rate drops ×0.1 there.
        cache_features: compute the frozen backbone's features of clean images and prompts once per image.
        threshold_fpr: target false-positive rate of the decision threshold on validation normal images.
        max_maps_per_category: how many test maps per category are saved as images.
    """

    training_fields = ("prompt_image",)

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b4",
        layers: list[str] | None = None,
        pretrained: bool | str = True,
        weights_file: str | None = None,
        backbone_padding: str = "dynamic",
        image_size: int | None = None,
        hidden_dim: int = 256,
        heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        neighbour_window: int | None = None,
        jitter_scale: float = 20.0,
        jitter_probability: float = 1.0,
        prompt: str = "dynamic",
        prompt_selection: str = "similarity",
        prompts_per_category: int = 1,
        restoration: bool = True,
        use_refiner: bool = True,
        refiner_loss_weight: float = 0.5,
        fusion_weights: tuple[float, float] = (0.5, 0.5),
        score_pool_size: int = 16,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_step_epochs: int = 800,
        cache_features: bool = True,
        threshold_fpr: float = 0.05,
        max_maps_per_category: int = 6,
    ) -> None:
        super().__init__(threshold_fpr=threshold_fpr, max_maps_per_category=max_maps_per_category)
        if prompts_per_category < 1:
            raise ValueError(f"prompts_per_category must be at least 1, got {prompts_per_category}")
        self.save_hyperparameters()
        self.model = OneNIPModel(
            backbone=backbone, layers=layers or ["blocks.0", "blocks.1", "blocks.2", "blocks.4"],
            pretrained=pretrained, weights_file=weights_file, backbone_padding=backbone_padding,
            image_size=image_size or 224, hidden_dim=hidden_dim, heads=heads, ffn_dim=ffn_dim, dropout=dropout, encoder_layers=encoder_layers,
            decoder_layers=decoder_layers, neighbour_window=neighbour_window, jitter_scale=jitter_scale,
            jitter_probability=jitter_probability, prompt=prompt, prompt_selection=prompt_selection,
            use_refiner=use_refiner, fusion_weights=fusion_weights, score_pool_size=score_pool_size,
        )
        self.weights_source = self.model.weights_source
        self.feature_cache = FrozenFeatureCache(enabled=cache_features)
        self._prompt_hits: list[Tensor] = []

    @property
    def needs_synthetic(self) -> bool:
        return self.hparams.restoration or self.hparams.use_refiner

    # ------------------------------------------------------------------ the prompt pool, before training
    def fit_training_statistics(self, training_batches: Iterable[dict[str, Any]]) -> None:
        """The prompt pool: per category, the training images most typical of it (spec §5 leaves the choice open)."""
        if self.model.prompt == "none" or self.model.prompt_pool_fitted():
            return
        categories: list[tuple[int, str]] = []

        def pooled(batch):
            categories.extend(zip(batch["index"].tolist(), batch["category"]))
            return {"index": batch["index"], "pooled": self.model.extract_features(batch["image"]).mean(dim=(2, 3))}

        seen = self.collect(training_batches, pooled)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[list[tuple[int, str]]] = [None] * torch.distributed.get_world_size()  # type: ignore
            torch.distributed.all_gather_object(everyone, categories)
            categories = [pair for part in everyone for pair in part]
        category_of = dict(categories)
        names = sorted(set(category_of.values()))
        chosen_index, chosen_category = [], []
        for category_id, name in enumerate(names):
            mine = torch.tensor([category_of[int(i)] == name for i in seen["index"].tolist()], device=seen["index"].device)
            pooled_features = torch.nn.functional.normalize(seen["pooled"][mine], dim=1)
            centre = torch.nn.functional.normalize(pooled_features.mean(dim=0), dim=0)
            typical = (pooled_features @ centre).argsort(descending=True)[: self.hparams.prompts_per_category]
            chosen_index += seen["index"][mine][typical].tolist()
            chosen_category += [category_id] * len(typical)
        wanted = set(chosen_index)

        def chosen_features(batch):
            keep = torch.tensor([int(i) in wanted for i in batch["index"].tolist()], device=batch["image"].device)
            return {"index": batch["index"][keep], "features": self.model.extract_features(batch["image"][keep])}

        pool = self.collect(training_batches, chosen_features)
        position = {int(i): p for p, i in enumerate(pool["index"].tolist())}
        order = torch.tensor([position[i] for i in chosen_index], device=pool["features"].device)
        self.model.set_prompt_pool(pool["features"][order], torch.tensor(chosen_category), names)

    # ------------------------------------------------------------------ losses
    def _features(self, indices: Tensor, images: Tensor) -> Tensor:
        return self.feature_cache(indices, images, self.model.extract_features)

    def training_prompts(self, batch: dict[str, Any]) -> Tensor | None:
        """The prompt features of each training image, by the prompt mode."""
        mode = self.model.prompt
        if mode == "none":
            return None
        if mode == "dynamic":
            return self._features(batch["prompt_index"], batch["prompt_image"])
        first_of = {}  # static: the first pool prompt of the image's category
        for position, category in enumerate(self.model.prompt_category.tolist()):
            first_of.setdefault(category, position)
        pool_index = [first_of[self.model.category_names.index(name)] for name in batch["category"]]
        return self.model.prompt_features[torch.tensor(pool_index, device=self.model.prompt_features.device)]

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Reconstruction + restoration MSE and the refiner's Dice loss (spec §6–7)."""
        hp, model = self.hparams, self.model
        clean = self._features(batch["index"], batch["image"])
        inputs, targets = clean, clean
        if self.needs_synthetic:
            if "synthetic_image" not in batch:
                raise RuntimeError("OneNIP's restoration stream and refiner need synthetic anomalies: set "
                                   "data.synthesis (the paper's is cutpaste_or_perlin).")
            with torch.no_grad():
                synthetic = model.extract_features(batch["synthetic_image"])  # augmented: never cached
            inputs, targets = torch.cat([clean, synthetic]), torch.cat([clean, clean])
        reconstruction = model.reconstruct(inputs, self.training_prompts(batch), jitter=True)
        squared = (reconstruction - targets).pow(2)
        restored = squared if hp.restoration else squared[: clean.shape[0]]
        terms = {"loss_mse": restored.mean()}
        if hp.use_refiner:
            masks = torch.cat([torch.zeros_like(batch["synthetic_mask"]), batch["synthetic_mask"]])
            # Not detached (spec surprise 10): the Dice loss trains the transformer too.
            logits = model.refiner_logits((reconstruction - inputs).abs())
            terms["loss_dice"] = hp.refiner_loss_weight * dice_loss(logits, masks)
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if not self.model.prompt_pool_fitted():
            raise RuntimeError("OneNIP's prompt pool is not built; fit_training_statistics runs before training.")
        return self.log_losses(self.loss_terms(batch), batch_size=batch["image"].shape[0])

    def build_optimizers(self, total_steps: int) -> dict[str, Any]:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.hparams.lr, betas=(0.9, 0.999),
                                      weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.hparams.lr_step_epochs, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ inputs and calibration
    def calibration_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        normal = batch["label"] == 0
        fields = {name: value[normal] for name, value in self.model_inputs(batch).items()}
        features, reconstruction, _ = self.model.run(batch["image"][normal], **fields)
        high, low = self.model.reconstruction_map_range(features, reconstruction)
        return {"rec_max": high, "rec_min": low}

    def fit_calibration(self, collected: dict[str, Tensor], training_batches: Iterable[dict[str, Any]]) -> None:
        """The fusion scale (max + min)/2 of the reconstruction maps of held-out normal images (spec §8)."""
        scale = (collected["rec_max"].max() + collected["rec_min"].min()) / 2
        self.model.fusion_scale.fill_(float(scale))

    # ------------------------------------------------------------------ testing: also how often the prompt's category is right
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._prompt_hits = []

    def evaluation_map(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        features, reconstruction, chosen = self.model.run(batch["image"], **self.model_inputs(batch))
        output = self.model.maps_and_score(features, reconstruction)
        if chosen is not None:
            truth = self.category_indices(batch["category"])
            self._prompt_hits.append((self.model.prompt_category[chosen] == truth).float())
        return output.anomaly_map.float()[:, 0], output.image_score.float()

    def run_info(self) -> dict[str, Any]:
        info = {**super().run_info(), "prompt": self.model.prompt, "prompt_selection": self.model.prompt_selection,
                "prompt_pool": {"categories": self.model.category_names,
                                "size": int(self.model.prompt_features.shape[0])},
                "fusion_scale": float(self.model.fusion_scale)}
        if self._prompt_hits or self.model.prompt != "none":
            local = torch.cat(self._prompt_hits) if self._prompt_hits else torch.zeros(0, device=self.device)
            hits = gather_samples(local)
            if hits.numel():
                info["prompt_category_accuracy"] = float(hits.mean())
        return info
