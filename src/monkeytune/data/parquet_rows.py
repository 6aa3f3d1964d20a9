"""Parquet rows read in file order, one bounded record batch at a time, straight from the files.

The start-up pass over a parquet path (:func:`monkeytune.data.tables.iter_table_records`, and
the scan's check that each embedded image has bytes) reads every row once, in order. Reading
them through the memory-mapped arrow copy that ``datasets.Dataset.from_parquet`` makes
(:mod:`monkeytune.data.tables`) cost a rank memory that grew with the table, about 600 MB at a
million rows of the bench's small records:

* ``from_parquet`` decodes the file through pyarrow's dataset scanner, which reads row groups
  ahead of a slow consumer without bound (apache/arrow#39808): the whole decoded table at once,
  in a memory pool (mimalloc) that keeps its pages after they are freed;
* the arrow copy is written in batches of 100 rows when it holds images, and opening it reads
  every batch's header through the memory map: with the kernel mapping the pages around each
  fault, the whole file became resident in the process (and every later pass over the rows
  touched it again).

Here the files are read with :meth:`pyarrow.parquet.ParquetFile.iter_batches`, which decodes
only the batch asked for, of at most :data:`BATCH_BYTES` (and the caller's row count), so the
pass holds one batch whatever the table's size, and nothing is converted or mapped. A *cursor*
per table remembers the batch read last, so the rows and images the pass asks for one by one
(:func:`row_in_order`) come from it too. A row behind the cursor, or far ahead of it (a
DataLoader worker's random access), is not served here: the caller reads it from the arrow copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

from monkeytune.data import hub
from monkeytune.data.errors import DATA_FILE, DataError

SAVED_MARK = "state.json"  # written by save_to_disk beside dataset_info.json and the arrow shards
BATCH_BYTES = 16 * 2**20  # decoded bytes of one batch (rows of large images: fewer rows)
READ_BUFFER = 2**22
COPY_FOLDER = "monkeytune_parquet"  # in the datasets cache: the arrow copies of parquet tables
# Rows of one batch of the arrow copy at most: parquet's sizes are those of its encoding (a column
# of few distinct images, dictionary-encoded, looks tiny), so the bytes alone do not bound a batch.
COPY_ROWS = 10_000

# The cursor of each table key in this process (a forked worker ignores its parent's).
_CURSORS: dict[str, "_Cursor"] = {}


def parquet_files(key: str) -> list[str] | None:
    """The parquet files of a table key, in row order: a ``.parquet`` file, or the shards of a
    folder holding only parquet shards; None for anything else (arrow, ``save_to_disk``,
    ``hf:`` names, a folder that mixes kinds: read through ``datasets``, which names the fault)."""
    if hub.is_dataset_name(key):
        return None
    p = Path(key)
    if p.is_file():
        return [key] if p.suffix == ".parquet" else None
    if not p.is_dir() or (p / SAVED_MARK).is_file():
        return None
    shards = sorted((q for q in p.iterdir() if q.is_file()), key=str)
    if any(q.suffix == ".arrow" for q in shards):
        return None
    return [str(q) for q in shards if q.suffix == ".parquet"] or None


def _fail(path: str, e: Exception) -> DataError:
    return DataError(DATA_FILE, f"cannot read it as a table: {type(e).__name__}: {e}", path)


def _open(path: str):
    import pyarrow.parquet as pq  # noqa: PLC0415 - only tables need it

    try:
        # Buffered reads: a column chunk of large images is not read whole to decode one batch.
        return pq.ParquetFile(path, buffer_size=READ_BUFFER)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise _fail(path, e) from None


def column_names(files: list[str]) -> list[str]:
    """The columns of a parquet table, as the first shard's schema names them.

    Raises:
        DataError: ``data_file`` when the first shard cannot be read as parquet.
    """
    return list(_open(files[0]).schema_arrow.names)


class _Cursor:
    """The batches of a table's parquet files in order, the current one and the row it starts at."""

    def __init__(self, key: str, files: list[str], batch_rows: int, driven: bool):
        self.key, self.files, self.batch_rows = key, files, batch_rows
        self.driven = driven  # moved on by a pass over batches(), not by row_in_order
        self.pid = os.getpid()
        self.batch: Any = None
        self.first = 0  # the table row of the current batch's first row
        self._names: list[str] | None = None
        self._batches = self._read()

    def _read(self) -> Iterator[Any]:
        for path in self.files:
            pf = _open(path)
            names = list(pf.schema_arrow.names)
            if self._names is None:
                self._names = names
            elif names != self._names:
                raise DataError(DATA_FILE, f"its columns ({', '.join(names)}) differ from those of the first "
                                f"shard ({', '.join(self._names)})", path)
            meta = pf.metadata
            decoded = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
            rows = max(1, min(self.batch_rows, BATCH_BYTES * max(meta.num_rows, 1) // max(decoded, 1)))
            batches = pf.iter_batches(batch_size=rows)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001 - a corrupt page or column chunk
                    raise _fail(path, e) from None
                if batch.num_rows:
                    yield batch

    def next(self) -> bool:
        """Move to the next batch (the current one is released); False past the last one."""
        if self.batch is not None:
            self.first += self.batch.num_rows
        self.batch = None  # released before the next is decoded: one batch held at a time
        self.batch = next(self._batches, None)
        return self.batch is not None

    @property
    def end(self) -> int:
        return self.first + (self.batch.num_rows if self.batch is not None else 0)


def batches(key: str, files: list[str], batch_rows: int) -> Iterator[tuple[int, Any]]:
    """``(first_row, record_batch)`` over a parquet table, each batch released once the next is
    asked for; meanwhile :func:`row_in_order` serves that batch's rows.

    Raises:
        DataError: ``data_file`` when a shard cannot be read, or its columns differ from the
            first shard's.
    """
    cursor = _CURSORS[key] = _Cursor(key, files, batch_rows, driven=True)
    try:
        while cursor.next():
            yield cursor.first, cursor.batch
    finally:
        if _CURSORS.get(key) is cursor:
            del _CURSORS[key]


def row_in_order(key: str, row: int, batch_rows: int):
    """Row ``row`` of a parquet table as a one-row record batch, when it is at or just past the
    rows read last in this process (or is row 0, which starts a cursor); else None.

    Args:
        key: The table's key (its absolute path).
        row: The row, counted over the table's shards.
        batch_rows: The most rows a batch of a new cursor holds.

    Raises:
        DataError: ``data_file`` when a shard cannot be read.
    """
    cursor = _CURSORS.get(key)
    if cursor is None or cursor.pid != os.getpid() or row < cursor.first:
        files = parquet_files(key) if row == 0 else None
        if files is None:
            return None
        cursor = _CURSORS[key] = _Cursor(key, files, batch_rows, driven=False)
        cursor.next()
    if cursor.batch is not None and row >= cursor.end:
        # On to the next batch only, and only for a cursor of this function's (a pass over
        # :func:`batches` moves its own): a row further on is random access, cheaper from the
        # arrow copy than decoding every batch before it.
        if cursor.driven or row >= cursor.end + cursor.batch.num_rows:
            return None
        cursor.next()
    if cursor.batch is None:  # past the last row: the cursor's file handles go
        if _CURSORS.get(key) is cursor:
            del _CURSORS[key]
        return None
    if not cursor.first <= row < cursor.end:
        return None
    return cursor.batch.slice(row - cursor.first, 1)


def arrow_copy(key: str, files: list[str]):
    """The ``datasets.Dataset`` of a parquet table, memory-mapped from its arrow copy in the
    ``datasets`` cache (written the first time, keyed by the files' paths, sizes and times).

    Rows read out of order come from this copy, as from ``datasets.Dataset.from_parquet``'s,
    but it is written a bounded batch at a time, where ``from_parquet``'s scanner decodes the
    whole table ahead of its writer; and in batches of up to :data:`COPY_ROWS` rows (or
    :data:`BATCH_BYTES`), where ``datasets`` writes tables with images 100 rows a batch, so that
    opening it (each batch's header read through the map) does not make the whole file resident.

    Raises:
        DataError: ``data_file`` when a shard cannot be read, or its columns differ from the
            first shard's.
    """
    import datasets  # noqa: PLC0415 - heavy, and only tabular data needs it
    from filelock import FileLock  # noqa: PLC0415 - a dependency of datasets

    stamp = [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    digest = hashlib.blake2b(json.dumps(stamp).encode(), digest_size=16).hexdigest()
    folder = Path(datasets.config.HF_DATASETS_CACHE) / COPY_FOLDER
    out = folder / f"{digest}.arrow"
    if not out.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # One writer per copy (DataLoader workers and ranks may all ask for it at once).
        with FileLock(str(out) + ".lock"):
            if not out.is_file():
                _write_copy(key, files, out)
    return datasets.Dataset.from_file(str(out))


def _write_copy(key: str, files: list[str], out: Path) -> None:
    import pyarrow as pa  # noqa: PLC0415

    schema = _open(files[0]).schema_arrow  # with its metadata: datasets' features (Image cells)
    tmp = out.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}.arrow")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            cursor = _Cursor(key, files, COPY_ROWS, driven=True)
            while cursor.next():
                writer.write_batch(cursor.batch if cursor.batch.schema.equals(schema) else cursor.batch.cast(schema))
        os.replace(tmp, out)  # whole or absent: a reader never maps a copy being written
    finally:
        tmp.unlink(missing_ok=True)
