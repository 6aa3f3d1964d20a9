"""Model assembly: :class:`MonkeyForCausalLM` and its builder."""

from monkeytune.config import ModelConfig, get_config
from monkeytune.model.monkey import ImageTokenMismatch, MonkeyForCausalLM, MonkeyOutput, build_llm


def build_model(config: ModelConfig | str) -> MonkeyForCausalLM:
    """Build a randomly initialised model from a config or a preset name (``tiny``, ``monkey-7b`` ...).

    Build under ``with torch.device("meta"):`` to get the structure without allocating weights.
    """
    if isinstance(config, str):
        config = get_config(config)
    return MonkeyForCausalLM(config)


__all__ = ["ImageTokenMismatch", "MonkeyForCausalLM", "MonkeyOutput", "build_llm", "build_model"]
