"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour distance to a memory bank of normal patch features.

The method as anomalib 2.7's ``PatchcoreModel`` implements it (``tests/test_patchcore_reference.py`` checks it
against anomalib on the same weights and images): layer-2 + layer-3 backbone maps, each averaged over its 3×3
neighbourhood, layer 3 resized to layer 2's grid and concatenated; the memory bank is a greedy k-center coreset
of the training patches, chosen on a sparse random projection; a patch's score is its distance to the nearest
bank entry; the image score is the paper's re-weighted maximum (eq. 7); the map is the patch scores resized to
the image (nearest) and Gaussian-blurred (σ = 4).

Beyond anomalib: one bank per category or one for all (``bank="per_category"`` takes a ``category_index`` input
and searches only that category's entries), the bank stored in float16 on request, and every search and the
coreset selection work in chunks, so their peak memory is a stated bound rather than the bank size times the
number of queries or candidates (``coreset_peak_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import einops
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from networks.anomaly_model import AnomalyModel, AnomalyOutput
from networks.backbones import FeatureExtractor, Pretrained
from networks.feature_maps import at_least_float32

BANK_MODES = ("per_category", "unified")
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ---------------------------------------------------------------------- distances and neighbours
def pairwise_distances(queries: Tensor, keys: Tensor) -> Tensor:
    """Euclidean distances Q×K as √(‖q‖² + ‖k‖² − 2 q·k), clamped at 0: one matrix product (anomalib's
    ``euclidean_dist``, which also avoids ``cdist`` so that the graph exports to ONNX)."""
    # Never under autocast: in bf16 the product keeps 3 digits, and ‖q‖² + ‖k‖² − 2 q·k cancels them all for the
    # near neighbours that decide every score.
    with torch.autocast(queries.device.type, enabled=False):
        queries, keys = at_least_float32(queries), at_least_float32(keys)
        products = queries @ keys.transpose(-2, -1)
        squared = queries.pow(2).sum(-1, keepdim=True) + keys.pow(2).sum(-1).unsqueeze(-2) - 2 * products
        return squared.clamp_min(0).sqrt()


def nearest_neighbours(queries: Tensor, bank: Tensor, k: int, chunk_rows: int = 2048,
                       query_groups: Tensor | None = None, bank_groups: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest distances (ascending) from each query to the bank rows, and their row indices.

    The bank is searched ``chunk_rows`` rows at a time (cast to the queries' dtype chunk by chunk, so a float16
    bank is never copied whole), keeping a running top-k: peak memory is queries × (chunk_rows + k) distances.
    The chunks are over the bank only, whose size is fixed once fitted, so the loop traces and exports with a
    dynamic batch. With ``query_groups`` / ``bank_groups`` (category ids), a query matches only its group's rows.
    """
    best_distances, best_indices = None, None
    for start in range(0, bank.shape[0], chunk_rows):
        distances = pairwise_distances(queries, bank[start:start + chunk_rows].to(queries.dtype))
        if query_groups is not None:
            other = bank_groups[None, start:start + chunk_rows] != query_groups[:, None]
            distances = distances.masked_fill(other, float("inf"))
        indices = torch.arange(start, start + distances.shape[1], device=queries.device).expand_as(distances)
        if best_distances is not None:
            distances = torch.cat([best_distances, distances], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
        best_distances, position = distances.topk(min(k, distances.shape[1]), dim=1, largest=False)
        best_indices = indices.gather(1, position)
    return best_distances, best_indices


# ---------------------------------------------------------------------- coreset
def projection_dimension(samples: int, eps: float = 0.9) -> int:
    """Johnson–Lindenstrauss dimension 4 ln n / (ε²/2 − ε³/3) that keeps pairwise distances within 1 ± ε
    (sklearn's ``johnson_lindenstrauss_min_dim``; anomalib's coreset uses ε = 0.9)."""
    return int(4 * math.log(samples) / (eps**2 / 2 - eps**3 / 3))


def sparse_random_projection(features: int, components: int, generator: torch.Generator | None = None) -> Tensor:
    """A components×features very sparse random projection (Li, Hastie & Church, KDD 2006), as anomalib draws
    it: each entry is nonzero with probability 1/√features, then ±√(√features / components) with equal odds.
    Written here (not sklearn's) because it must be a seeded torch tensor that can live on the GPU."""
    density = 1 / math.sqrt(features)
    nonzero = torch.rand(components, features, generator=generator) < density
    signs = torch.randint(0, 2, (components, features), generator=generator).float() * 2 - 1
    return nonzero * signs * math.sqrt(1 / density) / math.sqrt(components)


def coreset_peak_bytes(samples: int, components: int, chunk_rows: int, features: int) -> int:
    """Working memory of ``k_center_greedy`` on top of the bank: the projected features (float32), the running
    minimum distances, one chunk's differences and distances, the projection matrix, and one chunk of the bank
    in float32 (a float16 bank's cast) while projecting."""
    return 4 * (samples * components + samples + chunk_rows * (2 * components + 1) + components * features)


@torch.no_grad()
def k_center_greedy(features: Tensor, size: int, projection: Tensor | None, start: int,
                    chunk_rows: int = 4096, device: torch.device | str | None = None) -> Tensor:
    """Indices of ``size`` rows of ``features`` chosen greedily: each next row is the one farthest from all rows
    chosen so far (Sener & Savarese 2018; PatchCore §3.2), starting at row ``start``, in the projected space
    ``features @ projection.T`` (no projection: the features themselves).

    Equal to anomalib's ``KCenterGreedy`` given its projection matrix and first index. Unlike it, the features
    are projected and the distances updated ``chunk_rows`` rows at a time, on ``device`` (the features may stay
    in host memory, in float16): the peak is ``coreset_peak_bytes``, not a copy of the bank per step.
    """
    device = torch.device(device) if device is not None else features.device
    samples = features.shape[0]
    if not 0 < size <= samples:
        raise ValueError(f"a coreset of {size} rows cannot be chosen from {samples}")
    if projection is None:
        projected = features.to(device, torch.float32)
    else:
        weights = projection.to(device, torch.float32).T
        projected = torch.empty(samples, weights.shape[1], device=device)
        for i in range(0, samples, chunk_rows):
            torch.matmul(features[i:i + chunk_rows].to(device, torch.float32), weights, out=projected[i:i + chunk_rows])
    minimum = torch.full((samples,), float("inf"), device=device)
    chosen = torch.empty(size, dtype=torch.long, device=device)
    # Preallocated: one chunk's differences and distances, reused at every step (no allocation in the loop).
    differences = torch.empty(min(chunk_rows, samples), projected.shape[1], device=device)
    distances = torch.empty(min(chunk_rows, samples), device=device)
    index = torch.tensor(start, device=device)
    chosen[0] = index
    for step in range(1, size):
        center = projected[index]
        for i in range(0, samples, chunk_rows):
            rows = min(chunk_rows, samples - i)
            torch.sub(projected[i:i + rows], center, out=differences[:rows])
            torch.linalg.vector_norm(differences[:rows], dim=1, out=distances[:rows])
            part = minimum[i:i + rows]
            torch.minimum(part, distances[:rows], out=part)
        index = minimum.argmax()
        minimum[index] = 0.0
        chosen[step] = index
    return chosen.cpu()


# ---------------------------------------------------------------------- the model
class PatchCoreModel(AnomalyModel):
    """Backbone patch features, a memory bank (a fitted buffer of data-dependent size), nearest-neighbour scores.

    Args:
        backbone: timm name of the frozen feature extractor (anomalib's default: wide_resnet50_2).
        layers: two feature layers, the first the finer (layer2 + layer3: 512 + 1024 channels at strides 8, 16).
        pretrained / weights_file: the backbone's weights (see ``networks.backbones``).
        image_size: the square input size.
        num_neighbors: bank neighbours of the nearest entry that re-weight the image score (9; 1 = plain max).
        bank: per_category (a bank per product, chosen by the ``category_index`` input: the paper's protocol of
            one model per product) or unified (one bank for all categories).
        bank_dtype: float32 or float16 (half the memory; distances are still computed in float32).
        search_chunk: bank rows compared at a time (peak memory: queries × search_chunk distances).
    """

    FITTED_SETTINGS: ClassVar[tuple[str, ...]] = ("layers", "bank")
    DATA_SIZED_BUFFERS: ClassVar[tuple[str, ...]] = ("memory_bank", "bank_category")

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pretrained: Pretrained = True,
        weights_file: str | None = None,
        image_size: int = 224,
        num_neighbors: int = 9,
        bank: str = "per_category",
        bank_dtype: str = "float32",
        search_chunk: int = 2048,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__(image_size)
        if bank not in BANK_MODES:
            raise ValueError(f"bank must be one of {BANK_MODES}, got {bank!r}")
        if bank_dtype not in BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {tuple(BANK_DTYPES)}, got {bank_dtype!r}")
        if len(layers) != 2:
            raise ValueError(f"PatchCore concatenates two backbone layers (layer2 + layer3), got {list(layers)}")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be at least 1, got {num_neighbors}")
        self.layers, self.bank, self.bank_dtype = list(layers), bank, bank_dtype
        self.num_neighbors, self.search_chunk, self.blur_sigma = num_neighbors, search_chunk, blur_sigma
        self.feature_extractor = FeatureExtractor(backbone, layers, pretrained, weights_file)
        self.feature_channels = sum(self.feature_extractor.channels)
        self.input_fields = ("category_index",) if bank == "per_category" else ()
        self.register_buffer("memory_bank", torch.zeros(0, self.feature_channels, dtype=BANK_DTYPES[bank_dtype]))
        self.register_buffer("bank_category", torch.zeros(0, dtype=torch.long))

    @property
    def weights_source(self) -> str:
        return self.feature_extractor.weights_source

    def statistics_fitted(self) -> bool:
        return self.memory_bank.shape[0] > 0

    def example_fields(self, batch_size: int) -> dict[str, Tensor]:
        if "category_index" not in self.input_fields:
            return {}
        categories = max(len(self.category_names), 1)
        return {"category_index": torch.arange(batch_size, device=self.memory_bank.device) % categories}

    def describe_input(self) -> dict[str, Any]:
        description = super().describe_input()
        if "category_index" in self.input_fields:
            description["category_index"] = {"dtype": "int64", "shape": ["batch"], "categories": self.category_names}
        return description

    # ------------------------------------------------------------------ features
    def embed(self, images: Tensor) -> Tensor:
        """B×C×h×w patch features at the first layer's stride: each layer averaged over 3×3 neighbourhoods
        (zero padding counted, as anomalib's ``AvgPool2d(3, 1, 1)``), the second resized to the first's grid
        (bilinear), concatenated. Float32 under autocast: these are the bank's entries."""
        first, second = (F.avg_pool2d(at_least_float32(m), 3, stride=1, padding=1)
                         for m in self.feature_extractor(images))
        second = F.interpolate(second, size=first.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([first, second], dim=1)

    def patch_features(self, images: Tensor) -> Tensor:
        """B×(h·w)×C: the patches of each image, row-major (what the bank holds)."""
        return einops.rearrange(self.embed(images), "b c h w -> b (h w) c")

    def set_memory_bank(self, features: Tensor, categories: Tensor, names: Sequence[str]) -> None:
        """Store the bank: ``features`` N×C patch features, ``categories`` N ids into ``names``."""
        device = self.memory_bank.device
        self.memory_bank = features.detach().to(device, BANK_DTYPES[self.bank_dtype]).contiguous()
        self.bank_category = categories.detach().long().to(device)
        self.category_names = list(names)

    # ------------------------------------------------------------------ scoring
    def _search(self, queries: Tensor, k: int, category_index: Tensor | None) -> tuple[Tensor, Tensor]:
        """``nearest_neighbours`` in the bank; per category, each query (a whole number of them per image) only
        among its image's category's rows."""
        if self.bank != "per_category":
            return nearest_neighbours(queries, self.memory_bank, k, self.search_chunk)
        if category_index is None:
            raise ValueError("bank='per_category' needs each image's category_index")
        groups = category_index.repeat_interleave(queries.shape[0] // category_index.shape[0])
        return nearest_neighbours(queries, self.memory_bank, k, self.search_chunk, groups, self.bank_category)

    def forward(self, images: Tensor, category_index: Tensor | None = None) -> AnomalyOutput:
        patches = self.patch_features(images)
        batch, count, channels = patches.shape
        grid = math.isqrt(count)
        queries = patches.reshape(batch * count, channels)
        distances, locations = self._search(queries, 1, category_index)
        patch_scores = distances[:, 0].reshape(batch, count)
        locations = locations[:, 0].reshape(batch, count)
        score = self.image_score(patch_scores, locations, patches, category_index)
        maps = patch_scores.reshape(batch, 1, grid, count // grid)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest")
        kernel = 2 * int(4.0 * self.blur_sigma + 0.5) + 1
        maps = gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[self.blur_sigma, self.blur_sigma])
        return AnomalyOutput(maps.float(), score.float())

    def image_score(self, patch_scores: Tensor, locations: Tensor, patches: Tensor,
                    category_index: Tensor | None) -> Tensor:
        """The paper's eq. 7: the largest patch score s*, scaled by 1 − softmax weight of its nearest bank entry
        m* among m*'s ``num_neighbors`` nearest bank entries, measured from the test patch; a test patch whose
        nearest normal entry sits in a sparse region of the bank scores higher."""
        if self.num_neighbors == 1:
            return patch_scores.amax(dim=1)
        rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        worst = patch_scores.argmax(dim=1)
        score, test_patch = patch_scores[rows, worst], patches[rows, worst]
        nearest_entry = self.memory_bank[locations[rows, worst]].to(test_patch.dtype)
        reach, support = self._search(nearest_entry, self.num_neighbors, category_index)
        distances = pairwise_distances(test_patch[:, None], self.memory_bank[support].to(test_patch.dtype))[:, 0]
        # A category bank smaller than num_neighbors: its missing neighbours (infinitely far) take no weight.
        distances = distances.masked_fill(torch.isinf(reach), float("-inf"))
        weights = 1 - torch.softmax(distances, dim=1)[:, 0]
        return weights * score


__all__ = ["PatchCoreModel", "coreset_peak_bytes", "k_center_greedy", "nearest_neighbours", "pairwise_distances",
           "projection_dimension", "sparse_random_projection"]
