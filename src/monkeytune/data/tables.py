"""Tabular training data as public sets ship it: parquet, arrow, shard folders, save_to_disk, ``hf:`` names.

A data path is tabular when it is a ``.parquet`` or ``.arrow`` file, a folder of such shards, a
folder written by ``datasets.Dataset.save_to_disk`` (it holds ``state.json``), or a ``datasets``
name prefixed with ``hf:`` (``hf:HuggingFaceM4/the_cauldron``, ``hf:parquet``), loaded by
``datasets.load_dataset`` with ``data.load_options`` as its keyword arguments (``split``
defaults to ``train``), from its cache when offline (:mod:`monkeytune.data.hub`). Each row is one
record, with the same four layouts as JSON (:mod:`monkeytune.data.messages`); the columns are the
record's fields (``conversations`` or ``messages``, ``image`` or ``images``, ``id``), or the
columns ``data.columns`` names for them (:mod:`monkeytune.data.columns`).

Images may sit inside the table, the way ``datasets.Image`` stores them: a ``{"bytes", "path"}``
struct, or a list of them. Such an image is not copied out of the table: the record holds a
reference, ``table:<key>#<row>/<column>/<item>`` (:func:`embedded_ref`; the key is the table's
absolute path, or the dataset name with a digest of its load options), and :func:`embedded_bytes`
reads the bytes when the image is decoded, from the table kept open once per process. Arrow
files, ``save_to_disk`` folders and loaded datasets are memory-mapped, so DataLoader workers
share their pages; parquet shards are converted once to memory-mapped arrow in ``datasets``'
cache (keyed by the files' paths, sizes and modification times), as ``datasets.load_dataset``
does, a bounded batch at a time (:func:`~monkeytune.data.parquet_rows.arrow_copy`). A struct without bytes
names an image file by its ``path``, resolved like a path in JSON.

Rows are read through arrow, a record batch of :data:`BATCH_ROWS` at a time, the text columns as
Python values and the image columns as ``(has_bytes, path)`` without touching the bytes; one row
alone (:func:`table_record`) is found by a binary search over the table's chunks. Parquet is the
exception while its rows are read in order (the start-up pass, and its check of each embedded
image): they come straight from the files, a bounded batch at a time, and the arrow copy is made
only when a row is first read out of order (:mod:`monkeytune.data.parquet_rows`, which says why).

In the chat layout of ``datasets`` and TRL (``openai`` here), a content part ``{"type": "image"}``
without a payload takes the next image of the ``images`` column.

Errors name the file (or the ``hf:`` name) and the row (``x.parquet (record 12)``): rows are records.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from monkeytune.data import hub, parquet_rows
from monkeytune.data.errors import DATA_FILE, DataError
from monkeytune.data.parquet_rows import SAVED_MARK

TABLE_SUFFIXES = (".parquet", ".arrow")
EMBEDDED = "table:"
IMAGE_COLUMNS = ("image", "images")
BATCH_ROWS = 1000  # rows turned into Python values at once: fast, and little memory

# Tables opened in this process, by their key: rows are read from them when a record or an
# embedded image is needed (workers open their own on first use). Beside each dataset, its
# arrow record batches (zero-copy over the memory-mapped files) and the row each starts at.
_OPEN: dict[str, Any] = {}
_CHUNKS: dict[str, tuple[list, list[int]]] = {}
_PLANS: dict[tuple[str, tuple], "_Plan"] = {}


def table_key(path: str | os.PathLike, load_options: dict | None = None) -> str:
    """The key a tabular path is opened and referred to by (see the module docstring)."""
    if hub.is_dataset_name(path):
        return hub.dataset_key(str(path), load_options)
    return os.path.abspath(path)


def open_table(path: str | os.PathLike, load_options: dict | None = None):
    """The ``datasets.Dataset`` of a tabular path, opened once per process.

    Nothing is written beside the data: image cells are read through arrow as stored
    (``{"bytes", "path"}`` structs), not cast or decoded by ``datasets``.

    Args:
        path: A tabular path or an ``hf:`` dataset name.
        load_options: Keyword arguments of ``datasets.load_dataset`` (a dataset name only).

    Raises:
        DataError: ``data_file`` when the path cannot be read as a table.
    """
    return _open(table_key(path, load_options))


def _open(key: str):
    table = _OPEN.get(key)
    if table is not None:
        return table
    if hub.is_dataset_name(key):
        table = hub.load(key)
    else:
        table = _open_path(key)
    _OPEN[key] = table
    return table


def _open_path(key: str):
    import datasets  # noqa: PLC0415 - heavy, and only tabular data needs it

    p = Path(key)
    try:
        if p.is_dir() and (p / SAVED_MARK).is_file():
            table = datasets.load_from_disk(key)
        elif p.is_dir():
            parquet, arrow = _shards(p, ".parquet"), _shards(p, ".arrow")
            if parquet and arrow:
                raise DataError(DATA_FILE, "the folder mixes parquet and arrow shards; keep one kind", key)
            table = parquet_rows.arrow_copy(key, parquet) if parquet else _from_arrow(arrow)
        elif p.suffix == ".parquet":
            table = parquet_rows.arrow_copy(key, [key])
        else:
            table = _from_arrow([key])
    except DataError:
        raise
    except Exception as e:  # pyarrow and datasets raise many types for unreadable files
        raise DataError(DATA_FILE, f"cannot read it as a table: {type(e).__name__}: {e}", key) from None
    if isinstance(table, datasets.DatasetDict):
        raise DataError(DATA_FILE, f"it holds several splits ({', '.join(table)}); name the split's folder", key)
    return table


def _shards(folder: Path, suffix: str) -> list[str]:
    return sorted(str(q) for q in folder.iterdir() if q.is_file() and q.suffix == suffix)


def _from_arrow(files: list[str]):
    import datasets  # noqa: PLC0415

    parts = []
    for f in files:
        try:
            parts.append(datasets.Dataset.from_file(f))  # the stream format save_to_disk writes
        except Exception:  # noqa: BLE001 - an arrow IPC file, as pyarrow writes it
            import pyarrow as pa  # noqa: PLC0415

            with pa.memory_map(f) as source:
                parts.append(datasets.Dataset(pa.ipc.open_file(source).read_all()))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _chunks(key: str) -> tuple[list, list[int]]:
    """The record batches of an opened table (as stored: image cells are structs) and the row
    each starts at, for finding one row by binary search."""
    if key not in _CHUNKS:
        table = _open(key).with_format("arrow")[:]  # zero-copy over the memory-mapped files
        batches = [b for b in table.to_batches() if b.num_rows]
        starts, row = [], 0
        for b in batches:
            starts.append(row)
            row += b.num_rows
        _CHUNKS[key] = (batches, starts)
    return _CHUNKS[key]


def _row_slice(key: str, row: int):
    """Row ``row`` of a table as a record batch of one row: from the parquet batch read last
    when the rows are asked for in order (the start-up pass), else from the opened table
    (zero-copy)."""
    in_order = parquet_rows.row_in_order(key, row, BATCH_ROWS)
    if in_order is not None:
        return in_order
    batches, starts = _chunks(key)
    if not 0 <= row < (starts[-1] + batches[-1].num_rows if batches else 0):
        raise IndexError(f"row {row} out of range")
    k = bisect.bisect_right(starts, row) - 1
    return batches[k].slice(row - starts[k], 1)


@dataclass(frozen=True)
class _Plan:
    """Which columns of a table are read, and as which record field: ``(column, field)``."""

    text: tuple[tuple[str, str], ...]
    images: tuple[tuple[str, str], ...]
    renamed: bool


def _plan(key: str, columns: dict[str, str] | None) -> _Plan:
    mapping = dict(columns or {})
    cache = (key, tuple(sorted(mapping.items())))
    if cache in _PLANS:
        return _PLANS[cache]
    files = parquet_rows.parquet_files(key)
    names = parquet_rows.column_names(files) if files else _open(key).column_names
    for field, column in mapping.items():
        if column not in names:
            raise DataError(DATA_FILE, f"data.columns maps {field} to the column {column!r}, which the table "
                            f"lacks (its columns: {', '.join(names)})", hub.label(key))
    field_of = {c: f for f, c in mapping.items()}
    # A mapped field replaces a column of that name the table also has.
    fields = [(c, field_of.get(c, c)) for c in names if c in field_of or c not in mapping]
    plan = _Plan(tuple((c, f) for c, f in fields if f not in IMAGE_COLUMNS),
                 tuple((c, f) for c, f in fields if f in IMAGE_COLUMNS),
                 any(c != f for c, f in fields))
    _PLANS[cache] = plan
    return plan


def iter_table_records(path: str | os.PathLike, columns: dict[str, str] | None = None,
                       load_options: dict | None = None) -> Iterator[tuple[int, int | None, Any]]:
    """Yield ``(row, None, record)`` for every row of a tabular path, as JSON files yield records.

    Embedded images in the image columns become :func:`embedded_ref` strings; their bytes are
    not read here (only whether a cell holds bytes, and its path).

    Args:
        path: A tabular path or an ``hf:`` dataset name.
        columns: ``data.columns``: the record fields' column names in this table.
        load_options: Keyword arguments of ``datasets.load_dataset`` (a dataset name only).

    Raises:
        DataError: ``data_file`` when the path cannot be read as a table, or ``columns`` names
            a column it lacks.
    """
    key = table_key(path, load_options)
    plan = _plan(key, columns)
    files = parquet_rows.parquet_files(key)
    if files:  # straight from the files, a bounded batch at a time: nothing converted or mapped
        for first, batch in parquet_rows.batches(key, files, BATCH_ROWS):
            for k, record in enumerate(_records(batch, plan, key, first)):
                yield first + k, None, record
        return
    row = 0
    for batch in _chunks(key)[0]:
        for start in range(0, batch.num_rows, BATCH_ROWS):
            for record in _records(batch.slice(start, BATCH_ROWS), plan, key, row):
                yield row, None, record
                row += 1


def table_record(path: str | os.PathLike, row: int, columns: dict[str, str] | None = None,
                 load_options: dict | None = None) -> dict:
    """Row ``row`` of a tabular path as :func:`iter_table_records` gives it (read alone)."""
    key = table_key(path, load_options)
    plan, batch = _plan(key, columns), _row_slice(key, row)
    # One row: cells read as arrow scalars, cheaper than the batch path's vector kernels.
    record = {f: batch.column(c)[0].as_py() for c, f in plan.text}
    for column, field in plan.images:
        record[field] = _image_value(batch.column(column)[0], key, column, row)
    return record


def _records(batch, plan: _Plan, key: str, first_row: int) -> Iterator[dict]:
    """The records of a record batch whose first row is ``first_row`` of the table."""
    texts = batch.select([c for c, _ in plan.text]).to_pylist()
    cells = [(f, _image_values(batch.column(c), key, c, first_row)) for c, f in plan.images]
    for k, values in enumerate(texts):
        record = {f: values[c] for c, f in plan.text} if plan.renamed else values
        for field, cell in cells:
            record[field] = cell[k]
        yield record


def _image_values(column, key: str, name: str, first_row: int) -> list:
    """Per row, what the record holds for an image cell: an :func:`embedded_ref` for a
    ``datasets.Image`` struct with bytes (the bytes themselves are not read), its ``path`` for
    one without, None for a null cell, a list of these for a list cell, or a plain value as is."""
    import pyarrow as pa  # noqa: PLC0415

    def structs(array, rows: list[int], items: list[int]) -> list:
        if not pa.types.is_struct(array.type) or array.type.get_field_index("bytes") < 0:
            return array.to_pylist()  # plain values (paths): kept as they are
        has = array.field("bytes").is_valid().to_pylist()
        paths = array.field("path").to_pylist() if array.type.get_field_index("path") >= 0 else [None] * len(array)
        valid = array.is_valid().to_pylist()
        prefix = f"{EMBEDDED}{key}#"  # embedded_ref's form, built inline: this runs for every row
        return [None if not v else f"{prefix}{r}/{name}/{i}" if h else p
                for h, p, v, r, i in zip(has, paths, valid, rows, items)]

    rows = range(first_row, first_row + len(column))
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return structs(column, rows, [-1] * len(column))
    offsets, valid = column.offsets.to_pylist(), column.is_valid().to_pylist()
    base, n = offsets[0], len(column)
    spans = [(offsets[i] - base, offsets[i + 1] - base) for i in range(n)]
    # The values under this (possibly sliced) array's offsets, null lists' included (flatten()
    # would drop those and shift the rest), each with its row and place in the list.
    values = column.values.slice(base, offsets[-1] - base)
    items = structs(values, [r for r, (a, b) in zip(rows, spans) for _ in range(b - a)],
                    [k for a, b in spans for k in range(b - a)])
    return [items[a:b] if valid[i] else None for i, (a, b) in enumerate(spans)]


def _image_value(cell, key: str, name: str, row: int, item: int = -1) -> Any:
    """:func:`_image_values` for one cell, an arrow scalar (its bytes are not read either)."""
    import pyarrow as pa  # noqa: PLC0415

    if not cell.is_valid:
        return None
    if isinstance(cell, pa.StructScalar) and cell.type.get_field_index("bytes") >= 0:
        if cell["bytes"].is_valid:
            return embedded_ref(key, row, name, item)
        return cell["path"].as_py() if cell.type.get_field_index("path") >= 0 else None
    if isinstance(cell, (pa.ListScalar, pa.LargeListScalar)):
        return [_image_value(v, key, name, row, k) for k, v in enumerate(cell.values)]
    return cell.as_py()


def embedded_ref(key: str, row: int, column: str, item: int) -> str:
    """The source string of an image stored in a table (``item`` -1: the cell is one image)."""
    return f"{EMBEDDED}{key}#{row}/{column}/{item}"


def embedded_bytes(source: str) -> bytes:
    """The bytes of an image stored in a table, from its :func:`embedded_ref` string.

    A dataset name's key opens the dataset with the options it was first opened with in this
    process (every process reads a record before its images, and registers them then).

    Raises:
        ValueError: the reference is malformed or its cell holds no bytes.
    """
    key, _, where = source[len(EMBEDDED):].rpartition("#")
    try:
        row, column, item = where.split("/")
        # Read through arrow: the cell as stored, never decoded to a PIL image by datasets.
        value = _row_slice(key, int(row)).column(column)[0].as_py()
        if int(item) >= 0:
            value = value[int(item)]
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"no embedded image at {source!r} ({type(e).__name__}: {e})") from None
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise ValueError(f"the table cell {column}[{item}] of row {row} holds no image bytes")
    return data


def cache_files(path: str, load_options: dict | None = None) -> list[str]:
    """The files a tabular path's rows are read from (a dataset name: its arrow files in the
    ``datasets`` cache), for fingerprinting what a run read."""
    return sorted({f["filename"] for f in open_table(path, load_options).cache_files})
