"""Training engine: ``monkeytune train`` as a library.

* :func:`~monkeytune.train.config_load.load_config` - a YAML file plus ``section.key`` overrides
  into a validated :class:`~monkeytune.train.config.TrainConfig`.
* :func:`~monkeytune.train.loop.train` - run or resume training on ``accelerate`` (single
  process, DDP, FSDP, DeepSpeed); returns a :class:`~monkeytune.train.loop.TrainResult`.
* :func:`~monkeytune.train.synthetic.write_synthetic_dataset` - a small self-contained dataset.

See docs/training.md for the loss normalisation, checkpoint format and exact resume.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# Public name -> its module, imported when first used (the trainer imports torch, transformers
# and accelerate; the command line and ``import monkeytune`` need none of them).
_EXPORTS = {
    "ConfigError": "monkeytune.train.config", "TrainConfig": "monkeytune.train.config",
    "load_config": "monkeytune.train.config_load", "parse_overrides": "monkeytune.train.config_load",
    "TrainingError": "monkeytune.train.loop", "TrainResult": "monkeytune.train.loop",
    "write_synthetic_dataset": "monkeytune.train.synthetic",
}


def train(*args: Any, **kwargs: Any):
    """Run or resume training: :func:`monkeytune.train.loop.train` (the trainer loads when called)."""
    from monkeytune.train.loop import train as run  # noqa: PLC0415

    return run(*args, **kwargs)


class _CallablePackage(types.ModuleType):
    """This subpackage, callable as :func:`train`: ``monkeytune.train(config)`` runs training and
    ``monkeytune.train.loop`` is still the module, so one name has one meaning."""

    def __call__(self, *args: Any, **kwargs: Any):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage


def __getattr__(name: str) -> Any:
    if name == "INPUT_ERRORS":
        return input_errors()
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monkeytune.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def input_errors() -> tuple[type[BaseException], ...]:
    """The errors of a run stopped by bad input (configuration, data, model, checkpoint, launcher
    settings): ``monkeytune train`` exits 2. A TrainingError (the run itself failed) exits 1."""
    from monkeytune.data.errors import DataError  # noqa: PLC0415
    from monkeytune.model.spec import ModelSpecError  # noqa: PLC0415
    from monkeytune.model.weights import ModelFolderError  # noqa: PLC0415
    from monkeytune.policy import PlanError  # noqa: PLC0415
    from monkeytune.train.checkpoint import CheckpointError  # noqa: PLC0415
    from monkeytune.train.config import ConfigError  # noqa: PLC0415
    from monkeytune.train.engine import EngineError  # noqa: PLC0415
    from monkeytune.train.setup import SetupError  # noqa: PLC0415

    return (ConfigError, SetupError, EngineError, PlanError, CheckpointError, ModelFolderError, ModelSpecError,
            DataError, FileNotFoundError)


__all__ = [
    "INPUT_ERRORS", "ConfigError", "TrainConfig", "TrainResult", "TrainingError", "load_config", "parse_overrides",
    "train", "write_synthetic_dataset",
]
