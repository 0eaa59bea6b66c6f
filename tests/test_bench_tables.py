"""What the benchmark scripts print (they need no data to build their tables)."""

from __future__ import annotations


def test_the_bench_detection_table_names_each_rows_detector():
    """bench/real_features.py trains any config: its table must not call every row ULSAD."""
    import io

    from rich.console import Console

    from bench.real_features import detection_table

    rows = [{"config": f"configs/{name.lower()}/quickstart.yaml", "detector": name, "image_AUROC": 0.9,
             "image_AP": 0.9, "image_F1max": 0.9, "wall_s": 1.0, "test_img_per_s": 1.0, "peak_host_memory_mib": 1.0,
             "weights_source": "package"} for name in ("CRAD", "ULSAD")]
    out = io.StringIO()
    Console(file=out, width=200).print(detection_table(rows))
    text = out.getvalue()
    assert "Detectors on mvtec_ad/bottle" in text and "ULSAD on" not in text
    assert "CRAD " in text and text.count("ULSAD") == 1
