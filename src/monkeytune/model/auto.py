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

from typing import Any

import torch
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


# ``from_pretrained``'s placement arguments, as transformers users pass them.
def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """``torch_dtype`` / ``dtype`` as transformers users pass it: a dtype, its name, ``"auto"`` or None."""
    if dtype is None or dtype == "auto":
        return None  # as stored
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype, its name or 'auto'")
    return resolved


def resolve_device(device_map: Any) -> torch.device:
    """One device from a transformers-style ``device_map``.

    The model is small enough per device to sit on one: ``"auto"`` picks the first GPU when
    there is one; ``{"": dev}`` and plain devices are taken as given. Splitting layers across
    devices is refused rather than silently ignored.
    """
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError("device_map: only a whole-model placement is supported ({'': device}, a device or 'auto')")
        device_map = device_map[""]
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)
