"""Layout scanners and up-front validation, on fake trees of every layout."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datamodules.layouts import LAYOUTS, list_categories, load_defects_config, scan
from datamodules.records import SampleRecord
from datamodules.validate import DatasetError, validate_records
from tests import fake_trees

REAL_LOCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_loco_ad"


def split_counts(records) -> Counter:
    return Counter((r.category, r.split, r.label) for r in records)


# ---------------------------------------------------------------------------- records


def test_has_mask_is_false_only_for_anomalies_without_mask_files():
    base = {
        "image_path": Path("x.png"),
        "category": "c",
        "split": "test",
        "defect_type": "d",
        "anomaly_kind": "anomaly",
    }
    assert SampleRecord(label=0, mask_paths=(), **base).has_mask
    assert SampleRecord(label=1, mask_paths=(Path("m.png"),), **base).has_mask
    assert not SampleRecord(label=1, mask_paths=(), **base).has_mask


# ---------------------------------------------------------------------------- each layout


def test_mvtec_ad_records_and_mask_pairing(mvtec_ad_root):
    records = scan("mvtec_ad", mvtec_ad_root)
    assert split_counts(records) == Counter(
        {
            ("bottle", "train", 0): 5,
            ("bottle", "test", 0): 2,
            ("bottle", "test", 1): 3,
            ("cable", "train", 0): 5,
            ("cable", "test", 0): 2,
            ("cable", "test", 1): 3,
        }
    )
    assert list_categories("mvtec_ad", mvtec_ad_root) == ["bottle", "cable"]  # license.txt is no category
    for record in records:
        if record.label == 0:
            assert record.mask_paths == () and record.defect_type == "good" and record.anomaly_kind == "good"
        else:
            (mask,) = record.mask_paths
            assert mask == (
                mvtec_ad_root
                / record.category
                / "ground_truth"
                / record.defect_type
                / f"{record.image_path.stem}_mask.png"
            )
            assert record.anomaly_kind == "anomaly" and record.image_path.parent.name == record.defect_type
    assert Counter(r.defect_type for r in records if r.category == "bottle" and r.label) == {
        "crack": 2,
        "scratch": 1,
    }
    validate_records(records)


@pytest.mark.parametrize("categories", ["cable", ["cable"], "cable, ", ("cable",)])
def test_category_selection(mvtec_ad_root, categories):
    assert {r.category for r in scan("mvtec_ad", mvtec_ad_root, categories)} == {"cable"}


def test_comma_separated_categories_keep_their_order(mvtec_ad_root):
    records = scan("mvtec_ad", mvtec_ad_root, "cable,bottle")
    assert list(dict.fromkeys(r.category for r in records)) == ["cable", "bottle"]


def test_mvtec_loco_records_regions_and_defects_config(loco_root):
    records = scan("mvtec_loco", loco_root)
    assert split_counts(records) == Counter(
        {
            ("juice", "train", 0): 4,
            ("juice", "validation", 0): 2,
            ("juice", "test", 0): 2,
            ("juice", "test", 1): 3,
        }
    )
    anomalies = {(r.defect_type, r.image_path.stem): r for r in records if r.label}
    gt = loco_root / "juice" / "ground_truth"
    first = anomalies[("logical_anomalies", "000")]
    assert first.anomaly_kind == "logical"
    assert first.mask_paths == (
        gt / "logical_anomalies" / "000" / "000.png",
        gt / "logical_anomalies" / "000" / "001.png",
    )
    assert anomalies[("logical_anomalies", "001")].mask_paths == (
        gt / "logical_anomalies" / "001" / "000.png",
    )
    structural = anomalies[("structural_anomalies", "000")]
    assert structural.anomaly_kind == "structural"
    assert structural.mask_paths == (gt / "structural_anomalies" / "000" / "000.png",)
    assert load_defects_config(loco_root, "juice") == {255: (40.0, False), 254: (0.5, True), 253: (1.0, True)}
    validate_records(records)


def test_defects_config_errors_name_the_file(loco_root, tmp_path):
    with pytest.raises(DatasetError, match="missing defects config .*nothing.*defects_config.json"):
        load_defects_config(loco_root, "nothing")
    config = loco_root / "juice" / "defects_config.json"
    config.write_text('[{"defect_name": "x", "pixel_value": 255}]')
    with pytest.raises(DatasetError, match=str(config)):
        load_defects_config(loco_root, "juice")


def test_visa_reads_the_split_csv(tmp_path):
    root = fake_trees.make_visa(tmp_path / "visa")
    assert list_categories("visa", root) == ["candle", "pcb1"]
    records = scan("visa", root)
    assert split_counts(records) == Counter(
        {
            ("candle", "train", 0): 3,
            ("candle", "test", 0): 2,
            ("candle", "test", 1): 2,
            ("pcb1", "train", 0): 3,
            ("pcb1", "test", 0): 2,
            ("pcb1", "test", 1): 2,
        }
    )
    anomaly = next(r for r in records if r.category == "pcb1" and r.label == 1)
    assert anomaly.image_path == root / "pcb1" / "Data" / "Images" / "Anomaly" / "000.JPG"
    assert anomaly.mask_paths == (root / "pcb1" / "Data" / "Masks" / "Anomaly" / "000.png",)
    assert anomaly.defect_type == "bad" and anomaly.anomaly_kind == "anomaly"
    assert all(r.mask_paths == () for r in records if r.label == 0)
    assert {r.category for r in scan("visa", root, "pcb1")} == {"pcb1"}
    validate_records(records)


def test_visa_csv_problems_are_listed_together(tmp_path):
    root = fake_trees.make_visa(tmp_path / "visa", objects=("candle",))
    csv_path = root / "split_csv" / "1cls.csv"
    with csv_path.open("a", newline="") as handle:
        csv.writer(handle).writerows(
            [
                ["candle", "val", "normal", "x.JPG", ""],
                ["candle", "test", "anomaly", "y.JPG", ""],
            ]
        )
    with pytest.raises(DatasetError) as error:
        scan("visa", root)
    assert "split 'val' is not train or test" in str(error.value)
    assert "anomaly y.JPG has no mask path" in str(error.value)
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match="1cls.csv does not exist"):
        scan("visa", root)


def test_btad_ok_ko_and_same_stem_masks(tmp_path):
    root = fake_trees.make_btad(tmp_path / "btad")
    records = scan("btad", root)
    assert split_counts(records) == Counter(
        {("01", "train", 0): 4, ("01", "test", 0): 2, ("01", "test", 1): 3}
    )
    assert Counter(r.image_path.suffix for r in records) == {".bmp": 7, ".png": 2}
    for record in (r for r in records if r.label):
        assert record.defect_type == "ko"
        assert record.mask_paths == (root / "01" / "ground_truth" / "ko" / f"{record.image_path.stem}.png",)
    validate_records(records)


def test_mpdd_accepts_both_mask_namings(tmp_path):
    root = fake_trees.make_mpdd(tmp_path / "mpdd")
    records = scan("mpdd", root)
    by_defect = {(r.defect_type, r.image_path.stem): r.mask_paths[0].name for r in records if r.label}
    assert by_defect == {
        ("anomalous", "000"): "000.png",
        ("anomalous", "001"): "001.png",
        ("dent", "000"): "000_mask.png",
    }
    validate_records(records)


def test_folder_layout_extensions_dotfiles_and_label_only_defects(tmp_path):
    root = fake_trees.make_folder(tmp_path / "custom")
    records = scan("folder", root)
    train_names = sorted(r.image_path.name for r in records if r.split == "train")
    assert train_names == ["a.png", "b.JPG", "c.Jpeg"]  # ._a.png, .DS_Store and notes.txt skipped
    dents = {r.image_path.name: r for r in records if r.defect_type == "dent"}
    gt = root / "widget" / "ground_truth" / "dent"
    assert dents["d1.png"].mask_paths == (gt / "d1_mask.png",) and dents["d2.png"].mask_paths == (
        gt / "d2.png",
    )
    (stain,) = [r for r in records if r.defect_type == "stain"]
    assert stain.label == 1 and stain.mask_paths == () and not stain.has_mask
    validate_records(records)


def test_folder_defect_with_ground_truth_needs_every_mask(tmp_path):
    root = fake_trees.make_folder(tmp_path / "custom")
    fake_trees.write_image(root / "widget" / "test" / "dent" / "d3.png", fake_trees.random_rgb(9))
    with pytest.raises(DatasetError) as error:
        validate_records(scan("folder", root))
    message = str(error.value)
    assert f"missing mask {root / 'widget' / 'ground_truth' / 'dent'}" in message
    assert f"for {root / 'widget' / 'test' / 'dent' / 'd3.png'}" in message


def test_embedded_generates_then_scans_as_loco(fake_embedded, tmp_path):
    records = scan("embedded", tmp_path / "emb", seed=7)
    assert fake_embedded == [(tmp_path / "emb", 7)]
    assert {r.category for r in records} == {"parts_tray"}
    assert {r.anomaly_kind for r in records if r.label} == {"logical", "structural"}
    assert list_categories("embedded", tmp_path / "emb") == ["parts_tray"]


def test_every_layout_name_is_scannable():
    assert LAYOUTS == ("mvtec_ad", "mvtec_loco", "visa", "btad", "mpdd", "folder", "embedded")


# ---------------------------------------------------------------------------- scan errors


def test_unknown_layout_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset layout 'mvtec'.*mvtec_ad, mvtec_loco"):
        scan("mvtec", tmp_path)


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match=f"dataset root {tmp_path / 'nowhere'} does not exist"):
        scan("mvtec_ad", tmp_path / "nowhere")


def test_unknown_category_lists_those_that_exist(mvtec_ad_root):
    with pytest.raises(DatasetError) as error:
        scan("mvtec_ad", mvtec_ad_root, ["bottle", "screw"])
    assert "'screw' not found under" in str(error.value) and str(mvtec_ad_root) in str(error.value)
    assert "categories there: bottle, cable" in str(error.value)


def test_root_that_is_a_category_folder_gets_a_hint(mvtec_ad_root):
    with pytest.raises(DatasetError, match="looks like a category folder.*'bottle' as category"):
        scan("mvtec_ad", mvtec_ad_root / "bottle")


# ---------------------------------------------------------------------------- validation


def _anomaly(mvtec_ad_root: Path, category="bottle", defect="crack", stem="000") -> tuple[Path, Path]:
    base = mvtec_ad_root / category
    return base / "test" / defect / f"{stem}.png", base / "ground_truth" / defect / f"{stem}_mask.png"


def test_garbage_image_is_named(mvtec_ad_root):
    bad = mvtec_ad_root / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(b"this is not a png at all" * 20)
    with pytest.raises(DatasetError, match=f"{bad}: cannot be read as an image"):
        validate_records(scan("mvtec_ad", mvtec_ad_root))


def test_truncated_png_is_caught_by_pixel_check_only(mvtec_ad_root):
    bad = mvtec_ad_root / "cable" / "test" / "good" / "000.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    records = scan("mvtec_ad", mvtec_ad_root)
    validate_records(records, check_pixels=False)  # the header is intact: a header-only check passes
    with pytest.raises(DatasetError, match=f"{bad}: cannot be read as an image"):
        validate_records(records)


def test_truncated_jpeg_is_caught(tmp_path):
    root = fake_trees.make_visa(tmp_path / "visa", objects=("candle",))
    bad = root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=f"{bad}: cannot be read as an image"):
        validate_records(scan("visa", root))


def test_missing_mask_is_named_with_its_image(mvtec_ad_root):
    image, mask = _anomaly(mvtec_ad_root)
    mask.unlink()
    with pytest.raises(DatasetError, match=f"missing mask {mask} for {image}"):
        validate_records(scan("mvtec_ad", mvtec_ad_root))


def test_missing_mask_is_named_when_ground_truth_folder_is_absent(mvtec_ad_root):
    image, mask = _anomaly(mvtec_ad_root, defect="scratch")
    for path in mask.parent.iterdir():
        path.unlink()
    mask.parent.rmdir()
    with pytest.raises(DatasetError, match=f"missing mask {mask} for {image}"):
        validate_records(scan("mvtec_ad", mvtec_ad_root))


def test_mis_sized_mask_states_both_sizes(mvtec_ad_root):
    _, mask = _anomaly(mvtec_ad_root)
    fake_trees.write_image(mask, np.zeros((30, 30), np.uint8))
    with pytest.raises(DatasetError, match=f"{mask}: mask size 30x30 differs from image 32x32"):
        validate_records(scan("mvtec_ad", mvtec_ad_root))


def test_loco_empty_mask_folder_is_a_missing_mask(loco_root):
    folder = loco_root / "juice" / "ground_truth" / "structural_anomalies" / "000"
    (folder / "000.png").unlink()
    with pytest.raises(DatasetError, match=f"no mask files in {folder} for "):
        validate_records(scan("mvtec_loco", loco_root))


def test_every_problem_is_listed_in_one_error(mvtec_ad_root):
    garbage = mvtec_ad_root / "bottle" / "train" / "good" / "002.png"
    garbage.write_bytes(b"\x89PNG garbage")
    image, missing = _anomaly(mvtec_ad_root, "cable", "crack", "001")
    missing.unlink()
    _, wrong_size = _anomaly(mvtec_ad_root, "bottle", "scratch", "000")
    fake_trees.write_image(wrong_size, np.zeros((32, 30), np.uint8))
    with pytest.raises(DatasetError) as error:
        validate_records(scan("mvtec_ad", mvtec_ad_root))
    message = str(error.value)
    assert "(3 problems)" in message
    assert f"{garbage}: cannot be read as an image" in message
    assert f"missing mask {missing} for {image}" in message
    assert f"{wrong_size}: mask size 30x32 differs from image 32x32" in message


def test_empty_splits_name_category_and_split(mvtec_ad_root):
    for path in (mvtec_ad_root / "cable" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="category 'cable': the train split has no images"):
        validate_records(scan("mvtec_ad", mvtec_ad_root))


def test_requested_category_without_any_image_is_reported(mvtec_ad_root):
    (mvtec_ad_root / "screw" / "train" / "good").mkdir(parents=True)
    records = scan("mvtec_ad", mvtec_ad_root, ["bottle", "screw"])
    with pytest.raises(DatasetError) as error:
        validate_records(records, categories=["bottle", "screw"])
    assert "category 'screw': the train split has no images" in str(error.value)
    assert "category 'screw': the test split has no images" in str(error.value)


@pytest.mark.real_data
@pytest.mark.skipif(not REAL_LOCO.is_dir(), reason="../shared/data is not available")
def test_real_mvtec_loco_juice_bottle():
    records = scan("mvtec_loco", REAL_LOCO, "juice_bottle")
    assert split_counts(records) == Counter(
        {("juice_bottle", "train", 0): 40, ("juice_bottle", "test", 1): 40}
    )
    assert all(r.anomaly_kind == "logical" and len(r.mask_paths) == 1 for r in records if r.label)
    validate_records(records, check_pixels=False)
    config = load_defects_config(REAL_LOCO, "juice_bottle")
    assert config[255] == (70400.0, False) and config[252] == (1.0, True)


# ------------------------------------------------------------------------------ corrupt pixels, doubtful ground truth
def corrupt_png_stream(path: Path) -> None:
    """Flip bytes inside the compressed image data and recompute the chunk CRC: every chunk checksum is
    valid (Image.verify() passes), but the zlib stream no longer decodes."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    body = start + 8
    for offset in range(10, min(length, 40)):
        data[body + offset] ^= 0xFF
    crc = zlib.crc32(bytes(data[start + 4 : body + length])) & 0xFFFFFFFF
    data[body + length : body + length + 4] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_a_png_with_valid_checksums_but_a_corrupt_stream_is_caught(mvtec_ad_root):
    from PIL import Image

    bad = min((mvtec_ad_root / "bottle" / "test" / "good").glob("*.png"))
    fake_trees.write_image(bad, fake_trees.random_rgb(0, 128, 128))
    corrupt_png_stream(bad)
    with Image.open(bad) as image:
        image.verify()  # the cheaper check that used to pass this file
    with pytest.raises(DatasetError, match=f"{bad}: cannot be read as an image"):
        validate_records(scan("mvtec_ad", mvtec_ad_root, "bottle"))


def test_doubtful_ground_truth_is_one_warning_or_with_strict_an_error(tmp_path):
    from datamodules.datamodule import AnomalyDataModule
    from datamodules.validate import DatasetWarning

    root = tmp_path / "folder"
    base = root / "widget"
    fake_trees.write_images(base / "train" / "good", 4)
    fake_trees.write_images(base / "test" / "good", 2, seed=10)
    for defect in ("dent", "scratch", "stain", "crack"):
        fake_trees.write_images(base / "test" / defect, 1, seed=20)
    fake_trees.write_image(base / "ground_truth" / "dent" / "000_mask.png", np.zeros((32, 32), np.uint8))
    background = np.full((32, 32), 253, np.uint8)
    background[8:16, 8:16] = 254
    fake_trees.write_image(base / "ground_truth" / "scratch" / "000_mask.png", background)
    fake_trees.write_image(base / "ground_truth" / "stain" / "000_mask.jpg", fake_trees.block_mask())
    fake_trees.write_image(base / "ground_truth" / "crak" / "000_mask.png", fake_trees.block_mask())  # misspelt

    with pytest.warns(DatasetWarning) as caught:
        AnomalyDataModule(layout="folder", root=str(root), image_size=16).setup()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "4 problems" in message
    assert "dent/000_mask.png: the mask is all zero" in message
    assert "scratch/000_mask.png: the mask has no 0 pixel" in message
    assert "stain/000_mask.jpg: a JPEG mask" in message
    assert "ground_truth/crak: no test/crak folder" in message
    with pytest.raises(DatasetError, match=r"suspicious ground truth \(data.strict=true\).*all zero"):
        AnomalyDataModule(layout="folder", root=str(root), image_size=16, strict=True).setup()


def test_clean_ground_truth_gives_no_warning(mvtec_ad_root, loco_root):
    import warnings

    from datamodules.datamodule import AnomalyDataModule

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnomalyDataModule(layout="mvtec_ad", root=str(mvtec_ad_root), image_size=16).setup()
        AnomalyDataModule(layout="mvtec_loco", root=str(loco_root), image_size=16, strict=True).setup()
