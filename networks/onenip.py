"""OneNIP networks (Gao, ECCV 2024): UniAD-style feature reconstruction guided by one normal image prompt.

Follows the official code as ``../shared/specs/onenip.md`` records it (the post-fix decoder of
Nov 2024). Shapes at 224 px with EfficientNet-b4 blocks of strides 2/4/8/16: frozen features F
272×14×14 → tokens 196×256 → encoder (4 layers, neighbour-masked) → two-way decoder whose query
stream is the encoded PROMPT and whose key stream is the encoded image → reconstruction read off
the prompt stream, 272×14×14. A refiner turns |r − F| into a 224×224 logit map.

``OneNIPModel`` holds the networks, the prompt pool (cached backbone features of a few normal
training images per category, chosen once) and the map post-processing; its ``forward`` picks each
image's prompt itself (cosine similarity of pooled projected tokens, or the category label), so in
the default mode it scores images alone. The losses live in the Lightning module. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.anomaly_model import AnomalyModel, AnomalyOutput
from networks.backbones import FeatureExtractor, Pretrained
from networks.feature_maps import at_least_float32, fuse_to_stride, window_mean

PROMPT_MODES = ("none", "static", "dynamic")
PROMPT_SELECTIONS = ("similarity", "label")
FEATURE_STRIDE = 16


# ---------------------------------------------------------------------------------------------- pieces
def neighbour_mask(height: int, width: int, window: int) -> Tensor:
    """N×N boolean, True where token i MAY attend to token j (N = height·width, row-major tokens).

    UniAD's mask (spec §3): token i cannot see any token within its own window×window neighbourhood,
    itself included: hidden where |h_i − h_j| ≤ r and |w_i − w_j| ≤ r with r = window // 2.
    """
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    radius = window // 2
    hidden = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    return ~hidden


def jitter_features(tokens: Tensor, scale: float) -> Tensor:
    """UniAD's feature jitter (spec §3): f + ε·scale·‖f‖₂/C per token, ε ~ N(0, I); tokens B×N×C."""
    norms = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + torch.randn_like(tokens) * norms * scale


def dice_loss(logits: Tensor, masks: Tensor, smooth: float = 1.0) -> Tensor:
    """OneNIP's Dice loss exactly as its code has it (spec §7, surprise 4): per sample,
    1 − (Σ p·g + s) / (Σ p² + Σ g² + s) with p = sigmoid(logits), no factor 2, averaged over samples."""
    p = torch.sigmoid(at_least_float32(logits)).flatten(1)
    g = masks.to(p.dtype).flatten(1)
    return (1 - ((p * g).sum(1) + smooth) / (p.pow(2).sum(1) + g.pow(2).sum(1) + smooth)).mean()


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (packed ``in_proj_weight``, ``out_proj``),
    batch-first, over ``scaled_dot_product_attention`` with an explicit head axis (B×heads×N×d: the ONNX
    exporter takes 4-D attention only). ``allowed``: N_q×N_k boolean, True = may attend. Dropout on the
    attention weights in training, as in the MHA the official code uses."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None = None) -> Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (einops.rearrange(F.linear(x, w, b), "b n (h d) -> b h n d", h=self.heads)
                   for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                  dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(einops.rearrange(attended, "b h n d -> b n (h d)"))


class EncoderLayer(nn.Module):
    """DETR post-norm encoder layer (spec §3): positional embedding on Q and K only, masked self-attention."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention = Attention(dim, heads, dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, allowed: Tensor | None) -> Tensor:
        x = self.norm1(x + self.dropout1(self.attention(x + pos, x + pos, x, allowed)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class TwoWayDecoderLayer(nn.Module):
    """OneNIP's decoder layer after the Nov 2024 fix (spec §4), post-norm, no self-attention:
    (a) prompt→image cross-attention, (b) an MLP on the prompt stream (no dropout inside it),
    (c) image→prompt cross-attention; the image stream has no MLP. Both cross-attentions are masked."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.prompt_to_image = Attention(dim, heads, dropout)
        self.image_to_prompt = Attention(dim, heads, dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, prompt: Tensor, image: Tensor, pos: Tensor, allowed: Tensor | None) -> tuple[Tensor, Tensor]:
        prompt = self.norm1(prompt + self.dropout1(self.prompt_to_image(prompt + pos, image + pos, image, allowed)))
        prompt = self.norm2(prompt + self.dropout2(self.linear2(F.relu(self.linear1(prompt)))))
        image = self.norm3(image + self.dropout3(self.image_to_prompt(image + pos, prompt + pos, prompt, allowed)))
        return prompt, image


class Refiner(nn.Module):
    """OneNIP's ``MaskHead`` (spec §7): two blocks of Conv3×3 (no bias) → BN → ReLU → ConvTranspose 2×2 s2,
    a 1×1 predictor, then bilinear (align_corners=True) up to the image size: logits B×1×S×S."""

    def __init__(self, in_channels: int, width: int = 128, blocks: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(blocks):
            layers += [nn.Conv2d(in_channels if index == 0 else width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.ConvTranspose2d(width, width, 2, stride=2)]
        self.blocks = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(width, 1, 1)

    def forward(self, difference: Tensor, size: tuple[int, int]) -> Tensor:
        logits = self.predictor(self.blocks(difference))
        return F.interpolate(at_least_float32(logits), size=size, mode="bilinear", align_corners=True)


def _xavier_init(module: nn.Module) -> None:
    """The official initializer: xavier_uniform weights and zero biases for Linear/Conv/ConvT, BN γ=1 β=0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------------------------- the model
class OneNIPModel(AnomalyModel):
    """OneNIP: backbone, transformer, refiner, prompt pool and post-processing (see module docstring).

    prompt: "dynamic" (the paper: each training image is guided by a random normal image of its category),
        "static" (one fixed pool image per category, in training and test) or "none" (learned queries
        instead of a prompt: with restoration and refiner off, the UniAD-like baseline).
    prompt_selection: how a test image's prompt is picked from the pool: "similarity" (cosine similarity
        of mean-pooled projected tokens, the paper's method, needs nothing but the image) or "label"
        (the pool prompts of the image's own category, as the released code does; needs ``category_index``).
    """

    FITTED_SETTINGS = ("prompt_selection", "use_refiner", "fusion_weights", "score_pool_size")
    DATA_SIZED_BUFFERS = ("prompt_features", "prompt_category")

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b4",
        layers: Sequence[str] = ("blocks.0", "blocks.1", "blocks.2", "blocks.4"),
        pretrained: Pretrained = True,
        weights_file: str | None = None,
        backbone_padding: str = "dynamic",
        image_size: int = 224,
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
        use_refiner: bool = True,
        refiner_width: int = 128,
        fusion_weights: Sequence[float] = (0.5, 0.5),
        score_pool_size: int = 16,
    ) -> None:
        super().__init__(image_size)
        if prompt not in PROMPT_MODES:
            raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {prompt!r}")
        if prompt_selection not in PROMPT_SELECTIONS:
            raise ValueError(f"prompt_selection must be one of {PROMPT_SELECTIONS}, got {prompt_selection!r}")
        if image_size % FEATURE_STRIDE:
            raise ValueError(f"image_size must be a multiple of {FEATURE_STRIDE} (the token stride), got {image_size}")
        if score_pool_size > image_size:
            raise ValueError(f"score_pool_size {score_pool_size} is larger than the image ({image_size} px)")
        self.prompt, self.prompt_selection, self.use_refiner = prompt, prompt_selection, use_refiner
        self.fusion_weights = tuple(float(w) for w in fusion_weights)
        self.score_pool_size = int(score_pool_size)
        self.jitter_scale, self.jitter_probability = jitter_scale, jitter_probability
        self.input_fields = ("category_index",) if prompt != "none" and prompt_selection == "label" else ()

        self.feature_extractor = FeatureExtractor(backbone, layers, pretrained, weights_file, backbone_padding)
        self.channels = sum(self.feature_extractor.channels)
        self.grid = image_size // FEATURE_STRIDE
        # k = feature_size // 2, so the effective window is 2·(k // 2) + 1 (spec §3, surprise 9).
        self.neighbour_window = self.grid // 2 if neighbour_window is None else int(neighbour_window)
        self.register_buffer("allowed", neighbour_mask(self.grid, self.grid, self.neighbour_window), persistent=False)
        if not bool(self.allowed.any(dim=1).all()):
            raise ValueError(f"neighbour_window {self.neighbour_window} hides every token of the {self.grid}×{self.grid} grid")

        self.input_proj = nn.Linear(self.channels, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, self.channels)
        self.encoder = nn.ModuleList(EncoderLayer(hidden_dim, heads, ffn_dim, dropout) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(TwoWayDecoderLayer(hidden_dim, heads, ffn_dim, dropout)
                                     for _ in range(decoder_layers))
        self.final_attention = Attention(hidden_dim, heads, dropout)
        self.final_dropout = nn.Dropout(dropout)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.refiner = Refiner(self.channels, refiner_width) if use_refiner else None
        for trained in (self.input_proj, self.output_proj, self.encoder, self.decoder, self.final_attention,
                        self.refiner):
            if trained is not None:
                _xavier_init(trained)  # never the frozen backbone
        # Learned positional embedding (DETR's PositionEmbeddingLearned): [col(w); row(h)], U[0, 1).
        self.row_embed = nn.Parameter(torch.rand(self.grid, hidden_dim // 2))
        self.col_embed = nn.Parameter(torch.rand(self.grid, hidden_dim - hidden_dim // 2))
        # Prompt "none": UniAD's learned queries start the decoder's query stream.
        self.query_embed = nn.Parameter(torch.randn(self.grid * self.grid, hidden_dim)) if prompt == "none" else None

        # The prompt pool: backbone features of normal training images, P×C×g×g, and their category ids.
        self.register_buffer("prompt_features", torch.zeros(0, self.channels, self.grid, self.grid))
        self.register_buffer("prompt_category", torch.zeros(0, dtype=torch.long))
        # Fusion (spec §8): A = w_rec·A_rec + w_ref·fusion_scale·A_ref, fusion_scale = (max + min)/2 of A_rec,
        # fitted on held-out normal images (the official code takes it over the test set).
        self.register_buffer("fusion_scale", torch.tensor(float("nan")))

    # ------------------------------------------------------------------ state
    @property
    def weights_source(self) -> str:
        return self.feature_extractor.weights_source

    def prompt_pool_fitted(self) -> bool:
        return self.prompt == "none" or self.prompt_features.shape[0] > 0

    def statistics_fitted(self) -> bool:
        fusion_ok = not self.use_refiner or bool(torch.isfinite(self.fusion_scale))
        return self.prompt_pool_fitted() and fusion_ok

    def describe_input(self) -> dict[str, Any]:
        description = super().describe_input()
        if self.input_fields:
            description["category_index"] = {"dtype": "int64", "shape": ["batch"], "categories": self.category_names}
        return description

    def example_fields(self, batch_size: int) -> dict[str, Tensor]:
        if not self.input_fields:
            return {}
        categories = max(len(self.category_names), 1)
        return {"category_index": torch.arange(batch_size, device=self.fusion_scale.device) % categories}

    def set_prompt_pool(self, features: Tensor, categories: Tensor, names: Sequence[str]) -> None:
        """Store the pool: ``features`` P×C×g×g backbone features, ``categories`` P ids into ``names``."""
        self.prompt_features = features.detach().float().to(self.fusion_scale.device)
        self.prompt_category = categories.detach().long().to(self.fusion_scale.device)
        self.category_names = list(names)

    # ------------------------------------------------------------------ features and prompts
    def extract_features(self, images: Tensor) -> Tensor:
        """Frozen backbone maps fused at stride 16: B×C×g×g float32 (spec §1)."""
        return fuse_to_stride(self.feature_extractor(images), (self.grid, self.grid))

    def positional_embedding(self) -> Tensor:
        """N×D, token (h, w) = [col_embed[w]; row_embed[h]], row-major."""
        cols = self.col_embed[None].expand(self.grid, -1, -1)
        rows = self.row_embed[:, None].expand(-1, self.grid, -1)
        return torch.cat([cols, rows], dim=-1).flatten(0, 1)

    def _project_pooled(self, features: Tensor) -> Tensor:
        """input_proj of the mean token (= mean of the projected tokens, input_proj being affine), in float32:
        written as a product and a sum, which autocast leaves in float32, so the argmax is the same in bf16 runs."""
        pooled = features.float().mean(dim=(2, 3))
        return (pooled[:, None, :] * self.input_proj.weight.float()[None]).sum(-1) + self.input_proj.bias.float()

    def select_prompts(self, features: Tensor, category_index: Tensor | None = None) -> Tensor:
        """Pool index of each image's prompt: the pool image with the most similar pooled projected tokens
        (cosine), among all pool images ("similarity") or those of the image's category ("label")."""
        query = F.normalize(self._project_pooled(features), dim=1)
        pool = F.normalize(self._project_pooled(self.prompt_features), dim=1)
        similarity = query @ pool.T
        if self.prompt_selection == "label":
            if category_index is None:
                raise ValueError("prompt_selection='label' needs each image's category_index")
            other = self.prompt_category[None, :] != category_index[:, None]
            similarity = similarity.masked_fill(other, float("-inf"))
        return similarity.argmax(dim=1)

    # ------------------------------------------------------------------ the transformer
    def reconstruct(self, features: Tensor, prompts: Tensor | None, jitter: bool = False) -> Tensor:
        """Reconstruction r (Q×C×g×g) of Q feature maps guided by P prompt maps, Q = k·P: the P encoded prompts
        are repeated k times (training: [normal | synthetic] share a prompt). ``jitter`` adds feature jitter to
        queries and prompts before the input projection (training only, spec §3)."""
        queries = einops.rearrange(features, "b c h w -> b (h w) c")
        stacked = queries if prompts is None else torch.cat([queries, einops.rearrange(prompts, "b c h w -> b (h w) c")])
        if jitter and self.jitter_scale > 0 and float(torch.rand(())) < self.jitter_probability:
            stacked = jitter_features(stacked, self.jitter_scale)
        pos, allowed = self.positional_embedding()[None], self.allowed
        tokens = self.input_proj(stacked)
        for layer in self.encoder:  # self-attention within each image; query, synthetic and prompt alike
            tokens = layer(tokens, pos, allowed)
        image = tokens[: queries.shape[0]]
        if prompts is None:
            prompt = self.query_embed[None].expand(image.shape[0], -1, -1).to(image.dtype)
        else:
            prompt = tokens[queries.shape[0]:]
            prompt = prompt.repeat(image.shape[0] // prompt.shape[0], 1, 1)
        for layer in self.decoder:
            prompt, image = layer(prompt, image, pos, allowed)
        prompt = prompt + self.final_dropout(self.final_attention(prompt + pos, image + pos, image))  # unmasked
        reconstruction = self.output_proj(self.decoder_norm(prompt))
        return einops.rearrange(at_least_float32(reconstruction), "b (h w) c -> b c h w", h=self.grid)

    def refiner_logits(self, difference: Tensor) -> Tensor:
        """Refiner logits B×1×S×S from |r − F(x_in)|."""
        return self.refiner(difference, (self.image_size, self.image_size))

    # ------------------------------------------------------------------ inference
    def maps_and_score(self, features: Tensor, reconstruction: Tensor) -> AnomalyOutput:
        """A_rec = ‖r − F‖₂ upsampled (align_corners=True); fused with the refiner's probability map; score =
        max of the map average-pooled over score_pool_size² windows with stride 1 (spec §8)."""
        size = (self.image_size, self.image_size)
        difference = at_least_float32(reconstruction) - at_least_float32(features)
        anomaly_map = F.interpolate(difference.norm(dim=1, keepdim=True), size=size, mode="bilinear",
                                    align_corners=True)
        if self.refiner is not None:
            refined = torch.sigmoid(self.refiner_logits(difference.abs()))
            anomaly_map = self.fusion_weights[0] * anomaly_map + self.fusion_weights[1] * self.fusion_scale * refined
        return AnomalyOutput(anomaly_map, window_mean(anomaly_map, self.score_pool_size).flatten(1).amax(dim=1))

    def reconstruction_map_range(self, features: Tensor, reconstruction: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image max and min of the upsampled reconstruction map A_rec (what the fusion scale is fitted on)."""
        difference = at_least_float32(reconstruction) - at_least_float32(features)
        a_rec = F.interpolate(difference.norm(dim=1, keepdim=True), size=(self.image_size, self.image_size),
                              mode="bilinear", align_corners=True).flatten(1)
        return a_rec.amax(dim=1), a_rec.amin(dim=1)

    def run(self, images: Tensor, category_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(features, reconstruction, chosen pool index or None) for a batch of test images."""
        features = self.extract_features(images)
        if self.prompt == "none":
            return features, self.reconstruct(features, None), None
        chosen = self.select_prompts(features, category_index)
        return features, self.reconstruct(features, self.prompt_features[chosen]), chosen

    def forward(self, images: Tensor, category_index: Tensor | None = None) -> AnomalyOutput:
        features, reconstruction, _ = self.run(images, category_index)
        return self.maps_and_score(features, reconstruction)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (the frozen backbone excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["OneNIPModel", "dice_loss", "fuse_to_stride", "jitter_features", "neighbour_mask", "parameter_count", "window_mean"]
