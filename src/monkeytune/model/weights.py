"""Tensor files and state dicts: the weight-level layer under :mod:`monkeytune.model.io`.

Reads safetensors and ``pytorch_model*.bin`` files (single or sharded with a transformers-style
``*.index.json``), writes them with the same sharding convention, and loads state dicts into
models built on the meta device with every missing, unexpected or misshaped key named.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 * 2**30


class ModelFolderError(ValueError):
    """A model folder or weights file is malformed; the message names the file and keys.

    (A resumable training checkpoint that cannot be used is a different failure:
    :class:`monkeytune.train.checkpoint.CheckpointError`.)
    """


# ----------------------------------------------------------------------------- tensor files
# safetensors reports I/O failures as SafetensorError("... (os error 28) ..."); the errno is
# recovered so callers can tell a full disk from a bug.
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _umask() -> int:
    # Read where the kernel shows it: setting and restoring the umask would briefly give files
    # created meanwhile by other threads the wrong mode.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_error_of(e: SafetensorError, path: str | Path) -> OSError | None:
    """The ``OSError`` a safetensors I/O failure stands for (None for other failures)."""
    found = _OS_ERROR.search(str(e))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with I/O failures raised as ``OSError`` (errno kept).

    safetensors writes a private temporary file and renames it, so the file would keep mode
    0600; it gets the mode the umask gives every other file of the folder instead.
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        error = os_error_of(e, path)
        if error is None:
            raise
        raise error from None
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def open_safetensors(path: str | Path, device: str | torch.device = "cpu"):
    """``safe_open`` whose failures on a truncated or corrupt file name the file in one line.

    Raises:
        ModelFolderError: the header or the data cannot be read.
    """
    device = torch.device(device)
    # safetensors knows "cpu" but not "cpu:0", the device a CPU rank of a distributed run has.
    where = "cpu" if device.type == "cpu" else str(device)
    try:
        with safe_open(str(path), framework="pt", device=where) as f:
            yield f
    except SafetensorError as e:
        raise ModelFolderError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def name_list(names, limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def write_tensors(
    tensors: dict[str, torch.Tensor],
    directory: str | Path,
    weights_name: str = WEIGHTS_NAME,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as one file, or as shards plus an index when larger than one shard.

    ``weights_name`` ending in ``.safetensors`` writes safetensors, ``.bin`` a ``torch.save``
    state dict (the legacy format of the official checkpoints). Shards are named like
    transformers names them (``model-00001-of-00003.safetensors``) and the index is
    ``<weights_name>.index.json`` with ``metadata.total_size`` and ``weight_map``.

    Args:
        tensors: Name to tensor; tensors sharing memory must be deduplicated by the caller.
        directory: Output folder (created).
        weights_name: File name of the unsharded file; its stem prefixes the shards.
        max_shard_bytes: Largest shard size (a single larger tensor gets a shard of its own).
        metadata: String metadata stored in each safetensors header.

    Returns:
        The written weight files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem, ext = weights_name.rsplit(".", 1)
    if ext not in ("safetensors", "bin"):
        raise ValueError(f"weights_name must end in .safetensors or .bin, got {weights_name!r}")
    # clone() for .bin: torch.save of a view would store the whole underlying storage.
    prepared = {
        k: (v.detach().to("cpu").contiguous() if ext == "safetensors" else v.detach().to("cpu").clone())
        for k, v in tensors.items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in prepared.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}

    def write(shard: dict[str, torch.Tensor], path: Path) -> None:
        if ext == "safetensors":
            save_safetensors(shard, path, metadata=meta)
        else:
            with open(path, "wb") as f:  # through a Python file, so a full disk raises OSError
                torch.save(shard, f)

    # Remove weights of a previous save so the folder never mixes two layouts.
    index_path = directory / f"{weights_name}.index.json"
    for old in [*directory.glob(f"{stem}-*-of-*.{ext}"), directory / weights_name, index_path]:
        if old.exists():
            old.unlink()
    if len(shards) == 1:
        write(shards[0], directory / weights_name)
        return [directory / weights_name]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = directory / f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        write(shard, path)
        paths.append(path)
        weight_map.update({k: path.name for k in shard})
    total = sum(t.numel() * t.element_size() for t in prepared.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _pickle_reason(e: Exception) -> str:
    """The line of torch's refusal that says what the pickle wanted, without its ANSI styling."""
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()[:200]
    return (lines[0] if lines else type(e).__name__)[:200]


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` restricted to tensors and plain containers (no code from the pickle runs)."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files in the legacy (non-zip) format cannot be memory-mapped.
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFolderError(
            f"{path}: refusing to load: the pickle asks to run code or build objects other than "
            f"tensors ({_pickle_reason(e)}). Only plain state dicts are accepted; convert "
            "the file to safetensors with a trusted tool if you trust its origin."
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelFolderError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a folder: safetensors preferred, then ``pytorch_model*.bin``.

    A ``*.index.json`` (transformers' sharding index) decides the shard list when present.

    Raises:
        ModelFolderError: when the folder has no weights, or an index names a missing shard.
    """
    directory = Path(directory)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelFolderError(f"{index}: not a valid weights index ({e})") from None
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelFolderError(f"{index} names shards that are missing: {name_list(missing)}")
            return files
        if (directory / single).is_file():
            return [directory / single]
    others = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if others:
        return others
    raise ModelFolderError(
        f"no weights in {directory}: looked for model.safetensors, pytorch_model.bin and their "
        "sharded forms (*.index.json)"
    )


def iter_tensors(directory: str | Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a folder, file by file (memory-mapped where possible)."""
    seen: dict[str, Path] = {}
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            with open_safetensors(path, device) as f:
                items = ((k, f.get_tensor(k)) for k in f.keys())
                for name, t in items:
                    if name in seen:
                        raise ModelFolderError(f"tensor {name!r} is in both {seen[name]} and {path}")
                    seen[name] = path
                    yield name, t
        else:
            for name, t in _load_bin(path).items():
                if name in seen:
                    raise ModelFolderError(f"tensor {name!r} is in both {seen[name]} and {path}")
                seen[name] = path
                yield name, t.to(device)


def read_tensors(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a folder as one dict (see :func:`iter_tensors`)."""
    return dict(iter_tensors(directory, device))


# ----------------------------------------------------------------------------- state dicts
def unique_state_dict(
    module: nn.Module, trainable_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The module's state dict with tensors that share memory kept once.

    Returns:
        ``(tensors, tied)`` where ``tied`` maps each dropped name to the kept name it shares
        memory with (e.g. a tied LM head).
    """
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    owner: dict[tuple, str] = {}
    for name, t in module.state_dict().items():
        if trainable_only and name not in trainable:
            continue
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in owner:
                tied[name] = owner[key]
                continue
            owner[key] = name
        out[name] = t
    return out, tied


def assign_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, allow_missing=()) -> None:
    """Load ``tensors`` into ``model`` by assignment, checking names and shapes first.

    Raises:
        ModelFolderError: naming missing, unexpected and wrongly shaped keys (``where`` names the source).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors) - set(allow_missing))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shape = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}"
        for k in tensors
        if k in expected and tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {name_list(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches: {name_list(bad_shape)}")
    if problems:
        raise ModelFolderError(f"{where}: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=False, assign=True)


def materialize_buffers(model: nn.Module, device: str | torch.device) -> None:
    """Rebuild non-persistent buffers left on the meta device after a meta-device build.

    Only the LLM's rotary tables are non-persistent in this model; anything else still on meta
    is an error, since it would silently compute garbage.
    """
    llm = getattr(model, "llm", None)
    rotary = getattr(getattr(llm, "model", None), "rotary_emb", None)
    if rotary is not None and any(b.is_meta for b in rotary.buffers()):
        # The compat rotary holds no buffers (its tables are made on demand); a native one does.
        llm.model.rotary_emb = type(rotary)(config=llm.config).to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelFolderError(f"tensors were not loaded from the checkpoint: {name_list(left)}")
