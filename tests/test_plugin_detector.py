"""A detector added without editing any file of the repository: a temporary module registers it (through
``ANOMALY_LAB_DETECTORS``), and the shared, registry-parametrised contract suite tests it (state dict, threshold,
ONNX and TorchScript export, help lines), and train.py trains, evaluates and re-evaluates it on two DDP processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.runs import REPO, assert_same_metrics

pytestmark = pytest.mark.slow

PLUGIN = '''
"""A memory of patch colours, registered from outside the repository."""
from lightning_modules.registry import DetectorEntry, register
from tests.toy_detector import PatchColourDetector


class ToyPlugin(PatchColourDetector):
    """Nearest stored patch colour, as a plugin.

    Args:
        image_size: taken from data.image_size; leave unset.
        bank_size: how many training patch colours the memory keeps.
        threshold_fpr: target false-positive rate of the decision threshold on validation normal images.
    """


register(DetectorEntry(name="ToyPlugin", module=__name__, summary="patch colours (a test plugin)", paper="-",
                       configs=(), test_settings={"bank_size": 64}))
'''


def test_a_detector_registered_from_a_temporary_module_runs_through_the_shared_suites(embedded_root, tmp_path):
    (tmp_path / "toy_plugin.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]),
           "ANOMALY_LAB_DETECTORS": "toy_plugin", "WANDB_MODE": "disabled"}

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    report = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py", "-k", "ToyPlugin")
    summary = report.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, report[-2000:]
    assert int(summary.split(" passed")[0].split()[-1]) >= 6, summary  # every parametrised contract case ran

    run("train.py", "--model=ToyPlugin", "--data.layout=embedded", f"--data.root={embedded_root}",
        "--data.categories=parts_tray", "--data.image_size=64", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.enable_progress_bar=false", "--wandb.mode=disabled",
        f"--run.output_root={tmp_path / 'runs'}", "--run.name=toy")
    metrics = json.loads((tmp_path / "runs" / "toy" / "metrics.json").read_text())
    assert metrics["run"]["detector"] == "ToyPlugin" and metrics["run"]["test_images"] > 0
    run("evaluate.py", "--checkpoint", str(tmp_path / "runs" / "toy" / "checkpoints" / "final.ckpt"),
        "--output_dir", str(tmp_path / "again"), "--trainer.devices=1", "--trainer.strategy=auto")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert assert_same_metrics(metrics, again) >= 7  # one process reproduces the two-process run
