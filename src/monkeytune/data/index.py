"""The start-up pass over the training data, kept beside the data so the next run starts at once.

Before its first step, training reads every record, renders it and checks its images exist
(:meth:`~monkeytune.data.dataset.ConversationDataset.scan_all`): bad data stops the run before
it starts, and packing gets every sample's length. At a million records that pass takes
minutes, on every rank, every run. Its result is small: each sample's place in the files, its
token count and the problems found (about 50 bytes a sample). It is saved as one ``.npz`` file,
keyed by the content of the data files and by every setting that changes the result (format,
image root, template, ``max_length``, the tokenizer, ...). A run whose key matches loads it
instead of reading the data, so its time to the first step does not grow with the record count.

Where: ``.monkeytune_cache/`` in the folder of the first data file (beside the data, as
``datasets`` keeps its arrow cache), or, when that folder cannot be written, the user cache
(``$XDG_CACHE_HOME/monkeytune/index``, default ``~/.cache/monkeytune/index``).

What the key does not cover: the image files. They are checked (``stat``) when the index is
built; a run that loads the index meets a missing image when its sample is loaded (an error, or
a counted skip). ``data.cache: false`` always reads the data afresh.

File content: files up to :data:`FULL_HASH_BYTES` are hashed whole (BLAKE2b, about 1 s per GB).
Larger ones (multi-GB data files, parquet shards full of images) are hashed from
:data:`SAMPLE_BLOCKS` blocks spread over the file plus its exact size; for the index their
modification time is added, so an in-place edit is not missed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from monkeytune.data.errors import DataError

logger = logging.getLogger(__name__)

FULL_HASH_BYTES = 256 * 2**20
SAMPLE_BLOCKS = 64
BLOCK_BYTES = 2**20
CACHE_FOLDER = ".monkeytune_cache"
# Bumped whenever what the index holds, or how it is computed, changes.
VERSION = 1


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "hash"}`` of one file (``"sampled": true`` above :data:`FULL_HASH_BYTES`)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(BLOCK_BYTES), b""):
                h.update(chunk)
            return {"size": size, "hash": h.hexdigest()}
        step = (size - BLOCK_BYTES) / (SAMPLE_BLOCKS - 1)
        for i in range(SAMPLE_BLOCKS):
            f.seek(int(i * step))
            h.update(f.read(BLOCK_BYTES))
    return {"size": size, "hash": h.hexdigest(), "sampled": True}


def folder_fingerprint(folder: str | os.PathLike) -> dict[str, Any]:
    """The fingerprints of the files directly in ``folder`` (hidden files and subfolders, such
    as this module's cache or a run's checkpoints beside its model, are not what is read)."""
    folder = Path(folder)
    return {p.name: file_fingerprint(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def data_fingerprint(path: str) -> dict[str, Any] | None:
    """A data path's fingerprint (a file's, or a folder's files'); None when it is not a path."""
    p = Path(path)
    if p.is_file():
        return file_fingerprint(p)
    if p.is_dir():
        return folder_fingerprint(p)
    return None


def _with_mtime(fp: dict[str, Any], path: Path) -> dict[str, Any]:
    # A sampled hash can miss an in-place edit between its blocks; the modification time cannot.
    if fp.get("sampled"):
        return {**fp, "mtime_ns": path.stat().st_mtime_ns}
    if "size" not in fp:  # a folder: each of its files
        return {name: _with_mtime(f, path / name) for name, f in fp.items()}
    return fp


def index_key(paths: list[str], settings: dict[str, Any]) -> str | None:
    """The key of the index for ``paths`` read with ``settings``; None when a path is not a
    file or folder (a dataset name: its own cache is the place to look)."""
    files = {}
    for path in paths:
        fp = data_fingerprint(path)
        if fp is None:
            return None
        files[os.path.abspath(path)] = _with_mtime(fp, Path(path))
    text = json.dumps({"version": VERSION, "files": files, "settings": settings}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def index_file(paths: list[str], key: str) -> Path:
    """Where the index of ``key`` lives: beside the first data path, else in the user cache."""
    first = Path(paths[0]).resolve()
    name = f"{first.name}-{key}.npz"
    beside = first.parent / CACHE_FOLDER
    if (beside / name).is_file() or _writable(beside):
        return beside / name
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "monkeytune" / "index"
    return user / name


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def load_index(path: Path) -> dict[str, Any] | None:
    """The arrays of a saved index, or None when it is absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        if int(out.pop("version")) != VERSION:
            return None
        return out
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("ignoring the unreadable data index %s (%s); reading the data afresh", path, e)
        return None


def save_index(path: Path, arrays: dict[str, Any]) -> None:
    """Write the index atomically (several ranks may write the same one at once). A cache that
    cannot be written is logged, never an error: the run goes on without it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of this process's own (not mkstemp, whose 0600 mode would hide the index from
        # the other users of a shared data folder): the umask decides, as for any file.
        tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}.npz"
        with open(tmp, "xb") as f:
            np.savez(f, version=np.int64(VERSION), **arrays)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not save the data index to %s: %s", path, e)


def errors_to_array(errors: list[DataError]) -> np.ndarray:
    """Data errors as one JSON string array (what ``np.load`` reads without pickle)."""
    return np.array(json.dumps([[e.kind, e.reason, e.file, e.line, e.index, e.field, e.sample_id] for e in errors],
                               default=str))


def errors_from_array(a: np.ndarray) -> list[DataError]:
    return [DataError(*args) for args in json.loads(str(a))]


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What of a tokenizer decides token counts: its class, size, image and pad ids, and the
    ids of a probe text covering scripts, digits, whitespace runs and markup."""
    probe = ("Hello, world! 12345 3.14159 \n\n\t  indented   text  "
             "中文的句子。日本語のテキスト。한국어 문장. Ünïcödé émoji 🙂 <tag> {\"json\": [1, 2]}")
    out = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
           "vocab_size": tokenizer.vocab_size, "probe": tokenizer.encode(probe)}
    for name in ("image_start_id", "image_end_id", "image_pad_id", "pad_id", "eos_id"):
        out[name] = getattr(tokenizer, name, None)
    for token in ("<|im_start|>", "<|im_end|>"):
        try:
            out[token] = tokenizer.special_id(token)
        except KeyError:
            out[token] = None
    return out
