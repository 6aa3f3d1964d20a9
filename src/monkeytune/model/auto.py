"""transformers Auto-class registration: ``AutoConfig`` / ``AutoModelForCausalLM`` read model folders.

A model folder's ``config.json`` states ``"model_type": "monkey"`` and
``"architectures": ["MonkeyForCausalLM"]`` (monkeytune folders since this version; official
Monkey folders always did). :func:`monkeytune.model.register_auto_classes`, run by ``import monkeytune``, maps that
model type to :class:`MonkeyConfig` and :class:`~monkeytune.model.MonkeyForCausalLM`, so::

    import monkeytune
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(folder)   # no trust_remote_code, no network

works for monkeytune folders and official Monkey folders alike (the official Python files are
never run). Qwen-VL folders (``model_type: qwen``) are not registered: that type also names
text-only Qwen checkpoints; load them with ``MonkeyForCausalLM.from_pretrained``.

:class:`MonkeyConfig` is the file as transformers sees it (every key kept as an attribute); the
typed model description stays :class:`~monkeytune.config.ModelConfig`, which
:meth:`MonkeyConfig.model_config` gives.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

MODEL_TYPE = "monkey"
ARCHITECTURE = "MonkeyForCausalLM"


class MonkeyConfig(PreTrainedConfig):
    """A model folder's ``config.json`` for transformers' Auto classes.

    It carries the file's fields unchanged (``format``/``model``/``metadata`` for monkeytune
    folders, the official fields and ``visual`` block for official ones). Loading the weights
    reads the folder again through :func:`monkeytune.model.io.load_model`, which validates it.
    """

    model_type = MODEL_TYPE
