"""PatchCore against anomalib 2.7's ``PatchcoreModel`` and ``KCenterGreedy`` on the same weights and images.

The recording (``tests/official/record_patchcore_anomalib.py``, anomalib 2.7.0) holds anomalib's bank, maps and
scores and its coreset choice; the weights and images are regenerated here from seeds (``official_weights``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from networks.patchcore import PatchCoreModel, k_center_greedy, nearest_neighbours
from tests.official.official_weights import fingerprint, patchcore_images, seeded_weights

RECORDING = Path(__file__).parent / "official" / "patchcore_anomalib_2_7.pt"


@pytest.fixture(scope="module")
def recording():
    return torch.load(RECORDING, weights_only=False)


@pytest.fixture(scope="module")
def fitted(recording):
    """Our PatchCore on anomalib's weights, its bank the whole set of training patches (coreset ratio 1.0)."""
    model = PatchCoreModel(backbone="resnet18", pretrained=False, image_size=64, bank="unified", num_neighbors=9)
    backbone = model.feature_extractor.model
    assert sorted(backbone.state_dict()) == recording["weight_names"]
    backbone.load_state_dict({k: v.float() for k, v in seeded_weights(backbone.state_dict()).items()})
    model.eval()
    train, test = patchcore_images()
    with torch.no_grad():
        bank = model.patch_features(train).flatten(0, 1)
        model.set_memory_bank(bank, torch.zeros(bank.shape[0]), ["all"])
        output = model(test)
    return model, bank, output


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


def test_bank_maps_and_scores_equal_anomalib(recording, fitted):
    _, bank, output = fitted
    assert tuple(bank.shape) == recording["bank_shape"] == (3 * 8 * 8, 128 + 256)
    assert relative(fingerprint(bank, picks=4096), recording["memory_bank"]) < 1e-5
    assert output.anomaly_map.shape == recording["anomaly_map"].shape == (3, 1, 64, 64)
    assert relative(output.anomaly_map, recording["anomaly_map"]) < 1e-4
    assert relative(output.image_score, recording["image_score"]) < 1e-4
    # the two test images with a pasted square score above the plain one, in both implementations
    assert output.image_score[1:].min() > output.image_score[0]


def test_coreset_indices_equal_anomalib_k_center_greedy(recording, fitted):
    _, bank, _ = fitted
    coreset = recording["coreset"]
    size = int(bank.shape[0] * coreset["ratio"])
    for chunk_rows in (7, 65536):  # chunked or not, the same choice
        chosen = k_center_greedy(bank, size, coreset["projection"], coreset["start"], chunk_rows=chunk_rows)
        assert chosen.tolist() == coreset["indices"].tolist()


def test_search_and_bank_dtype_chunking(fitted):
    """Searching the bank in chunks of 5 rows gives the one-chunk result to float32 rounding (‖q‖² + ‖k‖² − 2q·k
    cancels digits, and the product's rounding depends on the matrix sizes: measured 4e-6); a float16 bank scores
    within its rounding."""
    model, bank, output = fitted
    _, test = patchcore_images()
    model.search_chunk = 5
    try:
        with torch.no_grad():
            chunked = model(test)
    finally:
        model.search_chunk = 2048
    assert relative(chunked.anomaly_map, output.anomaly_map) < 2e-5
    assert relative(chunked.image_score, output.image_score) < 2e-5
    half = PatchCoreModel(backbone="resnet18", pretrained=False, image_size=64, bank="unified", bank_dtype="float16")
    half.feature_extractor.load_state_dict(model.feature_extractor.state_dict())
    half.set_memory_bank(bank, torch.zeros(bank.shape[0]), ["all"])
    assert half.memory_bank.dtype == torch.float16
    with torch.no_grad():
        assert relative(half.eval()(test).image_score, output.image_score) < 1e-2


def test_distances_stay_float32_under_bf16_autocast():
    """The nearest-neighbour distances decide every score: under bf16 autocast the matmul would keep 3 digits and
    ‖q‖² + ‖k‖² − 2q·k cancel them (measured: errors of 400 % of a near neighbour's distance here). float32, as
    anomalib computes them, loses 1.2e-3 of it on these vectors (‖q‖² ≈ 3,800 against a distance² ≈ 1)."""
    generator = torch.Generator().manual_seed(0)
    bank = 3 + torch.randn(500, 384, generator=generator)
    queries = bank[:50] + 0.05 * torch.randn(50, 384, generator=generator)  # each a near neighbour of a bank row
    exact, where = nearest_neighbours(queries.double(), bank.double(), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distances, found = nearest_neighbours(queries, bank, 1)
    assert distances.dtype == torch.float32 and torch.equal(found, where)
    assert relative(distances, exact) < 1e-2
