"""Train a detector, calibrate it on held-out normal images, then test it.

    python train.py --config configs/quickstart.yaml [--model.init_args.alpha_local=0 ...]
    python train.py --list-detectors     # every registered detector: what it is, its paper

Writes the run folder (config.yaml, checkpoints/, metrics.json, scores.csv, maps/, csv/ and wandb/).
``--run.resume=true`` continues the latest run of the same name from its last checkpoint.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from datamodules.validate import DatasetError
from lightning_modules import reporting
from lightning_modules.cli import AnomalyCLI, log_checkpoint_artifact, run_command
from lightning_modules.resume import ResumeCheckpoint, read_checkpoint


def train(args: list[str] | None = None) -> dict[str, Any]:
    """Fit → calibrate on the validation split → save final.ckpt → test. Returns the test results."""
    cli = AnomalyCLI(args=args)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    # Scan and validate the whole dataset now: a bad file fails here, before any training step or checkpoint.
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        if not datamodule.records("validation"):
            raise DatasetError(
                f"The validation split is empty (data.validation_fraction={datamodule.validation_fraction}): "
                f"{type(model).__name__} fits its map normalisation on held-out normal images after training, "
                "and without them it would fuse raw, unnormalised maps. Hold out some training images "
                "(e.g. --data.validation_fraction=0.15) or provide the layout's validation folder."
            )
    except BaseException:
        cli.release_run_dir()  # a failed start leaves no empty run folder behind
        raise
    try:
        cli.save_resolved_config()
        fit(cli, trainer, model, datamodule)
        # Calibration (quantiles, z-statistics, ...) on the final weights, whatever the validation cadence.
        trainer.validate(model, datamodule=datamodule, verbose=False)
        final_checkpoint = cli.run_dir / "checkpoints" / "final.ckpt"
        # final.ckpt is for use (evaluate, predict, export): weights and fitted statistics, no optimiser
        # state (Adam keeps two moments per weight, as large as the model); last.ckpt keeps it for --run.resume.
        trainer.save_checkpoint(final_checkpoint, weights_only=True)
        results: dict[str, Any] = {"run_dir": cli.run_dir, "checkpoint": final_checkpoint}
        if cli.config.run.test:
            trainer.test(model, datamodule=datamodule, verbose=False)
            results.update(model.test_results or {})
            if trainer.is_global_zero:
                console = Console()
                console.print(f"Run folder: {cli.run_dir}", soft_wrap=True, highlight=False)
                reporting.print_results_table(results["table"], title=f"Test of {cli.run_dir.name}", console=console)
        if cli.config.wandb.log_checkpoint and trainer.is_global_zero:
            table = results.get("table")
            means = table.rows.get(("mean", "all"), {}) if table is not None else {}
            log_checkpoint_artifact(trainer.loggers, final_checkpoint, {
                "detector": type(model).__name__, "run": cli.run_dir.name, "config": str(cli.run_dir / "config.yaml"),
                "image_threshold": float(model.model.image_threshold), **{f"test/mean/{k}": v for k, v in means.items()}})
        return results
    finally:
        _finish_wandb(trainer)


def fit(cli: AnomalyCLI, trainer, model, datamodule) -> None:
    """Gradient training (``trainer.fit``), or a fit-only detector's one pass over the training images
    (``trainer.predict``: no optimiser, no DDP wrapper), which then writes last.ckpt; a resumed fit-only run whose
    last.ckpt holds the fitted state does not repeat the pass."""
    if not model.fit_only:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cli.resume_checkpoint)
        return
    if cli.resume_checkpoint:
        model.load_state_dict(read_checkpoint(cli.resume_checkpoint)["state_dict"])
        if model.model.statistics_fitted():
            return
    trainer.predict(model, datamodule=datamodule, return_predictions=False)  # predict_dataloader: the pass
    ResumeCheckpoint(cli.run_dir / "checkpoints" / "last.ckpt").save(trainer, weights_only=True)


def _finish_wandb(trainer) -> None:
    """Close the W&B run even after a crash, so the next run of a sweep starts clean."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            import wandb

            if wandb.run is not None:
                wandb.finish()


if __name__ == "__main__":
    run_command(train)
