"""monkeytune: fine-tune high-resolution multimodal models the Monkey way.

Importing the package registers ``model_type: monkey`` with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` (see :mod:`monkeytune.model.auto`) and exports the main API::

    from monkeytune import MonkeyForCausalLM, MonkeyProcessor
    model = MonkeyForCausalLM.from_pretrained(folder, dtype="float32")
    processor = MonkeyProcessor.from_pretrained(folder)
    out = model.generate(**processor(text=["<image> What is it? Answer: "], images=[img]), max_new_tokens=8)
    processor.batch_decode(out, skip_special_tokens=True)
"""

from monkeytune.config import ImageConfig, LLMConfig, ModelConfig, VisionConfig, get_config
from monkeytune.eval.metrics import METRICS, compute_metrics
from monkeytune.generate import GenerationSettings, answer, load_for_inference, score_answer
from monkeytune.model import MonkeyConfig, MonkeyForCausalLM, build_model, register_auto_classes
from monkeytune.model.io import load_model, save_model
from monkeytune.processing import MonkeyProcessor
from monkeytune.tokenizer.loading import load_tokenizer
from monkeytune.train import TrainConfig, load_config, train

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "GenerationSettings", "ImageConfig", "LLMConfig", "METRICS", "ModelConfig", "MonkeyConfig",
    "MonkeyForCausalLM", "MonkeyProcessor", "TrainConfig", "VisionConfig", "__version__", "answer",
    "build_model", "get_config", "load_config", "load_for_inference", "load_model", "load_tokenizer",
    "register_auto_classes", "save_model", "compute_metrics", "score_answer", "train",
]
