"""monkeytune: fine-tune high-resolution multimodal models the Monkey way.

Importing the package registers ``model_type: monkey`` with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` (see :mod:`monkeytune.model.auto`) and exports the main API::

    from monkeytune import MonkeyForCausalLM, MonkeyProcessor
    model = MonkeyForCausalLM.from_pretrained(folder, dtype="float32")
    processor = MonkeyProcessor.from_pretrained(folder)
    out = model.generate(**processor(text=["<image> What is it? Answer: "], images=[img]), max_new_tokens=8)
    processor.batch_decode(out, skip_special_tokens=True)

Nothing heavy is imported by ``import monkeytune`` itself, so the command line answers at once
(``monkeytune --help`` loads neither torch nor transformers): the names below are imported when
first used, and the Auto classes are registered as soon as transformers is imported, whoever
imports it (at once when it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "ImageConfig": "monkeytune.config", "LLMConfig": "monkeytune.config", "ModelConfig": "monkeytune.config",
    "VisionConfig": "monkeytune.config", "get_config": "monkeytune.config",
    "METRICS": "monkeytune.eval.metrics", "compute_metrics": "monkeytune.eval.metrics",
    "GenerationSettings": "monkeytune.generate", "answer": "monkeytune.generate",
    "load_for_inference": "monkeytune.generate", "score_answer": "monkeytune.generate",
    "MonkeyConfig": "monkeytune.model", "MonkeyForCausalLM": "monkeytune.model", "build_model": "monkeytune.model",
    "register_auto_classes": "monkeytune.model",
    "load_model": "monkeytune.model.io", "save_model": "monkeytune.model.io",
    "MonkeyProcessor": "monkeytune.processing",
    "load_tokenizer": "monkeytune.tokenizer.loading",
    "TrainConfig": "monkeytune.train", "load_config": "monkeytune.train",
}

# ``monkeytune.train`` is one object: the training subpackage, which is callable as the training
# function (``monkeytune.train(config)``; see monkeytune/train/__init__.py). It is light: the
# trainer loads when called.
import monkeytune.train as train  # noqa: E402

__all__ = sorted(_EXPORTS) + ["__version__", "train"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monkeytune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_auto_classes() -> None:
    # monkeytune.model registers itself when it is imported; when it is being imported already
    # (it imports transformers first), it registers as it finishes.
    if "monkeytune.model" not in sys.modules:
        importlib.import_module("monkeytune.model")


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is first imported, it lets the other finders
    locate it and registers monkeytune's Auto classes right after the module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_auto_classes()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(f, _RegisterWhenTransformersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
