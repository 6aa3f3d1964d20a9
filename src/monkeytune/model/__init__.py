"""Model assembly: :class:`MonkeyForCausalLM` and its builder."""

from transformers import AutoConfig, AutoModelForCausalLM

from monkeytune.config import ModelConfig, get_config
from monkeytune.model.auto import MODEL_TYPE, MonkeyConfig
from monkeytune.model.monkey import ImageTokenMismatch, MonkeyForCausalLM, MonkeyOutput, build_llm


def build_model(config: ModelConfig | str) -> MonkeyForCausalLM:
    """Build a randomly initialised model from a config or a preset name (``tiny``, ``monkey-7b`` ...).

    Build under ``with torch.device("meta"):`` to get the structure without allocating weights.
    """
    if isinstance(config, str):
        config = get_config(config)
    return MonkeyForCausalLM(config)


def register_auto_classes() -> None:
    """Map ``model_type: monkey`` to :class:`MonkeyConfig` and :class:`MonkeyForCausalLM` (idempotent).

    Run by ``import monkeytune``; afterwards ``AutoConfig.from_pretrained(folder)`` and
    ``AutoModelForCausalLM.from_pretrained(folder)`` read monkeytune and official Monkey folders.
    """
    AutoConfig.register(MODEL_TYPE, MonkeyConfig, exist_ok=True)
    AutoModelForCausalLM.register(MonkeyConfig, MonkeyForCausalLM, exist_ok=True)


# Whoever imports the model registers it: ``import monkeytune`` arranges that this module is
# imported as soon as transformers is (see monkeytune/__init__.py).
register_auto_classes()

__all__ = ["MonkeyConfig", "register_auto_classes", "ImageTokenMismatch", "MonkeyForCausalLM", "MonkeyOutput", "build_llm", "build_model"]
