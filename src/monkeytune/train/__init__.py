"""Training engine: ``monkeytune train`` as a library.

* :func:`~monkeytune.train.config_load.load_config` - a YAML file plus ``section.key`` overrides
  into a validated :class:`~monkeytune.train.config.TrainConfig`.
* :func:`~monkeytune.train.loop.train` - run or resume training on ``accelerate`` (single
  process, DDP, FSDP, DeepSpeed); returns a :class:`~monkeytune.train.loop.TrainResult`.
* :func:`~monkeytune.train.synthetic.write_synthetic_dataset` - a small self-contained dataset.

See docs/training.md for the loss normalisation, checkpoint format and exact resume.
"""

from monkeytune.data.records import DataError
from monkeytune.model.spec import ModelSpecError
from monkeytune.model.weights import ModelFolderError
from monkeytune.policy import PlanError
from monkeytune.train.checkpoint import CheckpointError
from monkeytune.train.config import ConfigError, TrainConfig
from monkeytune.train.config_load import load_config, parse_overrides
from monkeytune.train.engine import EngineError
from monkeytune.train.loop import TrainingError, TrainResult, train
from monkeytune.train.setup import SetupError
from monkeytune.train.synthetic import write_synthetic_dataset

# A run stopped by one of these had bad input (configuration, data, model, checkpoint, launcher
# settings): ``monkeytune train`` exits 2. A TrainingError (the run itself failed) exits 1.
INPUT_ERRORS = (ConfigError, SetupError, EngineError, PlanError, CheckpointError, ModelFolderError, ModelSpecError,
                DataError, FileNotFoundError)

__all__ = [
    "INPUT_ERRORS", "ConfigError", "TrainConfig", "TrainResult", "TrainingError", "load_config", "parse_overrides",
    "train", "write_synthetic_dataset",
]
