"""Saving and loading model folders.

A monkeytune folder holds::

    config.json                     {"model_type": "monkey", "architectures": ["MonkeyForCausalLM"],
                                     "format": "monkeytune", "version": 1, "model": ModelConfig,
                                     "complete": true, "metadata": {...}}
    model.safetensors               all weights (or model-0000k-of-0000n.safetensors shards plus
                                    model.safetensors.index.json when large)
    qwen.tiktoken | tokenizer.json  the tokenizer, when one was given

``complete: false`` marks a folder written with ``trainable_only=True``: it holds only the
trainable tensors and loads on top of a base model (``load_model(dir, base=...)`` or the
``base_model`` path recorded at save time).

:func:`load_model` also reads official Monkey / Qwen-VL folders (see
:mod:`monkeytune.model.official`); which kind a folder is comes from its ``config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monkeytune.config import ModelConfig
from monkeytune.model.auto import ARCHITECTURE, MODEL_TYPE
from monkeytune.model.weights import (  # noqa: F401  (re-exported: the public names of this module)
    DEFAULT_SHARD_BYTES,
    WEIGHTS_NAME,
    CheckpointError,
    assign_state_dict,
    iter_tensors,
    materialize_buffers,
    name_list,
    open_safetensors,
    read_tensors,
    save_safetensors,
    unique_state_dict,
    weight_files,
    write_tensors,
)

FORMAT = "monkeytune"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- folders
def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; :class:`CheckpointError` naming the file and line otherwise."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def folder_kind(directory: str | Path) -> str:
    """``"monkeytune"`` or ``"official"`` for a model folder.

    Raises:
        CheckpointError: no ``config.json``, invalid JSON or an unknown layout.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model folder: no {CONFIG_FILE}")
    cfg = read_json_object(path)
    if cfg.get("format") == FORMAT:
        return "monkeytune"
    if cfg.get("model_type") in ("monkey", "qwen") or "visual" in cfg:
        return "official"
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (no \"format\": \"monkeytune\" and no official "
        "model_type monkey/qwen with a visual block)"
    )


def folder_config(directory: str | Path) -> ModelConfig:
    """The model configuration of a model folder, read from its ``config.json`` alone (no weights).

    For official folders the adapter ranks and the position-table size, which the official
    config does not state, take the official defaults (ranks 16 and 32, a 16x16 table).

    Raises:
        CheckpointError: no or invalid ``config.json``, or a config that does not validate.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if folder_kind(directory) == "monkeytune":
        return _model_config(read_config(directory), directory)
    from monkeytune.model.official import config_from_official

    return config_from_official(read_json_object(path), str(path))[0]


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if not hasattr(tokenizer, "save"):
        raise TypeError(f"cannot save tokenizer of type {type(tokenizer).__name__}: it has no save(dir) method")
    tokenizer.save(directory)


def load_tokenizer_if_any(directory: str | Path):
    """The folder's tokenizer, or None when it holds no tokenizer files."""
    from monkeytune.tokenizer.loading import load_tokenizer

    directory = Path(directory)
    if not any((directory / f).is_file() for f in ("qwen.tiktoken", "tokenizer.json")):
        return None
    return load_tokenizer(directory)


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
    from monkeytune.model.qwen_compat import get_compat

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
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if tokenizer is not None:
        _save_tokenizer(tokenizer, directory)
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a monkeytune folder (validated format and version)."""
    path = Path(directory) / CONFIG_FILE
    info = read_json_object(path)
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a monkeytune config (format={info.get('format')!r})")
    if int(info.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {info['version']} is newer than this monkeytune ({FORMAT_VERSION})"
        )
    if "model" not in info:
        raise CheckpointError(f"{path}: missing field 'model'")
    return info


def set_metadata(directory: str | Path, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the metadata of a saved monkeytune folder (e.g. ``prompt_template``).

    The metadata is loaded onto ``model.metadata`` and carried into every folder saved from that
    model, so a fact recorded once follows later fine-tunes.

    Returns:
        The folder's new metadata.
    """
    path = Path(directory) / CONFIG_FILE
    info = read_config(directory)
    info["metadata"] = {**(info.get("metadata") or {}), **values}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)
    return info["metadata"]


def _model_config(info: dict[str, Any], directory: Path) -> ModelConfig:
    """The validated :class:`ModelConfig` of a parsed monkeytune ``config.json``."""
    try:
        config = ModelConfig.from_dict(info["model"])
        config.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid field 'model': {e}") from None
    return config


def check_size(config: ModelConfig, where: str | Path) -> None:
    """Refuse, before building, a config whose weights cannot fit in this machine's memory."""
    from monkeytune.memory import check_fits_in_memory

    try:
        check_fits_in_memory(config)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _build_on_meta(config: ModelConfig):
    from monkeytune.model import build_model

    with torch.device("meta"):
        return build_model(config)


def finish_model(model: nn.Module, dtype: torch.dtype | None, device: str | torch.device, metadata: dict) -> nn.Module:
    """Common tail of every loader: buffers, ties, compat layer, dtype, eval mode."""
    from monkeytune.model.qwen_compat import CompatConfig, apply_compat

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


def load_monkeytune(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    base: str | Path | None = None,
):
    """Load a monkeytune folder; see :func:`load_model`."""
    directory = Path(directory)
    info = read_config(directory)
    config = _model_config(info, directory)
    check_size(config, directory / CONFIG_FILE)
    metadata = dict(info.get("metadata") or {})
    tensors = read_tensors(directory, device)
    if info.get("complete", True):
        model = _build_on_meta(config)
        tied = info.get("tied_weights") or {}
        assign_state_dict(model, tensors, where=str(directory), allow_missing=tied)
    else:
        base = base if base is not None else info.get("base_model")
        if base is None:
            raise CheckpointError(
                f"{directory} holds only trainable weights; pass the base model folder (base=...)"
            )
        model, _ = load_model(base, dtype=None, device=device)
        base_cfg = model.config.to_dict()
        if base_cfg != config.to_dict():
            diff = sorted(k for k in config.to_dict() if base_cfg.get(k) != config.to_dict()[k])
            raise CheckpointError(f"{directory}: base model {base} has a different config (fields {diff})")
        load_adapters(model, tensors, where=str(directory))
        metadata = {**getattr(model, "metadata", {}), **metadata}
    model = finish_model(model, dtype, device, metadata)
    tokenizer = load_tokenizer_if_any(directory)
    if tokenizer is None and not info.get("complete", True):
        tokenizer = load_tokenizer_if_any(base)  # a trainable-only folder may rely on its base's
    return model, tokenizer


def load_model(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    base: str | Path | None = None,
):
    """Load a model folder, monkeytune or official (detected from ``config.json``).

    Weights are assigned without first initialising a random model, so a 7B checkpoint needs
    only its own size in memory.

    Args:
        directory: The folder.
        dtype: Convert floating weights to this dtype; None keeps the stored dtypes.
        device: Where the weights go.
        base: Base model folder for a ``trainable_only`` folder (default: the path recorded
            when it was saved).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode and the folder's tokenizer (None if it
        has none).

    Raises:
        CheckpointError: unknown layout, missing/unexpected/misshaped weights (named), or an
            unsafe pickle.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model folder {directory} does not exist")
    if folder_kind(directory) == "official":
        from monkeytune.model.official import load_official

        return load_official(directory, dtype=dtype, device=device)
    return load_monkeytune(directory, dtype=dtype, device=device, base=base)


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
        CheckpointError: a name the model lacks or a shape mismatch (all offenders named).
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
        raise CheckpointError(f"{where}: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v)
    return sorted(tensors)
