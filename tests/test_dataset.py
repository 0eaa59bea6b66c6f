"""AnomalyDataset items and AnomalyDataModule splits, loaders and sharding."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import cv2
import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.datamodule import AnomalyDataModule, ShardSampler, split_validation
from datamodules.dataset import AnomalyDataset, read_image, region_saturation
from datamodules.layouts import load_defects_config, scan
from datamodules.records import SampleRecord
from datamodules.synthesis import CutPaste
from datamodules.validate import DatasetError, validate_records
from tests import fake_trees


def record(image: Path, label: int = 0, masks=(), category: str = "c", split: str = "test") -> SampleRecord:
    return SampleRecord(
        image_path=image,
        label=label,
        category=category,
        split=split,
        defect_type="good" if label == 0 else "defect",
        anomaly_kind="good" if label == 0 else "anomaly",
        mask_paths=tuple(masks),
    )


# ---------------------------------------------------------------------------- reading images


def test_item_shapes_dtypes_and_strings(mvtec_ad_root):
    records = scan("mvtec_ad", mvtec_ad_root, "bottle")
    dataset = AnomalyDataset(records, image_size=16)
    anomaly_index = next(i for i, r in enumerate(records) if r.label == 1)
    item = dataset[anomaly_index]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 16, 16) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    # the 8..16 block of a 32 px mask is the 4..8 block at 16 px
    expected = torch.zeros(16, 16)
    expected[4:8, 4:8] = 1
    assert torch.equal(item["mask"][0], expected)
    assert item["label"].dtype == torch.long and item["label"].item() == 1
    assert item["has_mask"].dtype == torch.bool and item["has_mask"].item() is True
    assert item["index"].dtype == torch.long and item["index"].item() == anomaly_index
    assert item["path"] == str(records[anomaly_index].image_path)
    assert (item["category"], item["defect_type"], item["anomaly_kind"]) == ("bottle", "crack", "anomaly")
    normal = dataset[0]
    assert normal["label"].item() == 0 and normal["mask"].sum() == 0 and normal["has_mask"].item()


def test_image_values_equal_the_file_at_native_size(tmp_path):
    pixels = fake_trees.random_rgb(3)
    path = fake_trees.write_image(tmp_path / "x.png", pixels)
    item = AnomalyDataset([record(path)], image_size=32)[0]
    assert torch.allclose(item["image"], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".jpg", ".tif"])
def test_pure_red_is_channel_zero(tmp_path, suffix):
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    path = fake_trees.write_image(tmp_path / f"red{suffix}", red)
    image = AnomalyDataset([record(path)], image_size=8)[0]["image"]
    assert image[0].min() > 0.98 and image[1:].max() < 0.02


def test_sixteen_bit_grey_and_colour(tmp_path):
    grey = np.full((32, 32), 16384, np.uint16)  # 0.25 of full scale
    cv2.imwrite(str(tmp_path / "grey16.png"), grey)
    colour_bgr = np.zeros((32, 32, 3), np.uint16)
    colour_bgr[..., 2] = 65535  # OpenCV writes BGR: this is red
    colour_bgr[..., 0] = 13107  # blue at 0.2
    cv2.imwrite(str(tmp_path / "red16.png"), colour_bgr)
    grey_image = read_image(tmp_path / "grey16.png")
    assert grey_image.shape == (32, 32, 3) and np.allclose(grey_image, 16384 / 65535)
    red_image = read_image(tmp_path / "red16.png")
    assert np.allclose(red_image[..., 0], 1.0) and np.allclose(red_image[..., 1], 0.0)
    assert np.allclose(red_image[..., 2], 0.2)


def test_rgba_drops_alpha_and_grey_becomes_three_channels(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 1] = 255  # green
    rgba[..., 3] = 10  # nearly transparent: ignored
    fake_trees.write_image(tmp_path / "green.png", rgba)
    assert np.allclose(read_image(tmp_path / "green.png")[0, 0], [0.0, 1.0, 0.0])
    fake_trees.write_image(tmp_path / "grey.png", np.full((32, 32), 51, np.uint8))
    assert np.allclose(read_image(tmp_path / "grey.png"), 0.2)


def test_float_tiff_that_pillow_cannot_open_validates_and_reads(tmp_path):
    pixels = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    cv2.imwrite(str(tmp_path / "f.tif"), pixels)
    validate_records([record(tmp_path / "f.tif", split="train"), record(tmp_path / "f.tif")])
    assert np.allclose(read_image(tmp_path / "f.tif"), pixels[..., ::-1])  # written as BGR


def test_unreadable_file_raises_dataset_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="bad.png: cannot be read"):
        read_image(tmp_path / "bad.png")


def test_visa_instance_ids_are_binarised(tmp_path):
    root = fake_trees.make_visa(tmp_path / "visa", objects=("candle",))
    records = [r for r in scan("visa", root) if r.label == 1]
    mask = AnomalyDataset(records, image_size=32)[0]["mask"][0]
    expected = torch.zeros(32, 32)
    expected[0:6, 0:6] = 1
    expected[20:26, 20:26] = 1
    assert torch.equal(mask, expected)


def test_label_only_anomaly_has_no_mask(tmp_path):
    root = fake_trees.make_folder(tmp_path / "custom")
    records = [r for r in scan("folder", root) if r.defect_type == "stain"]
    item = AnomalyDataset(records, image_size=16)[0]
    assert item["label"].item() == 1 and item["has_mask"].item() is False and item["mask"].sum() == 0


# ---------------------------------------------------------------------------- LOCO regions


def test_loco_mask_is_the_union_of_its_files(loco_root):
    records = [
        r
        for r in scan("mvtec_loco", loco_root)
        if r.image_path.stem == "000" and r.defect_type == "logical_anomalies"
    ]
    mask = AnomalyDataset(records, image_size=32)[0]["mask"][0]
    expected = torch.zeros(32, 32)
    expected[0:8, 0:8] = 1
    expected[20:28, 20:30] = 1
    assert torch.equal(mask, expected)


def test_loco_regions_and_saturation_match_hand_computed_values(tmp_path):
    """Image 20 high x 40 wide, resized to 10x10: each output pixel is a 2x4 block."""
    write = fake_trees.write_image
    image = write(tmp_path / "test" / "000.png", fake_trees.random_rgb(0, height=20, width=40))
    region_a = write(
        tmp_path / "gt" / "000" / "000.png", fake_trees.block_mask(255, (2, 10), (8, 20), 20, 40)
    )
    region_b = write(
        tmp_path / "gt" / "000" / "001.png", fake_trees.block_mask(254, (12, 18), (0, 8), 20, 40)
    )
    region_c = write(
        tmp_path / "gt" / "000" / "002.png", fake_trees.block_mask(253, (0, 2), (36, 40), 20, 40)
    )
    other = write(tmp_path / "test" / "001.png", fake_trees.random_rgb(1, height=20, width=40))
    other_region = write(
        tmp_path / "gt" / "001" / "000.png", fake_trees.block_mask(254, (0, 4), (0, 8), 20, 40)
    )
    config = {255: (40.0, False), 254: (0.5, True), 253: (400.0, False)}
    dataset = AnomalyDataset(
        [record(image, 1, [region_a, region_b, region_c]), record(other, 1, [other_region])],
        image_size=10,
        defects_configs={"c": config},
    )
    item = dataset[0]
    regions, saturation = item["regions"], item["region_saturation"]
    assert regions.shape == (3, 10, 10) and regions.dtype == torch.uint8
    assert saturation.shape == (3,) and saturation.dtype == torch.float32
    expected_a = torch.zeros(10, 10, dtype=torch.uint8)
    expected_a[1:5, 2:5] = 1  # rows 2..9 -> 1..4, cols 8..19 -> 2..4: area 12
    assert torch.equal(regions[0], expected_a)
    assert regions[1].sum() == 3 * 2 and regions[2].sum() == 1
    # 255 absolute 40 px at 20x40 -> 40 * 100 / 800 = 5 (< area 12)
    # 254 relative 0.5 of its 6 px -> 3;  253 absolute 400 -> 50, clipped to its 1 px area
    assert saturation.tolist() == [5.0, 3.0, 1.0]
    padded = dataset[1]
    assert padded["regions"].shape == (3, 10, 10) and padded["regions"][1:].sum() == 0
    assert padded["region_saturation"].tolist() == [2.0, 0.0, 0.0]  # 0.5 * (2 rows x 2 cols)
    assert region_saturation(12, 40.0, False, 10, 20, 40) == 5.0


def test_loco_dataset_with_real_config_collates(loco_root):
    records = scan("mvtec_loco", loco_root)
    dataset = AnomalyDataset(
        records, image_size=16, defects_configs={"juice": load_defects_config(loco_root, "juice")}
    )
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    assert batch["regions"].shape == (len(records), 2, 16, 16)
    assert batch["region_saturation"].shape == (len(records), 2)
    normal = [i for i, r in enumerate(records) if r.label == 0]
    assert batch["region_saturation"][normal].sum() == 0 and batch["regions"][normal].sum() == 0
    assert batch["label"].dtype == torch.long and batch["has_mask"].dtype == torch.bool
    assert isinstance(batch["path"], list) and len(batch["category"]) == len(records)


def test_unknown_grey_value_names_the_mask(loco_root):
    records = [r for r in scan("mvtec_loco", loco_root) if r.label == 1]
    dataset = AnomalyDataset(records, image_size=16, defects_configs={"juice": {255: (1.0, True)}})
    with pytest.raises(DatasetError, match=r"001.png: grey value 254 is not in the defects config"):
        dataset[0]
    with pytest.raises(DatasetError, match="no defects config for category"):
        AnomalyDataset(records, image_size=16, defects_configs={"other": {}})


# ---------------------------------------------------------------------------- synthesis and augmentation


def test_synthetic_pair_is_consistent_and_seeded(mvtec_ad_root):
    records = scan("mvtec_ad", mvtec_ad_root, "bottle")[:3]
    evaluation = AnomalyDataset(records, image_size=32, synthesis=CutPaste("3way"))
    first, again = evaluation[1], evaluation[1]
    assert first["synthetic_image"].shape == (3, 32, 32) and first["synthetic_mask"].shape == (1, 32, 32)
    assert torch.equal(first["synthetic_image"], again["synthetic_image"])  # eval: fixed per index
    changed = (first["synthetic_image"] != first["image"]).any(0)
    assert torch.equal(changed.float(), first["synthetic_mask"][0]) and changed.any()

    training = AnomalyDataset(records, image_size=32, train=True, synthesis=CutPaste("3way"))
    torch.manual_seed(0)
    epoch_one = [training[1]["synthetic_mask"] for _ in range(3)]
    torch.manual_seed(0)
    repeat = [training[1]["synthetic_mask"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(epoch_one, repeat))  # same torch seed, same anomalies
    assert not all(torch.equal(epoch_one[0], m) for m in epoch_one[1:])  # new draws each time


def test_augment_only_in_train_mode(mvtec_ad_root):
    records = [r for r in scan("mvtec_ad", mvtec_ad_root, "bottle") if r.label == 1][:1]
    flip = A.HorizontalFlip(p=1.0)
    plain = AnomalyDataset(records, image_size=32, augment=flip)[0]
    flipped = AnomalyDataset(records, image_size=32, train=True, augment=flip)[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))


# ---------------------------------------------------------------------------- datamodule


def test_validation_split_is_seeded_disjoint_and_per_category(mvtec_ad_root):
    records = [r for r in scan("mvtec_ad", mvtec_ad_root) if r.split == "train"]
    train, validation = split_validation(records, 0.4, seed=1)
    train_again, validation_again = split_validation(records, 0.4, seed=1)
    assert train == train_again and validation == validation_again
    assert {r.image_path for r in train}.isdisjoint(r.image_path for r in validation)
    assert {r.image_path for r in train} | {r.image_path for r in validation} == {
        r.image_path for r in records
    }
    for category in ("bottle", "cable"):
        assert sum(r.category == category for r in validation) == 2  # round(0.4 * 5)
    assert all(r.split == "validation" for r in validation)
    other_seed = {r.image_path for r in split_validation(records, 0.4, seed=2)[1]}
    only_bottle = {
        r.image_path for r in split_validation([r for r in records if r.category == "bottle"], 0.4, 1)[1]
    }
    assert only_bottle == {
        r.image_path for r in validation if r.category == "bottle"
    }  # independent of others
    assert other_seed != {r.image_path for r in validation}


def test_validation_never_empty_nor_takes_everything():
    records = [record(Path(f"{i}.png"), split="train") for i in range(2)]
    train, validation = split_validation(records, 0.01, seed=0)
    assert len(train) == 1 and len(validation) == 1
    train, validation = split_validation(records, 0.99, seed=0)
    assert len(train) == 1 and len(validation) == 1
    assert split_validation(records[:1], 0.5, seed=0) == (records[:1], [])


def test_datamodule_splits_are_deterministic(mvtec_ad_root):
    def splits():
        module = AnomalyDataModule(
            layout="mvtec_ad", root=str(mvtec_ad_root), image_size=16, validation_fraction=0.2
        )
        module.setup("fit")
        return {
            split: [r.image_path for r in module.records(split)] for split in ("train", "validation", "test")
        }

    first, second = splits(), splits()
    assert first == second
    assert len(first["train"]) == 8 and len(first["validation"]) == 2 and len(first["test"]) == 10
    assert set(first["train"]).isdisjoint(first["validation"])


def test_datamodule_loaders(mvtec_ad_root):
    module = AnomalyDataModule(
        layout="mvtec_ad",
        root=str(mvtec_ad_root),
        categories="bottle",
        image_size=16,
        train_batch_size=2,
        eval_batch_size=3,
        validation_fraction=0.2,
        synthesis="cutpaste",
    )
    module.setup("fit")
    assert module.categories_found == ["bottle"] and not module.is_loco
    train = module.train_dataloader()
    assert train.drop_last and isinstance(train.sampler, torch.utils.data.RandomSampler)
    batches = list(train)
    assert len(batches) == 2 and batches[0]["synthetic_image"].shape == (2, 3, 16, 16)
    statistics = list(module.statistics_dataloader())
    assert [p for b in statistics for p in b["path"]] == [str(r.image_path) for r in module.records("train")]
    assert "synthetic_image" not in statistics[0]
    test = list(module.test_dataloader())
    assert sum(len(b["path"]) for b in test) == 5 and "regions" not in test[0]
    assert len(list(module.val_dataloader())) == 1


def test_small_train_set_keeps_its_last_batch(mvtec_ad_root):
    module = AnomalyDataModule(
        layout="mvtec_ad", root=str(mvtec_ad_root), categories="bottle", image_size=16, train_batch_size=8
    )
    module.setup()
    assert not module.train_dataloader().drop_last


def test_loco_datamodule_uses_validation_folder_and_regions(loco_root):
    module = AnomalyDataModule(layout="mvtec_loco", root=str(loco_root), image_size=16, eval_batch_size=16)
    module.setup("fit")
    assert module.is_loco
    assert [r.image_path.parent.parent.name for r in module.records("validation")] == ["validation"] * 2
    assert len(module.records("train")) == 4
    batch = next(iter(module.test_dataloader()))
    assert batch["regions"].shape == (5, 2, 16, 16)  # 2 good + 2 logical + 1 structural
    assert module.defects_configs == {"juice": load_defects_config(loco_root, "juice")}


def test_loco_without_validation_folder_holds_out_train(tmp_path, caplog):
    root = fake_trees.make_mvtec_loco(tmp_path / "loco", with_validation=False)
    module = AnomalyDataModule(layout="mvtec_loco", root=str(root), image_size=16, validation_fraction=0.25)
    with caplog.at_level(logging.WARNING):
        module.setup()
    assert len(module.records("train")) == 3 and len(module.records("validation")) == 1
    assert "no validation/good images" in caplog.text


def test_embedded_is_the_default(fake_embedded, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = AnomalyDataModule(image_size=16)
    module.prepare_data()
    module.setup()
    assert fake_embedded[0] == (Path("data/embedded"), 0)
    assert module.categories_found == ["parts_tray"] and module.is_loco
    assert len(module.records("validation")) == 2


def test_real_embedded_dataset_end_to_end(tmp_path):
    """With the real generator: both categories, LOCO validation folder, regions in test batches."""
    module = AnomalyDataModule(
        root=str(tmp_path / "embedded"),
        image_size=32,
        eval_batch_size=64,
        synthesis="perlin",
        train_batch_size=4,
    )
    module.prepare_data()
    module.setup()
    assert module.is_loco and len(module.categories_found) >= 1
    assert all(len(module.records(split)) > 0 for split in ("train", "validation", "test"))
    assert {r.split for r in module.records("validation")} == {"validation"}
    test = next(iter(module.test_dataloader()))
    anomalous = test["label"] == 1
    assert anomalous.any() and (test["region_saturation"][anomalous].amax(dim=1) > 0).all()
    train = next(iter(module.train_dataloader()))
    assert train["synthetic_mask"].shape == (4, 1, 32, 32) and train["synthetic_mask"].sum() > 0


def test_datamodule_errors_surface_in_init_or_setup(mvtec_ad_root):
    with pytest.raises(DatasetError, match="needs a dataset root"):
        AnomalyDataModule(layout="mvtec_ad")
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        AnomalyDataModule(layout="mvtec", root=str(mvtec_ad_root))
    with pytest.raises(ValueError, match="unknown synthesis 'cutpast'"):
        AnomalyDataModule(layout="mvtec_ad", root=str(mvtec_ad_root), synthesis="cutpast")
    bad = mvtec_ad_root / "bottle" / "train" / "good" / "000.png"
    bad.write_bytes(b"garbage")
    module = AnomalyDataModule(layout="mvtec_ad", root=str(mvtec_ad_root))
    with pytest.raises(DatasetError, match=f"{bad}: cannot be read as an image"):
        module.setup("fit")


@pytest.mark.parametrize("length,world", [(7, 2), (11, 3), (1, 3), (0, 2), (9, 3)])
def test_shard_sampler_covers_each_index_once(length, world):
    shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
    real = [[i for i in shard if i < length] for shard in shards]
    assert sorted(i for shard in real for i in shard) == list(range(length))
    assert [len(ShardSampler(length, rank, world)) for rank in range(world)] == [len(s) for s in shards]
    assert max(map(len, real)) - min(map(len, real)) <= 1
    # Indices ≥ length are padding, only for a shard with no real index, and only one of them.
    assert all(shard == real_part or (not real_part and len(shard) == 1) for shard, real_part in zip(shards, real))
    assert all(shards) or length == 0


def test_a_process_with_no_images_gets_one_flagged_padding_item(tmp_path):
    """Fewer images than processes: the empty shard holds one copy, flagged, which the evaluation drops."""
    from lightning_modules.base import without_padding

    assert [list(ShardSampler(2, rank, 3)) for rank in range(3)] == [[0], [1], [2 + 2 % 2]]
    assert list(ShardSampler(0, 1, 2)) == []
    image = fake_trees.write_image(tmp_path / "a.png", fake_trees.random_rgb(0))
    dataset = AnomalyDataset([record(image), record(image, label=1)], image_size=8)
    padded = dataset[3]
    assert padded["padding"] and not dataset[1]["padding"] and int(padded["index"]) == 1
    assert torch.equal(padded["image"], dataset[1]["image"])
    batch = next(iter(DataLoader(torch.utils.data.Subset(dataset, [0, 2, 3]), batch_size=3)))
    kept = without_padding(batch)
    assert kept["index"].tolist() == [0] and kept["path"] == [str(image)] and kept["image"].shape[0] == 1
    assert without_padding({**batch, "padding": torch.zeros(3, dtype=torch.bool)})["image"].shape[0] == 3


def test_eval_loaders_shard_by_trainer_rank(mvtec_ad_root):
    module = AnomalyDataModule(layout="mvtec_ad", root=str(mvtec_ad_root), image_size=16, eval_batch_size=4)
    module.setup()
    seen = []
    for rank in range(3):
        module.trainer = SimpleNamespace(global_rank=rank, world_size=3)
        seen += [p for batch in module.test_dataloader() for p in batch["path"]]
        train = module.train_dataloader()
        assert isinstance(train.sampler, DistributedSampler) and train.sampler.rank == rank
    assert sorted(seen) == sorted(str(r.image_path) for r in module.records("test"))  # 10 images, once each


class _CountingModule(L.LightningModule):
    """The smallest LightningModule: counts training steps."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer():
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )


def test_lightning_fit_uses_the_datamodule_and_fails_before_training_on_bad_data(mvtec_ad_root):
    module = _CountingModule()
    data = AnomalyDataModule(
        layout="mvtec_ad", root=str(mvtec_ad_root), categories="bottle", image_size=16, train_batch_size=2
    )
    _trainer().fit(module, datamodule=data)
    assert module.steps == 1 and data.trainer is not None

    (mvtec_ad_root / "cable" / "ground_truth" / "crack" / "000_mask.png").unlink()
    broken = _CountingModule()
    with pytest.raises(DatasetError, match="missing mask .*000_mask.png"):
        _trainer().fit(broken, datamodule=AnomalyDataModule(layout="mvtec_ad", root=str(mvtec_ad_root)))
    assert broken.steps == 0


REAL_LOCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_loco_ad"


@pytest.mark.real_data
@pytest.mark.skipif(not REAL_LOCO.is_dir(), reason="../shared/data is not available")
def test_real_loco_item_saturation():
    """juice_bottle masks are 1600x800 (H x W) with grey value 255: absolute 70400 px."""
    records = [r for r in scan("mvtec_loco", REAL_LOCO, "juice_bottle") if r.label == 1][:1]
    config = load_defects_config(REAL_LOCO, "juice_bottle")
    item = AnomalyDataset(records, image_size=64, defects_configs={"juice_bottle": config})[0]
    area = int(item["regions"][0].sum())
    assert item["image"].shape == (3, 64, 64) and area > 0
    assert torch.equal(item["mask"][0], item["regions"][0].float())
    expected = min(70400 * 64 * 64 / (1600 * 800), area)
    assert item["region_saturation"].tolist() == pytest.approx([expected])


# ------------------------------------------------------------------------------ downscaling
def _pil_resize(path: Path, size: int) -> np.ndarray:
    """What the official detector codes feed their networks: PIL's bilinear resize, which antialiases."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def _high_frequency_energy(image: np.ndarray) -> float:
    return float((cv2.Laplacian(image.mean(axis=2), cv2.CV_32F) ** 2).mean())


def test_downscaling_antialiases_like_pil(tmp_path):
    """Pixel noise shrunk 8x: an antialiased resize averages it away, a plain bilinear one samples it."""
    path = fake_trees.write_image(tmp_path / "noise.png", fake_trees.random_rgb(3, height=512, width=512))
    image = AnomalyDataset([record(path)], image_size=64)[0]["image"].numpy().transpose(1, 2, 0)
    reference = _pil_resize(path, 64)
    assert np.abs(image - reference).max() <= 2.5 / 255  # PIL rounds to 8 bits
    assert image.std() < 0.06  # averaged noise; a non-antialiased resize keeps std ~0.29
    upscaled = AnomalyDataset([record(path)], image_size=1024)[0]["image"]  # upscaling: plain bilinear
    assert upscaled.shape == (3, 1024, 1024)


@pytest.mark.real_data
@pytest.mark.skipif(not REAL_LOCO.is_dir(), reason="../shared/data is not available")
def test_real_loco_image_is_downscaled_as_the_official_codes_do():
    """juice_bottle 1600x800 → 256: without antialiasing the input differed from PIL's by up to 0.39."""
    path = REAL_LOCO / "juice_bottle" / "train" / "good" / "000.png"
    records = [r for r in scan("mvtec_loco", REAL_LOCO, "juice_bottle") if r.image_path == path]
    image = AnomalyDataset(records, image_size=256)[0]["image"].numpy().transpose(1, 2, 0)
    reference = _pil_resize(path, 256)
    difference = np.abs(image - reference)
    assert difference.max() < 0.01 and difference.mean() < 0.002
    assert _high_frequency_energy(image) == pytest.approx(_high_frequency_energy(reference), rel=0.1)
