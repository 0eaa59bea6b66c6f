"""Distil an EfficientAD teacher (a padded PDN) from a frozen Wide-ResNet-101-2 (spec §2.1, PUAD variant).

    python distill.py --images /data/imagenet/train --size small --out weights/teacher_small.pth \\
        [--steps 60000 --batch_size 16 --lr 1e-4 --weight_decay 1e-5 --image_size 256 \\
         --wrn_weights wide_resnet101_2.pth --pretrained true --normalization_images 10000 --seed 42]

The target is PUAD's: WRN layer2 + bilinearly upsampled layer3 at 2× the image size, channel-
averaged to 384 (no 3×3 patch aggregation), normalised per channel with mean/std over
``--normalization_images`` images. The PDN is built with padding so its 64×64 output (at 256 px)
matches the target; plain MSE, Adam, no schedule. Any folder of images works (searched
recursively): ImageNet train for the paper's teacher, anything smaller for a quick one. The file
written loads with ``networks.efficientad.load_teacher_state_dict`` (and so as
``teacher_weights`` of the EfficientAD/PUAD configs).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datamodules.dataset import read_image
from datamodules.layouts import IMAGE_EXTENSIONS, list_images
from networks.efficientad import PatchDescriptionNetwork, WideResNetDistillationTarget

TEACHER_CHANNELS = 384
GRAYSCALE_PROBABILITY = 0.1


class DistillationImages(Dataset):
    """(WRN view at 2S, PDN view at S) of one image; grayscale with p 0.1, the same for both views."""

    def __init__(self, paths: list[Path], image_size: int) -> None:
        self.paths = paths
        self.target_resize = v2.Resize((2 * image_size, 2 * image_size), antialias=True)
        self.student_resize = v2.Resize((image_size, image_size), antialias=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(read_image(self.paths[index]).transpose(2, 0, 1).copy())
        if torch.rand(()) < GRAYSCALE_PROBABILITY:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        return self.target_resize(image), self.student_resize(image)


def _parse_pretrained(value: str) -> bool | str:
    lowered = value.strip().lower()
    choices = {"true": True, "false": False, "auto": "auto"}
    if lowered not in choices:
        raise argparse.ArgumentTypeError(f"--pretrained must be true, auto or false, got {value!r}")
    return choices[lowered]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path, help="folder of training images (recursive)")
    parser.add_argument("--size", default="small", choices=("small", "medium"), help="PDN size")
    parser.add_argument("--out", required=True, type=Path, help="teacher weight file to write (.pth)")
    parser.add_argument("--steps", type=int, default=60_000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight_decay", type=float, default=1e-5)
    parser.add_argument("--image_size", type=int, default=256, help="PDN input size; the WRN sees twice this")
    parser.add_argument("--wrn_weights", type=str, default=None, help="local Wide-ResNet-101-2 weight file")
    parser.add_argument("--pretrained", type=_parse_pretrained, default=True,
                        help="WRN weights: true (fail if none found), auto (random with a warning), false (random)")
    parser.add_argument("--normalization_images", type=int, default=10_000,
                        help="images for the target's channel mean/std")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="32-true", choices=("bf16-mixed", "32-true"),
                        help="32-true as the reference code; bf16-mixed autocasts both networks (3-4x faster; "
                             "loss and statistics stay float32)")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--save_every", type=int, default=5_000, help="also write --out every N steps")
    return parser


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


@torch.no_grad()
def target_statistics(target: WideResNetDistillationTarget, loader: DataLoader, device: torch.device,
                      precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std of the target over the loader's images (float64 sums)."""
    total = total_sq = None
    count = 0
    for target_view, _ in loader:
        with _autocast(device, precision):
            features = target(target_view.to(device, non_blocking=True))
        features = features.double()
        batch_sum, batch_sq = features.sum(dim=(0, 2, 3)), (features**2).sum(dim=(0, 2, 3))
        total = batch_sum if total is None else total + batch_sum
        total_sq = batch_sq if total_sq is None else total_sq + batch_sq
        count += features.shape[0] * features.shape[2] * features.shape[3]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    return mean.float().view(1, -1, 1, 1), std.float().clamp_min(1e-12).view(1, -1, 1, 1)


def _infinite(loader: DataLoader):
    while True:
        yield from loader


def _save(path: Path, teacher: PatchDescriptionNetwork, metadata: dict) -> None:
    """Atomic write: a crash mid-save never leaves a truncated teacher file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    state_dict = {key: value.detach().cpu().contiguous() for key, value in teacher.state_dict().items()}
    torch.save({"state_dict": state_dict, "metadata": metadata}, partial)
    os.replace(partial, path)


def distill(args: list[str] | None = None) -> Path:
    """Run the distillation; returns the written teacher file."""
    options = build_parser().parse_args(args)
    folder = options.images.expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder")
    paths = list_images(folder, recursive=True)
    if not paths:
        raise FileNotFoundError(f"--images {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
    L.seed_everything(options.seed, workers=True, verbose=False)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto"
                          else options.device)

    target = WideResNetDistillationTarget(pretrained=options.pretrained, weights_file=options.wrn_weights).to(device)
    teacher = PatchDescriptionNetwork(options.size, TEACHER_CHANNELS, padding=True).to(device)
    dataset = DistillationImages(paths, options.image_size)
    loader_options = {"batch_size": options.batch_size, "num_workers": options.num_workers,
                      "pin_memory": device.type == "cuda", "persistent_workers": options.num_workers > 0}

    generator = torch.Generator().manual_seed(options.seed)
    chosen = torch.randperm(len(dataset), generator=generator)[: options.normalization_images].tolist()
    statistics_loader = DataLoader(Subset(dataset, chosen), shuffle=False,
                                   **{**loader_options, "persistent_workers": False})
    print(f"distill: {len(paths)} images in {folder}; WRN weights: {target.weights_source}; device {device}")
    mean, std = target_statistics(target, statistics_loader, device, options.precision)
    print(f"distill: target channel statistics from {len(chosen)} images")

    optimizer = torch.optim.Adam(teacher.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    train_loader = DataLoader(dataset, sampler=RandomSampler(dataset, generator=generator), drop_last=False,
                              **loader_options)
    metadata = {"format": "efficientad-teacher", "size": options.size, "image_size": options.image_size,
                "target": "wide_resnet101_2 layer2+layer3 fused to 384 channels (PUAD)",
                "target_weights": target.weights_source, "images": str(folder.resolve()), "image_count": len(paths),
                "steps": 0, "seed": options.seed, "precision": options.precision}
    teacher.train()
    start = time.perf_counter()
    batches = _infinite(train_loader)
    for step in range(1, options.steps + 1):
        target_view, student_view = next(batches)
        target_view = target_view.to(device, non_blocking=True)
        student_view = student_view.to(device, non_blocking=True)
        with _autocast(device, options.precision):
            with torch.no_grad():
                goal = (target(target_view).float() - mean) / std
            prediction = teacher(student_view).float()
        if prediction.shape != goal.shape:
            raise ValueError(f"PDN output {tuple(prediction.shape)} does not match the target {tuple(goal.shape)}; "
                             "--image_size must be a multiple of 32")
        loss = F.mse_loss(prediction, goal)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % options.log_every == 0 or step == options.steps:
            rate = step * options.batch_size / (time.perf_counter() - start)
            print(f"distill: step {step}/{options.steps} loss {loss.item():.4f} ({rate:.1f} img/s)")
        if step % options.save_every == 0 or step == options.steps:
            _save(options.out, teacher, {**metadata, "steps": step, "final_loss": float(loss.item())})
    if options.steps <= 0:
        _save(options.out, teacher, metadata)
    print(f"distill: wrote {options.out}")
    return options.out


if __name__ == "__main__":
    distill()
