"""Turning a folder's config and tensors into a ready model: the steps both formats share.

Each loader (:mod:`monkeytune.model.native`, :mod:`monkeytune.model.official`) checks the size,
builds on the meta device, assigns its tensors and ends with :func:`finish_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from monkeytune.config import ModelConfig
from monkeytune.model_size import check_fits_in_memory
from monkeytune.model import build_model
from monkeytune.model.qwen_compat import CompatConfig, apply_compat
from monkeytune.model.weights import ModelFolderError, materialize_buffers


def check_size(config: ModelConfig, where: str | Path) -> None:
    """Refuse, before building, a config whose weights cannot fit in this machine's memory."""
    try:
        check_fits_in_memory(config)
    except ValueError as e:
        raise ModelFolderError(f"{where}: {e}") from None


def build_on_meta(config: ModelConfig) -> nn.Module:
    """The model's structure without allocating weights (they are assigned from the folder).

    Buffers are built for real: the non-persistent ones (rotary tables, a transformers vision
    encoder's position ids) are never in a folder, and each model computes them at construction.
    """
    from accelerate import init_empty_weights  # noqa: PLC0415

    with init_empty_weights(include_buffers=False):
        return build_model(config)


def finish_model(model: nn.Module, dtype: torch.dtype | None, device: str | torch.device, metadata: dict) -> nn.Module:
    """Common tail of every loader: buffers, ties, compat layer, dtype, eval mode."""
    if model.config.llm.tie_word_embeddings:
        model.llm.tie_weights()
    materialize_buffers(model, device)
    compat = metadata.get("qwen_compat")
    if compat:
        apply_compat(model.llm, CompatConfig.from_dict(compat))
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device)
    model.metadata = metadata
    return model.eval()
