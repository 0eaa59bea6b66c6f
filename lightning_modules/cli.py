"""The command line shared by ``train.py`` and ``evaluate.py``.

LightningCLI in instantiation-only mode (``run=False``) gives ``python train.py --config x.yaml``
with no subcommand and dotted overrides (``--model.init_args.alpha_local=0``); the scripts call
fit/validate/test themselves. This class adds the run folder, the loggers (W&B offline unless
credentials exist, plus a CSV log for people without W&B) and the checkpoint callbacks.
"""

from __future__ import annotations

import importlib
import inspect
import netrc
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.datamodule import AnomalyDataModule
from datamodules.validate import DatasetError
from lightning_modules import registry
from lightning_modules.config_files import BASES_KEY, ConfigFileError, expand_config_arguments
from lightning_modules.base import AnomalyDetector, NonFiniteResults, NotCalibrated, TrainingDiverged
from lightning_modules.progress import PlainProgress, wants_plain_progress
from lightning_modules.resume import CheckpointError, ResumableCSVLogger, ResumeCheckpoint, read_checkpoint
from lightning_modules.upstream_noise import silence_upstream_noise
from networks.anomaly_model import FittedSettingsMismatch

# Every registered detector is imported so that --model=ULSAD (a short name) resolves and --help lists them all.
registry.import_all()

RUN_DIR_ENV = "ANOMALY_RUN_DIR"  # how DDP child processes learn the run folder rank 0 chose


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the keys and what to set."""


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _is_ddp_child() -> bool:
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "run"


def resolve_run_dir(output_root: str, name: str, resume: bool, explicit: str | None) -> Path:
    """The run folder: deterministic from the config, versioned (`_v2`, ...) instead of overwriting.

    Rank 0 decides and exports it; DDP children (which re-run the command line) read it back, so every
    process writes to the same folder even though the folder exists by the time they start.
    """
    if explicit:
        return Path(explicit)
    if _is_ddp_child() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    base = Path(output_root) / name
    versions = [base] + [base.with_name(f"{base.name}_v{i}") for i in range(2, 1000)]
    if resume:
        existing = [path for path in versions if path.exists()]
        if not existing:
            raise FileNotFoundError(f"--run.resume: no earlier run folder {base} to resume from")
        resumable = [path for path in existing if (path / "checkpoints" / "last.ckpt").is_file()]
        if not resumable:
            raise FileNotFoundError(
                f"--run.resume: none of the run folders {[str(p) for p in existing]} holds checkpoints/last.ckpt"
            )
        chosen = resumable[-1]  # the newest run that can be resumed, not a newer folder of a failed start
    else:
        # mkdir is atomic: two runs started at the same moment (sweep agents) never share a folder.
        base.parent.mkdir(parents=True, exist_ok=True)
        for chosen in versions:
            try:
                chosen.mkdir()
                break
            except FileExistsError:
                continue
    os.environ[RUN_DIR_ENV] = str(chosen)
    return chosen


FULL_FLOAT32_PRECISIONS = (None, 32, "32", "32-true")


def use_ieee_float32() -> None:
    """`precision: 32-true` means IEEE float32: no TF32 in cuBLAS matmuls or cuDNN convolutions.

    PyTorch lets cuDNN convolutions use TF32 (10 mantissa bits) by default on Ampere and later GPUs;
    the PUAD code turns both flags off, and a run that says fp32 should compute in fp32. (The legacy
    flags, not `fp32_precision`: mixing the two APIs makes PyTorch raise when either is read.)
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def git_state(repository: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the work tree has uncommitted changes) of the code, or (None, None) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repository, capture_output=True, text=True,
                              timeout=10, check=False)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repository,
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if head.returncode != 0 or status.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


# Command-line overrides that name an experimental setting (in W&B names, tags and groups); the rest are plumbing.
SETTING_PREFIXES = ("model.init_args", "data.", "seed_everything", "trainer.max_epochs", "trainer.max_steps",
                    "trainer.precision")
NOT_SETTINGS = ("data.root", "data.num_workers", "data.eval_batch_size", "data.texture_dir", "data.check_pixels")
WANDB_TAG_LIMIT = 64  # W&B refuses longer tags


def _mapping_entries(value: str) -> dict[str, str] | None:
    """`{alpha_local: 0.0, use_tie_loss: false}` (or W&B's `{'alpha_local': 0.0, 'use_tie_loss': False}`) →
    {"alpha_local": "0.0", "use_tie_loss": "false"}; None for a value that is not a mapping."""
    if not value.startswith("{"):
        return None
    try:
        mapping = yaml.safe_load(value)
    except yaml.YAMLError:
        return None
    if not isinstance(mapping, dict):
        return None
    return {str(key): (str(item).lower() if isinstance(item, bool) else str(item)) for key, item in mapping.items()}


def wandb_identity(run_name: str, args: Sequence[str]) -> tuple[str, list[str], str]:
    """(run name, tags, group) for W&B from the settings given on the command line (`--key=value`).

    A sweep run called `table3-004` becomes `table3-004 alpha_local=0.0 use_tie_loss=false ...`, one tag per
    setting, and its group is the config plus every setting but the seed, so the seeds of one setting sit together.
    """
    config, settings = None, {}
    for position, arg in enumerate(args):
        if arg == "--config" and position + 1 < len(args):
            config = args[position + 1]
        key, equals, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and equals and key.startswith(SETTING_PREFIXES) and key not in NOT_SETTINGS:
            entries = _mapping_entries(value)
            if entries is not None:  # a study row, several settings at once: name it by its entries
                settings.update(entries)
            else:
                settings["seed" if key == "seed_everything" else key.rsplit(".", 1)[-1]] = value
    tags = [f"{key}={value}"[:WANDB_TAG_LIMIT] for key, value in settings.items()]
    base = re.sub(r"^configs/|\.ya?ml$", "", str(config)) if config else run_name
    group = " ".join([base, *(tag for tag in tags if not tag.startswith("seed="))])
    return " ".join([run_name, *tags]), tags, group


def log_checkpoint_artifact(loggers: Sequence[Any], checkpoint: Path, metadata: dict[str, Any]) -> list[Any]:
    """Upload `checkpoint` as a W&B model artifact through every W&B logger; returns the logged artifacts.

    The artifact is named after the run folder (`model-<run>`, characters W&B refuses become `-`), so the
    checkpoints of a sweep's runs sit side by side in the project's model registry.
    """
    import wandb

    logged = []
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        name = "model-" + re.sub(r"[^A-Za-z0-9_.-]", "-", checkpoint.resolve().parent.parent.name)
        artifact = wandb.Artifact(name, type="model", metadata=metadata,
                                  description="final.ckpt: the trained weights with every fitted statistic and the "
                                              "decision threshold (evaluate.py, export.py and folder prediction read it)")
        artifact.add_file(str(checkpoint), name=checkpoint.name)
        logger.experiment.log_artifact(artifact, aliases=["final"])
        logged.append(artifact)
    return logged


class AnomalyCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, program: str = "train.py", **kwargs: Any) -> None:
        # What made this run, for config.yaml and W&B: the program and its arguments as given.
        self.arguments = list(sys.argv[1:] if args is None else args)
        self.command = shlex.join([program, *self.arguments])
        self.run_dir: Path | None = None
        self.resume_checkpoint: str | None = None
        self.resume_step: int | None = None  # global step of the checkpoint a resumed run continues from
        silence_upstream_noise()
        super().__init__(
            model_class=AnomalyDetector,
            subclass_mode_model=True,
            datamodule_class=AnomalyDataModule,
            run=False,
            save_config_callback=None,
            auto_configure_optimizers=False,
            trainer_defaults={"use_distributed_sampler": False, "num_sanity_val_steps": 0},
            args=expand_config_arguments(self.arguments),
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(f"--{BASES_KEY}", type=list[str], default=[],
                            help="The config files a config file stacks on, relative to it (data, detector, paper "
                                 "setting); the CLI applies them before the file itself (lightning_modules/config_files.py).")
        parser.add_argument("--run.output_root", type=str, default="runs", help="Parent folder of run folders.")
        parser.add_argument("--run.name", type=str | None, default=None,
                            help="Run folder name; default <detector>_<layout>_<categories>.")
        parser.add_argument("--run.dir", type=str | None, default=None, help="Exact output folder (no versioning).")
        parser.add_argument("--run.resume", type=bool, default=False,
                            help="Continue the latest run of this name from its last checkpoint.")
        parser.add_argument("--run.test", type=bool, default=True, help="Test after training.")
        parser.add_argument("--run.checkpoint_every_n_steps", type=int | None, default=None,
                            help="Also checkpoint within epochs (long epochs on real data).")
        for key, kind in (("git_commit", str | None), ("git_dirty", bool | None), ("command", str | None)):
            parser.add_argument(f"--run.{key}", type=kind, default=None,
                                help="Recorded by the run itself (the code's git state, the command line); "
                                     "a value given here is replaced.")
        parser.add_argument("--wandb.mode", type=str, default="auto",
                            help="auto (online with credentials, else offline) | online | offline | disabled")
        parser.add_argument("--wandb.project", type=str, default="anomaly-lab")
        parser.add_argument("--wandb.group", type=str | None, default=None)
        parser.add_argument("--wandb.tags", type=list[str], default=[])
        parser.add_argument("--wandb.log_checkpoint", type=bool, default=False,
                            help="Upload checkpoints/final.ckpt as a W&B model artifact (alias `final`) after testing, "
                                 "with the mean metrics as its metadata. Off by default: checkpoints can be large.")

    # -------------------------------------------------------------- run folder
    def default_run_name(self) -> str:
        config = self.config
        detector = str(config.model.class_path).rsplit(".", 1)[-1]
        categories = config.data.categories
        categories = "-".join(categories) if isinstance(categories, (list, tuple)) else str(categories)
        return _slug(f"{detector}_{config.data.layout}_{categories}")

    def before_instantiate_classes(self) -> None:
        self._one_image_size()
        self._detector_trainer_defaults()
        run = self.config.run
        run.git_commit, run.git_dirty = git_state(Path(__file__).resolve().parents[1])
        run.command = self.command
        self.run_dir = resolve_run_dir(run.output_root, run.name or self.default_run_name(), run.resume, run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.trainer.default_root_dir = str(self.run_dir)
        if self.config.trainer.precision in FULL_FLOAT32_PRECISIONS:
            use_ieee_float32()
            rank_zero_info("precision 32-true: TF32 is off for cuBLAS matmuls and cuDNN convolutions (IEEE float32).")
        if run.resume:
            last = self.run_dir / "checkpoints" / "last.ckpt"
            if not last.exists():
                raise FileNotFoundError(f"--run.resume: {last} does not exist")
            self.resume_checkpoint = str(last)
            self.resume_step = int(read_checkpoint(last)["global_step"])

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            # The whole resolved config goes to W&B once, nested, through the logger (and to config.yaml); Lightning
            # would log the model's and data module's init arguments again as flat top-level keys.
            self.model._log_hyperparams = False
            self.datamodule._log_hyperparams = False
        except BaseException as error:
            self.release_run_dir()
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
                raise
            # jsonargparse wraps a constructor's error in "Does not validate against any of the Union
            # subtypes ..."; the user needs the constructor's own message.
            innermost = error
            while innermost.__cause__ is not None and innermost.__cause__ is not innermost:
                innermost = innermost.__cause__
            if isinstance(innermost, USER_ERRORS):
                raise innermost from None
            raise ConfigError(f"{type(innermost).__name__}: {innermost}") from error

    def release_run_dir(self) -> None:
        """Remove the run folder this start claimed if nothing was written into it (a failed start), so that
        failed starts leave no empty versioned folders behind. A folder holding any file is never touched."""
        if self.run_dir is None or not self.run_dir.is_dir() or self.config.run.resume:
            return
        if not any(path.is_file() for path in self.run_dir.rglob("*")):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _detector_trainer_defaults(self) -> None:
        """Apply the detector's ``trainer_defaults`` to every trainer key the config leaves at Lightning's default."""
        module_name, class_name = str(self.config.model.class_path).rsplit(".", 1)
        detector = getattr(importlib.import_module(module_name), class_name)
        lightning_defaults = inspect.signature(Trainer.__init__).parameters
        for key, value in getattr(detector, "trainer_defaults", {}).items():
            if self.config.trainer.get(key) == lightning_defaults[key].default:
                self.config.trainer[key] = value

    def _one_image_size(self) -> None:
        """data.image_size is the one image-size key: the model takes it. A model image_size that says
        otherwise is an error here, not Lightning's "Error while merging hparams" after the model is built."""
        model_args, data_size = self.config.model.init_args, self.config.data.image_size
        if "image_size" not in model_args:
            return
        if model_args.image_size not in (None, data_size):
            raise ConfigError(
                f"model.init_args.image_size={model_args.image_size} differs from data.image_size={data_size}. Set "
                "the image size once, as data.image_size: the model takes it from there."
            )
        model_args.image_size = data_size

    def instantiate_trainer(self, **kwargs: Any):
        assert self.run_dir is not None
        checkpoint_dir = self.run_dir / "checkpoints"
        callbacks = list(self.config_init.trainer.get("callbacks") or [])
        # One rolling checkpoint, `last.ckpt`: what --run.resume continues from.
        callbacks.append(ResumeCheckpoint(checkpoint_dir / "last.ckpt", self.config.run.checkpoint_every_n_steps))
        if not any(isinstance(c, ProgressBar) for c in callbacks) and self.config.trainer.enable_progress_bar is not False:
            # A live bar on a terminal; plain lines in a log file, where a live bar shows one line per run.
            callbacks.append(PlainProgress() if wants_plain_progress() else RichProgressBar())
        return super().instantiate_trainer(callbacks=callbacks, logger=self._loggers(), **kwargs)

    def _loggers(self) -> list:
        if self.config.trainer.logger is False:  # evaluate.py: no training curves, and no empty csv/ folder
            return []
        loggers: list = [ResumableCSVLogger(save_dir=str(self.run_dir), name="csv", version="",
                                            keep_below_step=self.resume_step)]
        mode = self.config.wandb.mode
        if mode == "disabled":
            return loggers
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
        if mode == "offline":
            rank_zero_warn("W&B runs offline (no credentials); `wandb sync` the run folder later to upload.")
        name, tags, group = wandb_identity(self.run_dir.name, self.arguments)
        loggers.append(WandbLogger(
            save_dir=str(self.run_dir), project=self.config.wandb.project, group=self.config.wandb.group or group,
            tags=[*self.config.wandb.tags, *tags], name=name, offline=(mode == "offline"),
            config=self.config.as_dict() if hasattr(self.config, "as_dict") else None,
        ))
        return loggers

    def save_resolved_config(self) -> Path:
        """Write the fully resolved config next to the results (rank 0 only)."""
        assert self.run_dir is not None
        path = self.run_dir / "config.yaml"
        if self.trainer.is_global_zero:
            self.parser.save(self.config, path, skip_none=False, overwrite=True, skip_check=True)
        return path


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, ConfigFileError, DatasetError, CheckpointError, TrainingDiverged, NonFiniteResults, NotCalibrated,
    FileNotFoundError, FittedSettingsMismatch,
)
DEBUG_ENV = "ANOMALY_LAB_DEBUG"


def run_command(entry: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run `train` or `evaluate` from the command line. A user error (bad data, a bad config, diverged training, an
    unreadable checkpoint) prints one paragraph and exits with status 1, without a traceback; `--debug` or
    ANOMALY_LAB_DEBUG=1 shows the traceback. Anything else (a bug) keeps its traceback. `--list-detectors` prints
    the registered detectors, one line each, and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if "--list-detectors" in argv:
        print(registry.detector_table())
        return
    if debug:
        os.environ[DEBUG_ENV] = "1"  # DDP children re-run the command line without --debug
    try:
        entry(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"\nerror: {error}\n(for the traceback, add --debug or set {DEBUG_ENV}=1)", file=sys.stderr)
        sys.exit(1)
