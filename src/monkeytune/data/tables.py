"""Tabular training data as public sets ship it: parquet and arrow files, shard folders, ``save_to_disk``.

A data path is tabular when it is a ``.parquet`` or ``.arrow`` file, a folder of such shards, or
a folder written by ``datasets.Dataset.save_to_disk`` (it holds ``state.json``). Each row is one
record, with the same four layouts as JSON (:mod:`monkeytune.data.formats`); the columns are the
record's fields (``conversations`` or ``messages``, ``image`` or ``images``, ``id``).

Images may sit inside the table, the way ``datasets.Image`` stores them: a ``{"bytes", "path"}``
struct, or a list of them. Such an image is not copied out of the table: the record holds a
reference, ``table:<file>#<row>/<column>/<item>`` (:func:`embedded_ref`), and
:func:`embedded_bytes` reads the bytes when the image is decoded, from the table kept open once
per process. Arrow files and ``save_to_disk`` folders are memory-mapped, so DataLoader workers
share their pages; parquet shards are converted once to memory-mapped arrow in ``datasets``'
cache (keyed by the files' content), as ``datasets.load_dataset`` does. A struct without bytes
names an image file by its ``path``, resolved like a path in JSON.

In the chat layout of ``datasets`` and TRL (``openai`` here), a content part ``{"type": "image"}``
without a payload takes the next image of the ``images`` column.

Errors name the file and the row (``x.parquet (record 12)``): rows are records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from monkeytune.data.records import DATA_FILE, DataError

TABLE_SUFFIXES = (".parquet", ".arrow")
SAVED_MARK = "state.json"  # written by save_to_disk beside dataset_info.json and the arrow shards
EMBEDDED = "table:"
IMAGE_COLUMNS = ("image", "images")

# Tables opened in this process, by their path: rows are read from them when a record or an
# embedded image is needed (workers open their own on first use). Beside each dataset, its
# arrow table (zero-copy over the memory-mapped files), for reading cells as stored.
_OPEN: dict[str, Any] = {}
_ARROW: dict[str, Any] = {}
_TEXT: dict[str, Any] = {}  # each table without its image columns, for reading one row's record


def is_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as a table (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        return p.suffix in TABLE_SUFFIXES
    if p.is_dir():
        return (p / SAVED_MARK).is_file() or any(q.suffix in TABLE_SUFFIXES for q in p.iterdir())
    return False


def _shards(folder: Path, suffix: str) -> list[str]:
    return sorted(str(q) for q in folder.iterdir() if q.is_file() and q.suffix == suffix)


def open_table(path: str | os.PathLike):
    """The ``datasets.Dataset`` of a tabular path, opened once per process.

    Nothing is written beside the data: image cells are read through arrow as stored
    (``{"bytes", "path"}`` structs), not cast or decoded by ``datasets``.

    Raises:
        DataError: ``data_file`` when the path cannot be read as a table.
    """
    key = os.path.abspath(path)
    table = _OPEN.get(key)
    if table is not None:
        return table
    import datasets  # noqa: PLC0415 - heavy, and only tabular data needs it

    p = Path(key)
    try:
        if p.is_dir() and (p / SAVED_MARK).is_file():
            table = datasets.load_from_disk(key)
        elif p.is_dir():
            parquet, arrow = _shards(p, ".parquet"), _shards(p, ".arrow")
            if parquet and arrow:
                raise DataError(DATA_FILE, "the folder mixes parquet and arrow shards; keep one kind", key)
            table = _from_parquet(parquet) if parquet else _from_arrow(arrow)
        elif p.suffix == ".parquet":
            table = _from_parquet([key])
        else:
            table = _from_arrow([key])
    except DataError:
        raise
    except Exception as e:  # pyarrow and datasets raise many types for unreadable files
        raise DataError(DATA_FILE, f"cannot read it as a table: {type(e).__name__}: {e}", key) from None
    if isinstance(table, datasets.DatasetDict):
        raise DataError(DATA_FILE, f"it holds several splits ({', '.join(table)}); name the split's folder", key)
    _OPEN[key] = table
    return table


def _arrow(key: str):
    """The arrow table of an opened tabular path (as stored: image cells are structs)."""
    if key not in _ARROW:
        _ARROW[key] = open_table(key).with_format("arrow")[:]
    return _ARROW[key]


def _from_parquet(files: list[str]):
    import datasets  # noqa: PLC0415

    return datasets.Dataset.from_parquet(files if len(files) > 1 else files[0])


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


def iter_table_records(path: str | os.PathLike) -> Iterator[tuple[int, int | None, Any]]:
    """Yield ``(row, None, record)`` for every row of a tabular path, as JSON files yield records.

    Embedded images in the ``image``/``images`` columns become :func:`embedded_ref` strings;
    their bytes are not read here (only whether a cell holds bytes, and its path).

    Raises:
        DataError: ``data_file`` when the path cannot be read as a table.
    """
    key = os.path.abspath(path)
    table = open_table(key)
    image_columns = [c for c in IMAGE_COLUMNS if c in table.column_names]
    cells = {c: _image_cells(_arrow(key).column(c)) for c in image_columns}
    text = table.select_columns([c for c in table.column_names if c not in image_columns])
    for row, record in enumerate(text):
        for column in image_columns:
            record[column] = _refs(cells[column][row], key, row, column)
        yield row, None, record


def table_record(path: str | os.PathLike, row: int) -> dict:
    """Row ``row`` of a tabular path as :func:`iter_table_records` gives it (read alone)."""
    key = os.path.abspath(path)
    table = open_table(key)
    image_columns = [c for c in IMAGE_COLUMNS if c in table.column_names]
    if key not in _TEXT:
        _TEXT[key] = table.select_columns([c for c in table.column_names if c not in image_columns])
    record = _TEXT[key][row]
    for column in image_columns:
        record[column] = _refs(_image_cells(_arrow(key).column(column).slice(row, 1))[0], key, row, column)
    return record


def _image_cells(column) -> list:
    """Per row: None, or ``(has_bytes, path)`` for a struct cell, or a list of them for a list cell."""
    import pyarrow as pa  # noqa: PLC0415

    column = column.combine_chunks()

    def structs(array) -> list:
        if not pa.types.is_struct(array.type) or array.type.get_field_index("bytes") < 0:
            return array.to_pylist()  # plain values (paths): kept as they are
        has = array.field("bytes").is_valid().to_pylist()
        paths = array.field("path").to_pylist() if array.type.get_field_index("path") >= 0 else [None] * len(array)
        valid = array.is_valid().to_pylist()
        return [(h, p) if v else None for h, p, v in zip(has, paths, valid)]

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        items = structs(column.flatten())  # the values of this (possibly sliced) array, from its first offset
        offsets, valid = column.offsets.to_pylist(), column.is_valid().to_pylist()
        base = offsets[0]
        return [items[offsets[i] - base:offsets[i + 1] - base] if valid[i] else None for i in range(len(column))]
    return structs(column)


def _refs(value: Any, key: str, row: int, column: str) -> Any:
    def one(item: Any, k: int) -> Any:
        if isinstance(item, tuple):  # (has_bytes, path) of a datasets.Image cell
            return embedded_ref(key, row, column, k) if item[0] else item[1]
        return item

    if value is None:
        return None
    if isinstance(value, list):
        return [one(item, k) for k, item in enumerate(value)]
    return one(value, -1)


def embedded_ref(key: str, row: int, column: str, item: int) -> str:
    """The source string of an image stored in a table (``item`` -1: the cell is one image)."""
    return f"{EMBEDDED}{key}#{row}/{column}/{item}"


def embedded_bytes(source: str) -> bytes:
    """The bytes of an image stored in a table, from its :func:`embedded_ref` string.

    Raises:
        ValueError: the reference is malformed or its cell holds no bytes.
    """
    key, _, where = source[len(EMBEDDED):].rpartition("#")
    try:
        row, column, item = where.split("/")
        # Read through arrow: the cell as stored, never decoded to a PIL image by datasets.
        value = _arrow(key).column(column)[int(row)].as_py()
        if int(item) >= 0:
            value = value[int(item)]
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"no embedded image at {source!r} ({type(e).__name__}: {e})") from None
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise ValueError(f"the table cell {column}[{item}] of row {row} holds no image bytes")
    return data
