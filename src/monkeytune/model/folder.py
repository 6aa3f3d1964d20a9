"""Model folder basics: the config file, its metadata, the tokenizer files.

The bottom layer of model I/O (only :mod:`monkeytune.model.weights` sits beside it)::

    folder.py, weights.py, assembly.py   config file, metadata, tokenizer files; tensors; build
            |
    native.py      official.py           the monkeytune format; the official Monkey / Qwen-VL format
            |
    io.py                                load_model / folder_config: one dispatcher on top

Nothing here knows either format's ``model`` block; :func:`folder_kind` only tells them apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monkeytune.model.weights import ModelFolderError
from monkeytune.tokenizer.loading import load_tokenizer
from monkeytune.tokenizer.qwen import VOCAB_FILE as QWEN_VOCAB_FILE
from monkeytune.tokenizer.simple import TOKENIZER_FILE

# The model folder's config (a run folder's ``config.yaml`` is RUN_CONFIG_FILE in monkeytune.train.state).
MODEL_CONFIG_FILE = "config.json"
FORMAT = "monkeytune"
FORMAT_VERSION = 1
# A folder holds a tokenizer when it has one of these (see monkeytune.tokenizer.loading).
TOKENIZER_FILES = (QWEN_VOCAB_FILE, TOKENIZER_FILE)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; :class:`ModelFolderError` naming the file and line otherwise."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


def folder_kind(directory: str | Path) -> str:
    """``"monkeytune"`` or ``"official"`` for a model folder.

    Raises:
        ModelFolderError: no ``config.json``, invalid JSON or an unknown layout.
    """
    directory = Path(directory)
    path = directory / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{directory} is not a model folder: no {MODEL_CONFIG_FILE}")
    cfg = read_json_object(path)
    if cfg.get("format") == FORMAT:
        return "monkeytune"
    if cfg.get("model_type") in ("monkey", "qwen") or "visual" in cfg:
        return "official"
    raise ModelFolderError(
        f"{path}: unknown checkpoint layout (no \"format\": \"monkeytune\" and no official "
        "model_type monkey/qwen with a visual block)"
    )


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a monkeytune folder (validated format and version)."""
    path = Path(directory) / MODEL_CONFIG_FILE
    info = read_json_object(path)
    if info.get("format") != FORMAT:
        raise ModelFolderError(f"{path}: not a monkeytune config (format={info.get('format')!r})")
    if int(info.get("version", 0)) > FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: format version {info['version']} is newer than this monkeytune ({FORMAT_VERSION})"
        )
    if "model" not in info:
        raise ModelFolderError(f"{path}: missing field 'model'")
    return info


def write_config(directory: str | Path, info: dict[str, Any]) -> None:
    """Replace a folder's ``config.json`` atomically (a crash leaves the old or the new file)."""
    path = Path(directory) / MODEL_CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)


def set_metadata(directory: str | Path, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the metadata of a saved monkeytune folder (e.g. ``prompt_template``).

    The metadata is loaded onto ``model.metadata`` and carried into every folder saved from that
    model, so a fact recorded once follows later fine-tunes.

    Returns:
        The folder's new metadata.
    """
    info = read_config(directory)
    info["metadata"] = {**(info.get("metadata") or {}), **values}
    write_config(directory, info)
    return info["metadata"]


def has_tokenizer(directory: str | Path) -> bool:
    """Whether the folder holds tokenizer files."""
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer_if_any(directory: str | Path):
    """The folder's tokenizer, or None when it holds no tokenizer files."""
    return load_tokenizer(directory) if has_tokenizer(directory) else None


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Write ``tokenizer`` into the folder (any tokenizer with ``save(dir)``)."""
    if not hasattr(tokenizer, "save"):
        raise TypeError(f"cannot save tokenizer of type {type(tokenizer).__name__}: it has no save(dir) method")
    tokenizer.save(directory)
