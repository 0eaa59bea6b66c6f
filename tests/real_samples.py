"""The real MVTec samples in ../shared/data, arranged for experiments with real features.

Used by the opt-in tests (`tests/test_real_features.py`) and `bench/real_features.py`. The files
are never copied: the experiment trees hold symbolic links to them, in a temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.dataset import read_image, resize_image
from datamodules.layouts import list_images

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"
# ImageNet classes of bottles: beer bottle, pill bottle, pop bottle, water bottle, wine bottle.
IMAGENET_BOTTLE_CLASSES = (440, 720, 737, 898, 907)
BOTTLE_TRAIN_IMAGES = 60  # of train/good 020-099; the other 20 are the normal test images


def bottle_images(root: Path = BOTTLE) -> list[Path]:
    """Every image of the bottle sample: train/good and the three defect folders."""
    return list_images(root / "train" / "good") + [
        path for folder in sorted((root / "test").iterdir()) for path in list_images(folder)
    ]


def bottle_holdout_tree(out_dir: Path, root: Path = BOTTLE, train_images: int = BOTTLE_TRAIN_IMAGES) -> Path:
    """A `folder`-layout tree of links: the first `train_images` of train/good to train on, the rest as
    test/good, and every defect image under test/<defect> (the sample has no masks: image metrics only).

    Returns the dataset root (`<out_dir>`, category `bottle`).
    """
    normal = list_images(root / "train" / "good")
    if len(normal) <= train_images:
        raise ValueError(f"{root / 'train' / 'good'} holds {len(normal)} images; need more than {train_images}")
    category = out_dir / "bottle"
    groups = {"train/good": normal[:train_images], "test/good": normal[train_images:]}
    groups |= {f"test/{folder.name}": list_images(folder) for folder in sorted((root / "test").iterdir())}
    for group, paths in groups.items():
        (category / group).mkdir(parents=True, exist_ok=True)
        for path in paths:
            (category / group / path.name).symlink_to(path.resolve())
    return out_dir


def load_lite0_classifier() -> tuple[torch.nn.Module, str]:
    """timm's tf_efficientnet_lite0 with the packaged ImageNet weights (found offline), and their source."""
    import timm

    from networks.backbones import resolve_pretrained_weights

    state_dict, source = resolve_pretrained_weights("tf_efficientnet_lite0", True)
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(state_dict)
    return model.eval(), source


@torch.no_grad()
def imagenet_top5(model: torch.nn.Module, paths: list[Path], size: int = 224, batch_size: int = 16) -> torch.Tensor:
    """N×5 ImageNet class indices: each whole image resized to `size`, normalised as the weights expect (0.5/0.5)."""
    from networks.backbones import ChannelNormalize, backbone_normalization

    normalize = ChannelNormalize(*backbone_normalization("tf_efficientnet_lite0"))
    top5 = []
    for start in range(0, len(paths), batch_size):
        images = [torch.from_numpy(resize_image(read_image(p), size, size).transpose(2, 0, 1).copy())
                  for p in paths[start : start + batch_size]]
        logits = model(normalize(torch.stack(images)))
        top5.append(logits.topk(5, dim=1).indices)
    return torch.cat(top5)
