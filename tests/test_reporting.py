"""Tests for lightning_modules/reporting.py: files, panels, the rich table and W&B logging."""

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console

from lightning_modules.reporting import (
    METRIC_ORDER,
    MIN_PANEL_SIZE,
    PANEL_CAPTION_HEIGHT,
    MapSample,
    MetricsTable,
    compute_mean_rows,
    log_results_to_wandb,
    print_results_table,
    read_metrics_json,
    read_scores_csv,
    render_map_panel,
    save_map_panels,
    write_metrics_json,
    write_scores_csv,
)

NAN = math.nan


def loco_rows():
    """Two LOCO-style categories with "all"/"logical"/"structural" subsets; sPRO NaN in one place."""
    return {
        ("juice_bottle", "all"): {"image_AUROC": 0.9, "pixel_sPRO": 0.5, "image_AP": 0.8},
        ("juice_bottle", "logical"): {"image_AUROC": 0.7, "pixel_sPRO": NAN, "image_AP": 0.6},
        ("juice_bottle", "structural"): {"image_AUROC": 1.0, "pixel_sPRO": NAN, "image_AP": 0.95},
        ("breakfast_box", "all"): {"image_AUROC": 0.6, "pixel_sPRO": 0.25, "image_AP": 0.4},
        ("breakfast_box", "logical"): {"image_AUROC": 0.5, "pixel_sPRO": 0.125, "image_AP": 0.3},
        ("breakfast_box", "structural"): {"image_AUROC": 0.8, "pixel_sPRO": NAN, "image_AP": 0.7},
    }


def loco_table():
    rows = loco_rows()
    return MetricsTable({**rows, **compute_mean_rows(rows)})


def assert_rows_equal(actual, expected):
    """Exact float equality with NaN == NaN."""
    assert set(actual) == set(expected)
    for key in expected:
        assert set(actual[key]) == set(expected[key]), key
        for name, value in expected[key].items():
            got = actual[key][name]
            assert (math.isnan(got) and math.isnan(value)) or got == value, (key, name, got, value)


# ---------------------------------------------------------------- MetricsTable and means


def test_compute_mean_rows_matches_hand_computed_means_and_ignores_nan():
    means = compute_mean_rows(loco_rows())
    assert set(means) == {("mean", "all"), ("mean", "logical"), ("mean", "structural")}
    assert means[("mean", "all")]["image_AUROC"] == pytest.approx((0.9 + 0.6) / 2, abs=1e-15)
    assert means[("mean", "all")]["pixel_sPRO"] == pytest.approx((0.5 + 0.25) / 2, abs=1e-15)
    assert means[("mean", "logical")]["image_AP"] == pytest.approx((0.6 + 0.3) / 2, abs=1e-15)
    # NaN for juice_bottle is ignored: the mean is breakfast_box's value alone.
    assert means[("mean", "logical")]["pixel_sPRO"] == 0.125
    # NaN for every category stays NaN.
    assert math.isnan(means[("mean", "structural")]["pixel_sPRO"])
    assert means[("mean", "structural")]["image_AUROC"] == pytest.approx(0.9, abs=1e-15)


def test_compute_mean_rows_ignores_existing_mean_rows_and_missing_metrics():
    rows = {
        ("a", "all"): {"image_AUROC": 0.2},
        ("b", "all"): {"image_AUROC": 0.4, "pixel_AUPRO": 0.3},
        ("mean", "all"): {"image_AUROC": 123.0},
    }
    means = compute_mean_rows(rows)
    assert means == {("mean", "all"): {"image_AUROC": pytest.approx(0.3, abs=1e-15), "pixel_AUPRO": 0.3}}


def test_metrics_table_round_trips_through_nested_form():
    table = loco_table()
    nested = table.to_nested()
    assert list(nested) == ["per_category", "mean", "mean_coverage"]
    # How many categories each mean averages: a category whose value is NaN is not counted.
    assert nested["mean_coverage"]["all"]["image_AUROC"] == {"categories": 2, "of": 2}
    assert nested["mean_coverage"]["structural"]["pixel_sPRO"] == {"categories": 0, "of": 2}
    assert nested["mean_coverage"]["logical"]["pixel_sPRO"] == {"categories": 1, "of": 2}
    assert list(nested["per_category"]) == ["breakfast_box", "juice_bottle"]
    assert list(nested["per_category"]["juice_bottle"]) == ["all", "logical", "structural"]
    # Fixed metric order: image_AUROC, image_AP, ..., pixel_sPRO.
    assert list(nested["mean"]["all"]) == ["image_AUROC", "image_AP", "pixel_sPRO"]
    assert nested["per_category"]["breakfast_box"]["logical"]["pixel_sPRO"] == 0.125
    assert_rows_equal(MetricsTable.from_nested(nested).rows, table.rows)


def test_metrics_table_flat_keys_omit_the_all_subset():
    flat = loco_table().flat()
    assert flat["test/juice_bottle/image_AUROC"] == 0.9
    assert flat["test/breakfast_box/logical/pixel_sPRO"] == 0.125
    assert flat["test/mean/image_AUROC"] == pytest.approx(0.75, abs=1e-15)
    assert flat["test/mean/logical/image_AP"] == pytest.approx(0.45, abs=1e-15)
    assert math.isnan(flat["test/mean/structural/pixel_sPRO"])
    assert len(flat) == 9 * 3  # 9 (group, subset) rows × 3 metrics
    assert "test/mean/all/image_AUROC" not in flat
    assert set(MetricsTable({("a", "all"): {"x": 1.0}}).flat(prefix="val")) == {"val/a/x"}


# ---------------------------------------------------------------- run-folder files


def test_metrics_json_reads_back_exactly_with_nan_as_null(tmp_path):
    table = loco_table()
    table.rows[("juice_bottle", "all")]["image_AUROC"] = 0.1 + 0.2  # 0.30000000000000004: repr matters
    run_info = {"model": "ulsad", "weights_source": Path("/cache/wide_resnet50.pth"), "seed": np.int64(7)}
    path = tmp_path / "run" / "metrics.json"
    write_metrics_json(path, table, run_info)

    text = path.read_text()
    assert "NaN" not in text
    document = json.loads(text)  # strict JSON
    assert list(document) == ["run", "per_category", "mean", "mean_coverage"]
    assert document["run"] == {"model": "ulsad", "weights_source": "/cache/wide_resnet50.pth", "seed": 7}
    assert document["mean"]["structural"]["pixel_sPRO"] is None
    assert document["per_category"]["juice_bottle"]["all"]["image_AUROC"] == 0.1 + 0.2
    read_table, read_run = read_metrics_json(path)
    assert_rows_equal(read_table.rows, table.rows)
    assert read_run["model"] == "ulsad"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_metrics_json_is_byte_identical_for_rows_inserted_in_another_order(tmp_path):
    table = loco_table()
    shuffled = MetricsTable(dict(reversed(list(table.rows.items()))))
    write_metrics_json(tmp_path / "a.json", table, {"seed": 1})
    write_metrics_json(tmp_path / "b.json", shuffled, {"seed": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_scores_csv_reads_back_with_exact_floats(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {
            "path": f"/data/{cat}/test/{kind}/{i:03d}.png",
            "category": cat,
            "defect_type": kind,
            "anomaly_kind": "good" if kind == "good" else "logical",
            "label": int(kind != "good"),
            "score": float(rng.normal()) * 1e3,
            "predicted_label": i % 2,
            "extra": "ignored",
        }
        for cat in ("pushpins", "breakfast_box")
        for kind in ("good", "logical_anomalies")
        for i in range(3)
    ]
    rows[0]["score"] = np.float32(0.1)  # numpy scalars are written at their exact value
    path = tmp_path / "scores.csv"
    write_scores_csv(path, rows)

    with open(path, newline="") as stream:
        header = next(csv.reader(stream))
    assert header == ["path", "category", "defect_type", "anomaly_kind", "label", "score", "predicted_label"]
    read = read_scores_csv(path)
    expected = sorted(rows, key=lambda row: (row["category"], row["path"]))
    assert [row["path"] for row in read] == [row["path"] for row in expected]
    assert [row["score"] for row in read] == [float(row["score"]) for row in expected]  # exact
    assert [row["label"] for row in read] == [row["label"] for row in expected]
    assert [row["predicted_label"] for row in read] == [row["predicted_label"] for row in expected]
    assert [row["anomaly_kind"] for row in read] == [row["anomaly_kind"] for row in expected]


def test_scores_csv_rejects_a_row_without_a_score_and_names_it(tmp_path):
    rows = [
        {
            "path": "/x/good/000.png",
            "category": "c",
            "defect_type": "good",
            "anomaly_kind": "good",
            "label": 0,
        }
    ]
    with pytest.raises(ValueError, match=r"000\.png.*score"):
        write_scores_csv(tmp_path / "scores.csv", rows)
    assert not (tmp_path / "scores.csv").exists()


# ---------------------------------------------------------------- map panels

JET_TOP_RGB = cv2.applyColorMap(np.array([[255]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]
JET_BOTTOM_RGB = cv2.applyColorMap(np.array([[0]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]


def make_sample(size=32, image=None, anomaly_map=None, **fields):
    mask = np.zeros((size, size), np.float32)
    mask[8:20, 10:24] = 1.0
    defaults = {
        "image": np.zeros((size, size, 3), np.float32) if image is None else image,
        "mask": mask,
        "anomaly_map": np.zeros((size, size), np.float32) if anomaly_map is None else anomaly_map,
        "path": f"/data/pushpins/test/logical_anomalies/{fields.pop('stem', '005')}.png",
        "category": "pushpins",
        "defect_type": "logical_anomalies",
        "label": 1,
        "score": 2.5,
    }
    return MapSample(**{**defaults, **fields})


def test_panel_shape_dtype_and_red_image_stays_red():
    red = np.zeros((32, 40, 3), np.float32)
    red[..., 0] = 1.0
    sample = make_sample(
        image=red, mask=np.zeros((32, 40), np.float32), anomaly_map=np.zeros((32, 40), np.float32)
    )
    panel = render_map_panel(sample, vmin=0.0, vmax=1.0)
    assert panel.shape == (32, 120, 3) and panel.dtype == np.uint8
    assert (panel[:, :40] == [255, 0, 0]).all()  # RGB, not BGR
    assert (panel[:, 40:80] == [255, 0, 0]).all()  # empty mask: no contour drawn


def test_heatmap_uses_the_fixed_scale_and_the_colormaps_top_colour():
    anomaly_map = np.zeros((32, 32), np.float32)
    anomaly_map[:, 16:] = 7.0  # = vmax
    anomaly_map[:5, :5] = 100.0  # above vmax: clipped to the top colour
    sample = make_sample(anomaly_map=anomaly_map)
    heat = render_map_panel(sample, vmin=-3.0, vmax=7.0, heatmap_alpha=1.0)[:, 64:]
    assert (heat[:, 16:] == JET_TOP_RGB).all()
    assert (heat[:5, :5] == JET_TOP_RGB).all()
    assert tuple(JET_TOP_RGB) == (128, 0, 0)  # jet ends in dark red; BGR would read (0, 0, 128)
    # 0 on the scale -3..7 is level round(0.3 * 255) = 76 of the colour map.
    level_76 = cv2.applyColorMap(np.array([[76]], np.uint8), cv2.COLORMAP_JET)[0, 0, ::-1]
    assert (heat[10:, :16] == level_76).all()
    # The same map on a larger scale is cooler: the scale is not per-image.
    cooler = render_map_panel(sample, vmin=-3.0, vmax=1000.0, heatmap_alpha=1.0)[:, 64:]
    assert not (cooler[:, 16:] == JET_TOP_RGB).all(axis=-1).any()


def test_heatmap_is_blended_with_the_image_by_alpha():
    gray = np.full((32, 32, 3), 0.4, np.float32)  # 102 in uint8
    sample = make_sample(image=gray, anomaly_map=np.full((32, 32), 5.0, np.float32))
    heat = render_map_panel(sample, vmin=0.0, vmax=5.0, heatmap_alpha=0.5)[:, 64:]
    expected = np.rint(0.5 * JET_TOP_RGB.astype(float) + 0.5 * 102).astype(np.uint8)
    assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 1


def test_mask_contour_is_drawn_on_the_middle_panel_only():
    sample = make_sample()
    panel = render_map_panel(sample, vmin=0.0, vmax=1.0)
    middle = panel[:, 32:64]
    assert (middle[8, 10:24] == [255, 0, 0]).all()  # top edge of the mask rectangle
    assert (middle[0:6] == 0).all() and (middle[12:16, 13:21] == 0).all()  # off the contour
    assert (panel[:, :32] == 0).all()


def test_a_lower_resolution_map_is_upsampled_to_the_image():
    sample = make_sample(size=32, anomaly_map=np.full((8, 8), 1.0, np.float32))
    heat = render_map_panel(sample, vmin=0.0, vmax=1.0, heatmap_alpha=1.0)[:, 64:]
    assert heat.shape == (32, 32, 3) and (heat == JET_TOP_RGB).all()


def test_caption_is_written_on_wide_panels_but_not_on_the_image_or_heatmap():
    sample = make_sample(size=128)
    with_caption = render_map_panel(sample, 0.0, 1.0, caption=True)
    without = render_map_panel(sample, 0.0, 1.0, caption=False)
    assert (with_caption[:, 128:256] != without[:, 128:256]).any()
    assert (with_caption[:, :128] == without[:, :128]).all()
    assert (with_caption[:, 256:] == without[:, 256:]).all()


def test_save_map_panels_writes_rgb_pngs_at_documented_unique_paths(tmp_path):
    red = np.zeros((32, 32, 3), np.float32)
    red[..., 0] = 1.0
    samples = [
        make_sample(image=red, stem="005"),
        make_sample(stem="005"),  # same category, defect and stem: must not overwrite the first
        make_sample(
            stem="000", category="juice_bottle", defect_type="good", label=0, mask=np.zeros((32, 32))
        ),
    ]
    paths = save_map_panels(tmp_path / "maps", samples, vmin=0.0, vmax=1.0)
    assert paths == [
        tmp_path / "maps" / "pushpins" / "logical_anomalies_005.png",
        tmp_path / "maps" / "pushpins" / "logical_anomalies_005_1.png",
        tmp_path / "maps" / "juice_bottle" / "good_000.png",
    ]
    first = cv2.cvtColor(cv2.imread(str(paths[0])), cv2.COLOR_BGR2RGB)
    # Each of the three panels at least 256 px; a caption strip above, a colour bar on the right.
    top, size = PANEL_CAPTION_HEIGHT, MIN_PANEL_SIZE
    assert first.shape[0] == top + size and first.shape[1] > 3 * size
    assert (first[top:, :size] == [255, 0, 0]).all()  # red on disk too (PNG is lossless)
    assert (first[:top] == 255).all(axis=-1).mean() > 0.8  # a white strip with dark text
    assert (first[:top] < 128).all(axis=-1).any()
    second = cv2.imread(str(paths[1]))
    assert (second[top:, :size] == 0).all()


def test_saved_panels_have_a_colour_bar_from_the_low_to_the_high_end_of_the_scale(tmp_path):
    (path,) = save_map_panels(tmp_path, [make_sample()], vmin=0.0, vmax=1.0)
    panel = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    top, size = PANEL_CAPTION_HEIGHT, MIN_PANEL_SIZE
    column = panel[top + 2: top + size - 2, 3 * size + 10].astype(int)  # down the bar
    assert column[0].tolist() == pytest.approx(JET_TOP_RGB, abs=40)  # high end (anomalous) at the top: dark red
    assert column[-1][2] > 100 and column[-1][0] < 60  # low end (normal) at the bottom: blue


# ---------------------------------------------------------------- rich table


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split("│")[1:-1]]


def test_results_tables_show_categories_subsets_and_percentages_one_table_per_view():
    console = Console(record=True, width=200)
    print_results_table(loco_table(), "MVTec LOCO", console=console)
    text = console.export_text()
    lines = text.splitlines()
    assert "MVTec LOCO: image" in text and "MVTec LOCO: pixel" in text
    image_header = next(line for line in lines if "I-AUROC" in line)
    assert image_header.index("I-AUROC") < image_header.index("I-AP") and "sPRO" not in image_header
    pixel_header = next(line for line in lines if "sPRO" in line)
    assert "I-AUROC" not in pixel_header and "AUPRO" not in text  # absent metrics get no column
    row = next(line for line in lines if "juice_bottle" in line and "logical" in line)
    assert _cells(row) == ["juice_bottle", "logical", "70.0", "60.0"]
    mean_row = next(line for line in lines if "mean" in line and "all" in line)
    assert _cells(mean_row)[2:] == ["75.0", "60.0"]
    image_lines = lines[:lines.index(next(line for line in lines if "sPRO" in line))]
    assert lines.index(mean_row) > max(i for i, line in enumerate(image_lines) if "juice_bottle" in line)
    assert _cells(mean_row)[0] == "mean of 2"
    pixel_lines = lines[lines.index(pixel_header):]
    logical_mean = next(line for line in pixel_lines if "mean" in line and "logical" in line)
    assert _cells(logical_mean)[2] == "12.5*"  # only breakfast_box has a logical sPRO
    assert "* a mean over fewer categories: logical sPRO 1 of 2." in " ".join(text.split())
    assert "I- image-level, P- pixel-level" in " ".join(text.split())


def test_results_table_without_subsets_has_no_subset_column():
    console = Console(record=True, width=200)
    rows = {("bottle", "all"): {"pixel_AUROC": 0.98765, "image_AUROC": NAN},
            ("cable", "all"): {"pixel_AUROC": 0.5, "image_AUROC": 0.5}}
    print_results_table(MetricsTable({**rows, **compute_mean_rows(rows)}), "MVTec AD", console=console)
    text = console.export_text()
    assert "Subset" not in text
    bottle = [line for line in text.splitlines() if "bottle" in line]
    assert [_cells(line) for line in bottle] == [["bottle", "–"], ["bottle", "98.8"]]


def test_results_tables_fit_80_columns_with_no_truncated_header_or_cell():
    """What a log file (rich's 80 columns when not on a terminal) shows: every label and value whole."""
    console = Console(record=True, width=80)
    rows = {(category, subset): {name: 0.987654 for name in METRIC_ORDER}
            for category in ("splicing_connectors", "breakfast_box") for subset in ("all", "logical", "structural")}
    rows[("breakfast_box", "logical")]["pixel_sPRO"] = NAN
    print_results_table(MetricsTable({**rows, **compute_mean_rows(rows)}),
                        "Test results — runs/ULSAD_mvtec_loco_all_v12", console=console)
    text = console.export_text()
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    for label in ("Category", "Subset", "I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "AUPRO", "sPRO",
                  "splicing_connectors", "structural", "98.8*"):
        assert label in text, label


def test_results_tables_print_no_repeated_identical_rows():
    """One category (no mean rows), and a category whose only subset equals its "all" row (woven_tiles)."""
    console = Console(record=True, width=80)
    single = {("bottle", "all"): {"image_AUROC": 0.9, "pixel_AUROC": 0.8}}
    print_results_table(MetricsTable({**single, **compute_mean_rows(single)}), "one category", console=console)
    assert "mean" not in console.export_text()
    console = Console(record=True, width=80)
    rows = {("woven_tiles", "all"): {"image_AUROC": 0.9}, ("woven_tiles", "structural"): {"image_AUROC": 0.9},
            ("parts_tray", "all"): {"image_AUROC": 0.8}, ("parts_tray", "logical"): {"image_AUROC": 0.7},
            ("parts_tray", "structural"): {"image_AUROC": 0.9}}
    print_results_table(MetricsTable({**rows, **compute_mean_rows(rows)}), "embedded", console=console)
    lines = console.export_text().splitlines()
    assert [_cells(line) for line in lines if "woven_tiles" in line] == [["woven_tiles", "structural", "90.0"]]
    assert len([line for line in lines if "parts_tray" in line]) == 3
    assert len([line for line in lines if "mean" in line]) == 3  # all 85.0, logical 70.0 (1 of 2), structural 90.0


# ---------------------------------------------------------------- W&B


class FakeExperiment:
    def __init__(self):
        self.calls = []

    def log(self, payload, **kwargs):
        self.calls.append((payload, kwargs))


def test_wandb_logging_is_a_no_op_without_a_wandb_logger():
    table, samples = loco_table(), [make_sample()]
    log_results_to_wandb(None, table, [], samples, 0.0, 1.0)
    other = type("CSVLogger", (), {"experiment": FakeExperiment()})()
    log_results_to_wandb(other, table, [], samples, 0.0, 1.0)
    assert other.experiment.calls == []


def test_wandb_offline_run_contains_tables_and_masked_maps(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="reporting-test")
    score_rows = [
        {
            "path": "/d/pushpins/test/good/000.png",
            "category": "pushpins",
            "defect_type": "good",
            "anomaly_kind": "good",
            "label": 0,
            "score": 0.25,
            "predicted_label": 0,
        },
        {
            "path": "/d/pushpins/test/logical_anomalies/005.png",
            "category": "pushpins",
            "defect_type": "logical_anomalies",
            "anomaly_kind": "logical",
            "label": 1,
            "score": NAN,
            "predicted_label": 1,
        },
    ]
    score_rows += [_score_row("juice_bottle", label, 0.1 + 0.5 * label, index) for index, label in enumerate([0, 1, 0])]
    samples = [make_sample(), make_sample(category="juice_bottle", stem="001")]
    logged = []
    original_log = logger.experiment.log
    monkeypatch.setattr(
        logger.experiment, "log", lambda payload, **kw: (logged.append(kw), original_log(payload, **kw))
    )
    try:
        log_results_to_wandb(logger, loco_table(), score_rows, samples, vmin=0.0, vmax=1.0)
    finally:
        logger.experiment.finish()

    assert logged == [{}]  # one call, no step=
    media = next((tmp_path / "wandb").glob("offline-run-*")) / "files" / "media"
    per_category = json.loads(next(media.glob("table/test/per_category*.table.json")).read_text())
    assert per_category["columns"] == ["group", "subset", "image_AUROC", "image_AP", "pixel_sPRO"]
    assert len(per_category["data"]) == 9
    assert per_category["data"][0] == ["breakfast_box", "all", 0.6, 0.4, 0.25]
    assert per_category["data"][-1][:2] == ["mean", "structural"] and per_category["data"][-1][-1] is None
    scores = json.loads(next(media.glob("table/test/scores*.table.json")).read_text())
    assert scores["columns"] == ["path", "category", "defect_type", "anomaly_kind", "label", "score",
                                 "predicted_label"]
    assert [row[-2:] for row in scores["data"] if row[1] == "pushpins"] == [[0.25, 0], [None, 1]]
    # ROC and PR curves per category (pushpins has a NaN score: no curve)
    roc = json.loads(next(media.glob("table/test/roc_image_table*.table.json")).read_text())
    assert roc["columns"] == ["step", "lineKey", "lineVal"] and {row[1] for row in roc["data"]} == {"juice_bottle"}
    assert len(list(media.glob("images/test/maps/pushpins*.png"))) == 1
    assert len(list(media.glob("images/test/maps/juice_bottle*.png"))) == 1
    mask_file = next(media.glob("images/mask/test/maps/pushpins*.png"))
    mask = cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED)
    assert mask.shape[:2] == (32, 96)  # the GT mask is tiled over the three panels
    assert mask.reshape(32, 96, -1)[..., 0].astype(bool).sum() == 3 * 12 * 14


def test_panel_accepts_a_1xhxw_map_and_names_the_file_for_a_bad_shape():
    anomaly_map = np.full((1, 32, 32), 1.0, np.float32)  # one item of a B×1×H×W batch
    heat = render_map_panel(make_sample(anomaly_map=anomaly_map), 0.0, 1.0, heatmap_alpha=1.0)[:, 64:]
    assert (heat == JET_TOP_RGB).all()
    with pytest.raises(ValueError, match=r"anomaly_map of .*005\.png.*\(2, 32, 32\)"):
        render_map_panel(make_sample(anomaly_map=np.zeros((2, 32, 32), np.float32)), 0.0, 1.0)


def _score_row(category: str, label: int, score: float, index: int) -> dict:
    return {"path": f"/d/{category}/{index:03d}.png", "category": category, "defect_type": "bad" if label else "good",
            "anomaly_kind": "structural" if label else "good", "label": label, "score": score, "predicted_label": 0}


def test_image_curves_per_category_have_the_metrics_auroc_and_go_to_a_csv(tmp_path):
    import torch
    from torchmetrics.functional.classification import binary_auroc

    from lightning_modules.reporting import image_curves, write_curves_csv

    generator = np.random.default_rng(0)
    rows = [_score_row("bottle", int(i >= 10), float(generator.normal(i >= 10, 1.0)) * 5, i) for i in range(20)]
    rows += [_score_row("cable", int(i % 2), float(i), i) for i in range(6)]
    rows += [_score_row("only_good", 0, 0.5, i) for i in range(3)]  # one class: no curve
    curves = image_curves(rows)
    assert set(curves) == {"bottle", "cable"}
    for category, curve in curves.items():
        fpr, tpr = curve["roc"]
        scores = torch.tensor([r["score"] for r in rows if r["category"] == category])
        labels = torch.tensor([r["label"] for r in rows if r["category"] == category])
        assert float(np.trapezoid(tpr, fpr)) == pytest.approx(float(binary_auroc(scores, labels)), abs=1e-6)
        recall, precision = curve["pr"]
        assert recall[0] == pytest.approx(1.0) and precision[-1] == pytest.approx(1.0)
    write_curves_csv(tmp_path / "curves.csv", curves)
    with (tmp_path / "curves.csv").open() as stream:
        written = list(csv.DictReader(stream))
    assert {row["curve"] for row in written} == {"roc", "pr"}
    assert len([row for row in written if row["category"] == "cable" and row["curve"] == "roc"]) == \
        len(curves["cable"]["roc"][0])


def test_the_maps_show_detections_misses_and_false_alarms_per_category():
    import torch

    from lightning_modules.evaluation import TestEvaluation

    evaluation = TestEvaluation(max_maps_per_category=6)  # two of each role
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0]
    scores = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.2, 0.3, 0.95, 0.05, 0.4])
    batch = {"image": torch.rand(9, 3, 16, 16), "mask": torch.zeros(9, 1, 16, 16), "label": torch.tensor(labels),
             "path": [f"/d/c/{i}.png" for i in range(9)], "category": ["c"] * 9,
             "defect_type": ["bad" if label else "good" for label in labels]}
    for start, stop in ((0, 5), (5, 9)):  # two batches
        part = {key: value[start:stop] for key, value in batch.items()}
        evaluation.keep_display_candidates(part, torch.rand(stop - start, 16, 16), scores[start:stop])
    chosen = {(sample.role, round(sample.score, 2)) for sample in evaluation.gather_display_samples()}
    assert chosen == {("detected", 0.9), ("detected", 0.8), ("missed", 0.1), ("missed", 0.2),
                      ("false alarm", 0.95), ("false alarm", 0.4)}
