"""The monkeytune model folder format: writing it and reading it back.

A monkeytune folder holds::

    config.json                     {"model_type": "monkey", "architectures": ["MonkeyForCausalLM"],
                                     "format": "monkeytune", "version": 1, "model": ModelConfig,
                                     "complete": true, "metadata": {...}}
    model.safetensors               all weights (or model-0000k-of-0000n.safetensors shards plus
                                    model.safetensors.index.json when large)
    qwen.tiktoken | tokenizer.json  the tokenizer, when one was given

``complete: false`` marks a folder written with ``trainable_only=True``: it holds only the
trainable tensors and loads on top of a base model, which :func:`monkeytune.model.io.load_model`
loads first (``base=...`` or the ``base_model`` path recorded at save time) and passes in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monkeytune.config import ModelConfig
from monkeytune.model.assembly import build_on_meta, check_size, finish_model
from monkeytune.model.auto import ARCHITECTURE, MODEL_TYPE
from monkeytune.model.folder import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_CONFIG_FILE,
    load_tokenizer_if_any,
    read_config,
    save_tokenizer,
)
from monkeytune.model.qwen_compat import get_compat
from monkeytune.model.weights import (
    DEFAULT_SHARD_BYTES,
    ModelFolderError,
    assign_state_dict,
    name_list,
    open_safetensors,
    read_tensors,
    save_safetensors,
    unique_state_dict,
    write_tensors,
)


def save_model(
    model: nn.Module,
    directory: str | Path,
    tokenizer: Any = None,
    trainable_only: bool = False,
    metadata: dict[str, Any] | None = None,
    base_model: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a monkeytune model folder.

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM`.
        directory: Output folder (created; earlier weights there are replaced).
        tokenizer: Saved beside the weights when given (any tokenizer with ``save(dir)``).
        trainable_only: Save only parameters with ``requires_grad`` (adapters, unfrozen
            parts); the folder then loads on top of a base model.
        metadata: Extra JSON-able facts stored in ``config.json`` (merged over the model's own
            ``model.metadata``, e.g. ``{"chat_format": "chatml"}``).
        base_model: Recorded with ``trainable_only`` so loading can find the base by itself.
        max_shard_bytes: Shard size limit for the safetensors files.
        dtype: Write floating-point tensors in this dtype (e.g. a bf16 run's trained fp32
            tensors beside its bf16 frozen ones: a folder holds one dtype). None: as they are.

    Returns:
        The folder path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, tied = unique_state_dict(model, trainable_only=trainable_only)
    if trainable_only and not tensors:
        raise ValueError("trainable_only=True but the model has no trainable parameters")
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    meta = dict(getattr(model, "metadata", {}) or {})
    meta.update(metadata or {})
    compat = get_compat(model)
    if compat is not None:
        meta["qwen_compat"] = compat.to_dict()
    info: dict[str, Any] = {
        # transformers' keys first: AutoConfig reads model_type, tools read architectures.
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "complete": not trainable_only,
        "tied_weights": tied,
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "metadata": meta,
    }
    if trainable_only and base_model is not None:
        info["base_model"] = str(base_model)
    write_tensors(tensors, directory, max_shard_bytes=max_shard_bytes)
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    return directory


def model_config_of(info: dict[str, Any], directory: Path) -> ModelConfig:
    """The validated :class:`ModelConfig` of a parsed monkeytune ``config.json``."""
    try:
        config = ModelConfig.from_dict(info["model"])
        config.validate()
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{directory / MODEL_CONFIG_FILE}: invalid field 'model': {e}") from None
    return config


def native_config(directory: str | Path) -> ModelConfig:
    """The validated model configuration of a monkeytune folder, from its ``config.json`` alone."""
    directory = Path(directory)
    return model_config_of(read_config(directory), directory)


def needs_base(directory: str | Path) -> bool:
    """Whether a monkeytune folder holds only trainable weights (it loads on top of a base)."""
    return not read_config(directory).get("complete", True)


def load_native(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    base: tuple[nn.Module, Any] | None = None,
    base_name: str | Path | None = None,
):
    """Load a monkeytune folder; see :func:`monkeytune.model.io.load_model`.

    Args:
        directory: The folder.
        dtype: Convert floating weights to this dtype; None keeps the stored dtypes.
        device: Where the weights go.
        base: ``(model, tokenizer)`` of the base a ``trainable_only`` folder loads on top of
            (loaded by the caller, in fp32-as-stored, on ``device``).
        base_name: The base folder, for error messages.

    Raises:
        ModelFolderError: a bad config, missing/unexpected/misshaped weights, or a base that
            is missing or has a different config.
    """
    directory = Path(directory)
    info = read_config(directory)
    config = model_config_of(info, directory)
    if info.get("no_weights"):
        raise ModelFolderError(f"{directory} holds no weights: it was composed from config-only folders, for "
                               "planning with monkeytune inspect; compose it from folders with weights to load it")
    check_size(config, directory / MODEL_CONFIG_FILE)
    metadata = dict(info.get("metadata") or {})
    tensors = read_tensors(directory, device)
    tokenizer = load_tokenizer_if_any(directory)
    if info.get("complete", True):
        model = build_on_meta(config)
        tied = info.get("tied_weights") or {}
        assign_state_dict(model, tensors, where=str(directory), allow_missing=tied)
    else:
        if base is None:
            raise ModelFolderError(
                f"{directory} holds only trainable weights; pass the base model folder (base=...)"
            )
        model, base_tokenizer = base
        base_cfg = model.config.to_dict()
        if base_cfg != config.to_dict():
            diff = sorted(k for k in config.to_dict() if base_cfg.get(k) != config.to_dict()[k])
            raise ModelFolderError(f"{directory}: base model {base_name} has a different config (fields {diff})")
        load_adapters(model, tensors, where=str(directory))
        metadata = {**getattr(model, "metadata", {}), **metadata}
        if tokenizer is None:
            tokenizer = base_tokenizer  # a trainable-only folder may rely on its base's
    return finish_model(model, dtype, device, metadata), tokenizer


# ----------------------------------------------------------------------------- adapters
def save_adapters(model: nn.Module, path: str | Path, names: list[str] | None = None) -> Path:
    """Save trainable parameters (or the named ones) to one safetensors file.

    Args:
        model: Any module.
        path: Output ``.safetensors`` file.
        names: Parameter names to save; default: every parameter with ``requires_grad``.
    """
    path = Path(path)
    params = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in params.items() if p.requires_grad]
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"not parameters of the model: {name_list(unknown)}")
    if not names:
        raise ValueError("no parameters to save: none requires grad and no names were given")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({n: params[n].detach().to("cpu").contiguous() for n in names}, path, metadata={"format": "pt"})
    return path


def load_adapters(
    model: nn.Module, source: str | Path | dict[str, torch.Tensor], where: str | None = None
) -> list[str]:
    """Copy saved tensors into the matching parameters/buffers of ``model`` (in place, any dtype).

    Args:
        model: The model to update.
        source: A ``.safetensors`` file, a folder holding weights, or a name -> tensor dict.
        where: Name of the source in error messages.

    Returns:
        The names loaded.

    Raises:
        ModelFolderError: a name the model lacks or a shape mismatch (all offenders named).
    """
    if isinstance(source, (str, os.PathLike)):
        where = where or str(source)
        p = Path(source)
        if p.is_dir():
            tensors = read_tensors(p)
        else:
            with open_safetensors(p) as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        tensors, where = source, where or "adapter tensors"
    state = model.state_dict()
    unknown = [k for k in tensors if k not in state]
    bad = [
        f"{k} {tuple(v.shape)} != {tuple(state[k].shape)}"
        for k, v in tensors.items()
        if k in state and v.shape != state[k].shape
    ]
    if unknown or bad:
        parts = ([f"keys the model lacks: {name_list(unknown)}"] if unknown else []) + (
            [f"shape mismatches: {name_list(bad)}"] if bad else []
        )
        raise ModelFolderError(f"{where}: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v)
    return sorted(tensors)
