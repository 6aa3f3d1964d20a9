"""Model folders: one entry point for reading any of them, and the public names of model I/O.

The layers below, each importing only from those under it::

    weights.py  folder.py  assembly.py    tensors; config file, metadata, tokenizer files; build
    native.py   official.py               the monkeytune format; the official Monkey / Qwen-VL format
    io.py                                 load_model, folder_config: dispatch on the folder's kind

Which format a folder is comes from its ``config.json`` (:func:`folder_kind`). A monkeytune
folder saved with ``trainable_only=True`` loads on top of its base, which this module loads
first (the base may itself be either format).
"""

from __future__ import annotations

from pathlib import Path

import torch

from monkeytune.config import ModelConfig
from monkeytune.model.folder import (  # noqa: F401  (re-exported: the public names of model I/O)
    FORMAT,
    FORMAT_VERSION,
    MODEL_CONFIG_FILE,
    TOKENIZER_FILES,
    folder_kind,
    has_tokenizer,
    load_tokenizer_if_any,
    read_config,
    read_json_object,
    set_metadata,
)
from monkeytune.model.native import (  # noqa: F401
    load_adapters,
    load_native,
    native_config,
    needs_base,
    save_adapters,
    save_model,
)
from monkeytune.model.official import load_official, official_config
from monkeytune.model.weights import (  # noqa: F401
    DEFAULT_SHARD_BYTES,
    WEIGHTS_NAME,
    ModelFolderError,
    iter_tensors,
    read_tensors,
    weight_files,
    write_tensors,
)


def folder_config(directory: str | Path) -> ModelConfig:
    """The model configuration of a model folder, read from its ``config.json`` alone (no weights).

    Raises:
        ModelFolderError: no or invalid ``config.json``, or a config that does not validate.
    """
    if folder_kind(directory) == "monkeytune":
        return native_config(directory)
    return official_config(directory)


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
        ModelFolderError: unknown layout, missing/unexpected/misshaped weights (named), or an
            unsafe pickle.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFolderError(f"model folder {directory} does not exist")
    if folder_kind(directory) == "official":
        return load_official(directory, dtype=dtype, device=device)
    base_model = None
    if needs_base(directory):
        base = base if base is not None else read_config(directory).get("base_model")
        if base is not None:
            base_model = load_model(base, dtype=None, device=device)
    return load_native(directory, dtype=dtype, device=device, base=base_model, base_name=base)
