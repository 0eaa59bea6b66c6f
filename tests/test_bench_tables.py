"""What the benchmark scripts print (they need no data to build their tables)."""

from __future__ import annotations


def test_the_bench_detection_table_names_each_rows_detector():
    """bench/real_features.py trains any config: its table must not call every row ULSAD."""
    import io

    from rich.console import Console

    from bench.real_features import detection_table

    rows = [{"sample": "bottle", "config": f"configs/{name.lower()}/quickstart.yaml", "detector": name,
             "image_AUROC": 0.9, "image_AP": 0.9, "image_F1max": 0.9, "pixel_AUROC": None, "wall_s": 1.0,
             "test_img_per_s": 1.0, "peak_host_memory_mib": 1.0, "weights_source": "package"}
            for name in ("CRAD", "ULSAD")]
    rows.append({"sample": "grid", "config": "configs/crad/quickstart.yaml features", "detector": "nearest neighbour",
                 "image_AUROC": 0.8, "pixel_AUROC": 0.123, "wall_s": 2.0})  # a baseline row: no AP, no speed
    out = io.StringIO()
    Console(file=out, width=250).print(detection_table(rows))
    text = out.getvalue()
    assert "Detectors on real samples" in text and "ULSAD on" not in text
    assert "CRAD " in text and text.count("ULSAD") == 1
    assert "0.123" in text and "nearest neighbour" in text  # the baseline's pixel AUROC is shown
