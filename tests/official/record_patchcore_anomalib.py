"""Record anomalib 2.7's PatchCore on fixed images, for ``tests/test_patchcore_reference.py``.

anomalib is not a dependency (it is the optional ``reference`` extra): install it where you record,

    pip install "anomalib==2.7.0"     # or: pip install --no-deps --target /tmp/anolib anomalib==2.7.0 kornia ...
    python tests/official/record_patchcore_anomalib.py

and this script writes ``patchcore_anomalib_2_7.pt`` beside itself. It builds anomalib's ``PatchcoreModel`` on a
timm ResNet-18 (layer2 + layer3, 128 + 256 channels) whose weights are ``official_weights.seeded_weights`` of
each parameter's name (float32; the test regenerates them), feeds it fixed training images in training mode (its
embedding store), takes the whole store as the bank (coreset ratio 1.0, no reordering) and records the anomaly
maps and image scores (9 neighbours, the paper's re-weighting) of fixed test images. Then it runs anomalib's
``KCenterGreedy`` on the bank at ratio 0.25 under a fixed seed and records the projection matrix it drew, the
first index and the indices it chose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from official_weights import fingerprint, patchcore_images, seeded_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CORESET_RATIO = 0.25


def main() -> None:
    import anomalib
    from anomalib.models.components.sampling import KCenterGreedy
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False, num_neighbors=9)
    backbone = model.feature_extractor.feature_extractor
    shapes = backbone.state_dict()
    backbone.load_state_dict({name: value.float() for name, value in seeded_weights(shapes).items()})
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    train, test = patchcore_images()
    model.train()
    model.feature_extractor.eval()
    with torch.no_grad():
        model((train - mean) / std)
        model.memory_bank = torch.vstack(model.embedding_store)
        model.eval()
        output = model((test - mean) / std)

    torch.manual_seed(0)
    sampler = KCenterGreedy(embedding=model.memory_bank, sampling_ratio=CORESET_RATIO)
    chosen = sampler.select_coreset_idxs()
    record = {
        "anomalib": anomalib.__version__,
        "weight_names": sorted(shapes),
        "memory_bank": fingerprint(model.memory_bank, picks=4096),
        "bank_shape": tuple(model.memory_bank.shape),
        "anomaly_map": output.anomaly_map.clone(),
        "image_score": output.pred_score.clone(),
        "coreset": {"ratio": CORESET_RATIO, "projection": sampler.model.sparse_random_matrix.clone(),
                    "start": int(chosen[0]), "indices": torch.tensor(chosen)},
    }
    path = HERE / "patchcore_anomalib_2_7.pt"
    torch.save(record, path)
    print(f"wrote {path}: bank {record['bank_shape']}, scores {record['image_score'].tolist()}")


if __name__ == "__main__":
    main()
