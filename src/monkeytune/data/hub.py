"""``datasets`` names as training data: ``hf:NAME`` read through ``datasets.load_dataset``.

A ``data.train`` entry ``hf:NAME`` (``hf:HuggingFaceM4/the_cauldron``, or a packaged builder such
as ``hf:parquet`` with ``data_files``) is loaded by ``datasets.load_dataset(NAME,
**data.load_options)``: ``name`` (the subset), ``split`` (default ``train``), ``data_files``,
``revision``, ``cache_dir`` and the rest. The result is a ``Dataset`` memory-mapped from the
``datasets`` cache, read like a ``save_to_disk`` folder (:mod:`monkeytune.data.tables`). Online,
``load_dataset`` downloads and caches it as usual; offline (``HF_DATASETS_OFFLINE=1``) it reads
the copy already in its cache, and a dataset that is not there is a one-line error naming it.

Embedded images refer to the dataset by a key: the entry, plus ``@`` and a digest of the options
when there are any (``hf:parquet@3f2a9c0e1b7d``). The options stay registered under it in the
process; a DataLoader worker registers them again when it reads its first record (a worker gets
the dataset's sample list, which knows the options), before any of that record's images.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from monkeytune.data.errors import DATA_FILE, DataError

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
# The options each key was opened with in this process.
_OPTIONS: dict[str, tuple[str, dict]] = {}


def is_dataset_name(path: Any) -> bool:
    """Whether a data path is a ``datasets`` name (``hf:NAME``)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(PREFIX)


def dataset_key(entry: str, load_options: dict | None = None) -> str:
    """The key of ``entry`` loaded with ``load_options``, registered for this process."""
    options = dict(load_options or {})
    key = entry
    if options:
        text = json.dumps(options, sort_keys=True, default=str)
        key = f"{entry}@{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"
    _OPTIONS.setdefault(key, (entry, options))
    return key


def label(key: str) -> str:
    """The data path a key stands for, as errors name it (a dataset key without its digest)."""
    return key.split("@", 1)[0] if is_dataset_name(key) else key


def load(key: str):
    """The ``datasets.Dataset`` a registered key names.

    Raises:
        DataError: ``data_file`` naming the dataset: not in the cache (offline), bad options,
            several splits, or a streaming dataset.
    """
    entry = label(key)
    if key not in _OPTIONS:
        if key != entry:
            raise DataError(DATA_FILE, "its load options are unknown in this process; open it by name first", entry)
        dataset_key(entry)
    options = {"split": DEFAULT_SPLIT, **_OPTIONS[key][1]}
    if options.get("streaming"):
        raise DataError(DATA_FILE, "streaming datasets are not supported yet; remove load_options.streaming", entry)
    import datasets  # noqa: PLC0415 - heavy, and only tabular data needs it

    try:
        loaded = datasets.load_dataset(entry[len(PREFIX):], **options)
    except Exception as e:  # noqa: BLE001 - datasets, fsspec and the hub raise many types
        hint = "" if isinstance(e, TypeError) else _offline_hint()  # a TypeError is an unknown option
        raise DataError(DATA_FILE, f"cannot load the dataset: {_one_line(e)}{hint}", entry) from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(DATA_FILE, f"it holds several splits ({', '.join(loaded)}); choose one with "
                        "load_options.split", entry)
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(DATA_FILE, f"load_dataset gave a {type(loaded).__name__}; load_options.split must "
                        "name one split", entry)
    return loaded


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300] + '...' if len(text) > 300 else text}"


def _offline_hint() -> str:
    import datasets  # noqa: PLC0415

    if datasets.config.HF_HUB_OFFLINE:  # HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, as datasets read them
        return " (offline: only a dataset already in the datasets cache loads; check load_options.cache_dir)"
    return ""
