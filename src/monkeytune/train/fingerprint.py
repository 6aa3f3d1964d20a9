"""What a run was trained on, stored in every checkpoint so a resume can refuse a different run.

A checkpoint's ``fingerprint.json`` records the size and a content hash of every data file (of an
``hf:`` dataset name, its arrow files in the ``datasets`` cache), of the tokenizer folder and of a
``model.from`` folder, and the resolved model configuration. The settings that change the model
or the sample order are compared from the checkpoint's ``config.yaml`` (see
:data:`monkeytune.train.state.MUST_MATCH`). A resume whose inputs differ is refused with every
difference listed, unless the caller says the change is meant.

Hashing cost (:func:`monkeytune.data.index.file_fingerprint`): files up to ``FULL_HASH_BYTES``
are hashed whole (BLAKE2b, ~1 s per GB on one core). Larger files (multi-GB data files, model
weights) are hashed from ``SAMPLE_BLOCKS`` blocks spread evenly over the file, first and last
included, plus the exact size: reordering or editing lines moves bytes through most blocks, but
an in-place edit that keeps the size and lies entirely between sampled blocks of a file above
the limit goes unnoticed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from monkeytune.data.index import file_fingerprint, folder_fingerprint  # noqa: F401 - the one definition, used here
from monkeytune.train.config import TrainConfig

FINGERPRINT_FILE = "fingerprint.json"


def model_config_dict(cfg: TrainConfig) -> dict[str, Any] | None:
    """The configuration of a ``preset`` / ``config`` model (None for ``from``).

    A run passes its effective configuration, whose ``model.config`` is the resolved one.
    """
    from monkeytune.config import get_config

    if cfg.model.preset:
        return get_config(cfg.model.preset).to_dict()
    if cfg.model.config:
        return cfg.model.config.to_dict()
    return None


def run_fingerprint(cfg: TrainConfig, tokenizer_dir: str | None) -> dict[str, Any]:
    """What the run reads: data files, tokenizer, model source.

    Args:
        cfg: The run configuration.
        tokenizer_dir: The tokenizer folder the run uses (None: the ``model.from`` folder's own).
    """
    data = {str(p): dataset_fingerprint(p, cfg.data.load_options) for p in cfg.data.train if p.startswith("hf:")}
    # A folder of table shards or a save_to_disk folder: the files directly in it.
    data.update({str(p): file_fingerprint(p) if Path(p).is_file() else folder_fingerprint(p)
                 for p in cfg.data.train if p not in data and Path(p).exists()})
    out: dict[str, Any] = {"data": data, "model_config": model_config_dict(cfg)}
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        out["tokenizer"] = folder_fingerprint(tokenizer_dir)
    if cfg.model.from_dir and Path(cfg.model.from_dir).is_dir():
        out["model_from"] = folder_fingerprint(cfg.model.from_dir)
    return out


def dataset_fingerprint(name: str, load_options: dict) -> dict[str, Any]:
    """An ``hf:`` dataset's fingerprint: its arrow files in the ``datasets`` cache, by file name
    (the cache folder's path may differ between machines), or, for a dataset held in memory,
    its load options.

    Raises:
        DataError: ``data_file`` when the dataset does not load.
    """
    from monkeytune.data.tables import cache_files  # noqa: PLC0415 - only dataset names need it

    files = cache_files(name, load_options)
    if files:
        return {Path(f).name: file_fingerprint(f) for f in files}
    text = json.dumps(load_options, sort_keys=True, default=str).encode()
    return {"load_options": {"size": len(text), "hash": hashlib.blake2b(text, digest_size=16).hexdigest()}}


def save_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    (Path(folder) / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")


def load_fingerprint(folder: Path) -> dict[str, Any] | None:
    """A checkpoint's fingerprint; None for checkpoints written before fingerprints existed."""
    path = Path(folder) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # compared as absent: the config comparison still applies


def _describe(fp: dict[str, Any] | None) -> str:
    if fp is None:
        return "absent"
    if "size" not in fp:  # a folder: its files' fingerprints
        return f"a folder of {len(fp)} files, {sum(f['size'] for f in fp.values())} bytes"
    return f"{fp['size']} bytes, hash {fp['hash'][:12]}"


def _files_differ(label: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            out.append(f"{label} {name} changed ({_describe(a)} -> {_describe(b)})")
    return out


def fingerprint_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One readable line per input that differs between a checkpoint and the current run."""
    diffs = _files_differ("data file", saved.get("data", {}), now.get("data", {}))
    diffs += _files_differ("tokenizer file", saved.get("tokenizer", {}), now.get("tokenizer", {}))
    diffs += _files_differ("model.from file", saved.get("model_from", {}), now.get("model_from", {}))
    old_cfg, new_cfg = saved.get("model_config"), now.get("model_config")
    if old_cfg != new_cfg and old_cfg is not None and new_cfg is not None:
        flat_old, flat_new = _flatten(old_cfg), _flatten(new_cfg)
        for key in sorted(set(flat_old) | set(flat_new)):
            if flat_old.get(key) != flat_new.get(key):
                diffs.append(f"model config {key}: {flat_old.get(key)!r} -> {flat_new.get(key)!r}")
    return diffs


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
