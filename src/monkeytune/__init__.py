"""monkeytune: fine-tune high-resolution multimodal models the Monkey way."""

from monkeytune.config import ImageConfig, LLMConfig, ModelConfig, VisionConfig, get_config

__version__ = "0.1.0"
__all__ = ["ImageConfig", "LLMConfig", "ModelConfig", "VisionConfig", "get_config", "__version__"]
