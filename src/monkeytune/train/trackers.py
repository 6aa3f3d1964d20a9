"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, ...) through accelerate's tracking API.

``log.trackers`` lists accelerate tracker names. The run's ``Accelerator`` is built with
``log_with`` and a logging folder inside the run (``<output_dir>/trackers``); the main process
starts them with ``init_trackers`` (the run configuration, flattened to ``section.key``, is
stored as their hyper-parameters) and every metrics row goes to them through
``Accelerator.log``. A tracker whose package is missing stops the run at start: accelerate
itself would only skip it with a debug message.

Offline use is each tool's own: ``WANDB_MODE=offline`` (runs are kept under the run folder's
``wandb/``), ``MLFLOW_TRACKING_URI`` pointing at a local store (``file:/path/mlruns``), and
TensorBoard always writes local event files.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from monkeytune.train.config import ConfigError, LogSection, TrainConfig

logger = logging.getLogger(__name__)

# accelerate's tracker names -> (modules any of which provides it, the pip package to install).
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}
TRACKER_DIR = "trackers"


def migrate_deprecated(cfg: TrainConfig, origin: str = "config") -> None:
    """Translate ``log.tensorboard`` (replaced by ``log.trackers``), warning what to write instead."""
    old = cfg.log.tensorboard
    if old is None:
        return
    value = str(old).strip().lower()
    if value not in ("auto", "true", "false"):
        raise ConfigError(f"{origin}: log.tensorboard is replaced by log.trackers: write log.trackers: "
                          f"[tensorboard] (log.tensorboard must be auto, true or false, got {old!r})")
    add = value == "true" or (value == "auto" and importlib.util.find_spec("tensorboard") is not None)
    if add and "tensorboard" not in cfg.log.trackers:
        cfg.log.trackers.append("tensorboard")
    cfg.log.tensorboard = None
    logger.warning(
        "log.tensorboard: %s is deprecated: write log.trackers: [%s] instead", old, "tensorboard" if add else "")


def check_tracker_settings(log: LogSection, origin: str = "config") -> None:
    """Known tracker names, each once, options only for listed trackers; :class:`ConfigError` otherwise."""
    if log.tensorboard is not None:
        raise ConfigError(f"{origin}: log.tensorboard is replaced by log.trackers: write log.trackers: [tensorboard]")
    for name in log.trackers:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{origin}: log.trackers: unknown tracker {name!r}{hint}; known: {', '.join(TRACKERS)}")
    if len(set(log.trackers)) != len(log.trackers):
        raise ConfigError(f"{origin}: log.trackers lists a tracker twice: {log.trackers}")
    for name, options in log.tracker_options.items():
        if name not in log.trackers or not isinstance(options, dict):
            raise ConfigError(f"{origin}: log.tracker_options.{name} must be a mapping for a tracker in log.trackers")


def check_installed(log: LogSection) -> None:
    """Refuse unknown trackers and trackers whose package is not importable (before anything is built).

    Raises:
        ConfigError: one line naming the tracker and the package to install.
    """
    check_tracker_settings(log)
    for name in log.trackers:
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f"log.trackers: {name} is not installed: pip install {package}, "
                              f"or remove {name} from log.trackers")


def accelerator_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for the run's trackers (none when ``log.trackers`` is empty)."""
    if not cfg.log.trackers:
        return {}
    from accelerate.utils import ProjectConfiguration

    run_dir = Path(cfg.checkpoint.output_dir).resolve()
    return {"log_with": list(cfg.log.trackers),
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TRACKER_DIR))}


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The run configuration as ``{"section.key": scalar}``.

    Trackers store hyper-parameters as scalars (TensorBoard's ``add_hparams`` refuses anything
    else), so lists and mappings become their YAML-like text and ``None`` becomes ``"null"``.
    """
    out: dict[str, Any] = {}
    for section, body in cfg.to_dict().items():
        for key, value in body.items():
            if value is None:
                value = "null"
            elif not isinstance(value, (bool, int, float, str)):
                value = str(value)
            out[f"{section}.{key}"] = value
    return out


def start_trackers(accelerator, cfg: TrainConfig, resume_step: int | None) -> None:
    """Start the configured trackers on the main process (``Accelerator.init_trackers``).

    Args:
        accelerator: The run's accelerator, built with :func:`accelerator_kwargs`.
        cfg: The run configuration (stored as the trackers' hyper-parameters).
        resume_step: The checkpoint step a resumed run continues from; TensorBoard then hides
            the events an interrupted run wrote after it (they are logged again).
    """
    if not cfg.log.trackers:
        return
    run_dir = Path(cfg.checkpoint.output_dir).resolve()
    init: dict[str, dict[str, Any]] = {
        # TensorBoard hides events at steps >= purge_step; the checkpoint's own step is kept
        # (as in metrics.jsonl) and is not logged again.
        "tensorboard": {} if resume_step is None else {"purge_step": resume_step + 1},
        # W&B keeps its files (offline runs included) in the run folder, not the working directory.
        "wandb": {"dir": str(run_dir), "name": run_dir.name},
        "mlflow": {"run_name": run_dir.name},
    }
    for name, options in cfg.log.tracker_options.items():
        init.setdefault(name, {}).update(options)
    accelerator.init_trackers(cfg.log.project, config=flat_config(cfg),
                              init_kwargs={k: v for k, v in init.items() if k in cfg.log.trackers})
    if accelerator.is_main_process:
        logger.info("experiment trackers: %s (local files under %s)", ", ".join(cfg.log.trackers),
                    run_dir / TRACKER_DIR)


def log_to_trackers(accelerator, row: dict[str, Any]) -> None:
    """Send a metrics row's finite numbers to the trackers as ``train/<name>`` at its step."""
    import math

    values = {f"train/{k}": v for k, v in row.items()
              if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)}
    accelerator.log(values, step=row["step"])


def finish_trackers(accelerator) -> None:
    """Close every tracker (flush files, end the W&B / MLflow run).

    ``Accelerator.end_training`` would do this too, but it also destroys the process group,
    which a process running several trainings (tests, notebooks) still needs.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
