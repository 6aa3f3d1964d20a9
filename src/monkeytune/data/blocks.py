"""Data files cut into blocks, the unit :mod:`monkeytune.data.stream` deals to its streams, and read block by block.

A block is a byte range of a JSON Lines file (a record belongs to the block its line starts in:
a reader seeks to the start and skips to the next line start, unless at 0 or after a newline),
a row range of an arrow table (memory-mapped by ``datasets``: a slice costs nothing) or a parquet
row group (read whole: parquet reads no less). Nothing here reads a whole file.

Images inside a table come back as ``data:`` URIs of their bytes: the map-style ``table:``
reference (:mod:`monkeytune.data.tables`) opens the whole table, which for parquet means
converting all of it first.
"""

from __future__ import annotations

import base64
import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from monkeytune.data.errors import DATA_FILE, DataError
from monkeytune.data.reading import _is_json_list, _iter_json_lines, _open, is_table
from monkeytune.data.tables import IMAGE_COLUMNS, SAVED_MARK, open_table

BLOCK_BYTES = 1 << 20
MIN_BLOCK_BYTES = 1 << 10
BLOCK_ROWS = 1024
BLOCKS_PER_STREAM = 4  # on small data blocks shrink until each stream has this many to shuffle
HEAD_RECORDS = 1000  # records of a file's head that decide its format (``auto``)
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Source:
    """One streamed file: ``kind`` ``jsonl``, ``parquet`` or ``arrow`` (an arrow file, a folder
    of arrow shards or a ``save_to_disk`` folder, memory-mapped by ``datasets``)."""

    path: str
    kind: str


@dataclass(frozen=True)
class Block:
    """Records ``[start, end)`` of source ``file``: bytes of a JSON Lines file, or rows of a table;
    ``group`` is the parquet row group holding them (its first row ``base``), else -1."""

    file: int
    start: int
    end: int
    group: int = -1
    base: int = 0


def deal(num_blocks: int, streams: int, stream: int) -> list[int]:
    """The blocks of ``stream``: block ``j`` (in file order) goes to stream ``j % streams``."""
    return list(range(stream, num_blocks, streams))


def sources(paths: Sequence[str]) -> list[Source]:
    """The files a list of data paths streams from (a folder of parquet shards: each shard).

    Raises:
        DataError: ``data_file`` for a JSON list (one line naming the file and the fix) or a
            file that cannot be read.
    """
    out = []
    for path in map(str, paths):
        p = Path(path)
        if not is_table(path):
            with _open(path) as f:
                if _is_json_list(f):
                    raise DataError(DATA_FILE, "a JSON list cannot be streamed without reading all of it; write it "
                                    f"as JSON Lines or parquet first: monkeytune data convert {path} OUT.jsonl "
                                    "(or OUT.parquet)", path)
            out.append(Source(path, "jsonl"))
        elif p.suffix == ".parquet":
            out.append(Source(path, "parquet"))
        elif p.is_dir() and not (p / SAVED_MARK).is_file() and any(q.suffix == ".parquet" for q in p.iterdir()):
            if any(q.suffix == ".arrow" for q in p.iterdir()):
                raise DataError(DATA_FILE, "the folder mixes parquet and arrow shards; keep one kind", path)
            out += [Source(str(q), "parquet") for q in sorted(p.iterdir()) if q.suffix == ".parquet"]
        else:
            out.append(Source(path, "arrow"))
    return out


def _extent(src: Source) -> int | list[int]:
    """A JSON Lines file's size in bytes; a table's row count per row group (one group: arrow)."""
    if src.kind == "jsonl":
        return os.path.getsize(src.path)
    if src.kind == "arrow":
        return [len(open_table(src.path))]
    meta = _parquet(src.path).metadata
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def list_blocks(srcs: Sequence[Source], streams: int) -> list[Block]:
    """Every block of ``srcs``, in file order.

    A JSON Lines block holds at most :data:`BLOCK_BYTES`, an arrow block :data:`BLOCK_ROWS`,
    fewer on small data (so that each stream gets :data:`BLOCKS_PER_STREAM`). A parquet row group
    is read whole, so it is one block, cut only when the groups are too few to go round.
    """
    extents = [_extent(s) for s in srcs]
    want = BLOCKS_PER_STREAM * streams

    def total(kind: str) -> int:
        return sum(sum(e) if isinstance(e, list) else e for s, e in zip(srcs, extents) if s.kind == kind)

    nbytes = min(BLOCK_BYTES, max(MIN_BLOCK_BYTES, -(-total("jsonl") // want)))
    nrows = {"arrow": min(BLOCK_ROWS, max(1, -(-total("arrow") // want))),
             "parquet": max(1, -(-total("parquet") // want))}
    if sum(len(e) for s, e in zip(srcs, extents) if s.kind == "parquet") >= want:
        nrows["parquet"] = 2**62
    blocks = []
    for f, (src, extent) in enumerate(zip(srcs, extents)):
        if src.kind == "jsonl":
            blocks += [Block(f, a, min(a + nbytes, extent)) for a in range(0, extent, nbytes)]
            continue
        base, step = 0, nrows[src.kind]
        for g, n in enumerate(extent):
            group = g if src.kind == "parquet" else -1
            blocks += [Block(f, base + a, base + min(a + step, n), group, base) for a in range(0, n, step)]
            base += n
    return blocks


# -- reading a block -------------------------------------------------------------------------

_PARQUET: dict[str, Any] = {}
# The row group read last in this process (a group is cut into several blocks only on small data).
_GROUP: dict[tuple[str, int], Any] = {}


def _parquet(path: str):
    if path not in _PARQUET:
        import pyarrow.parquet as pq  # noqa: PLC0415 - only tables need it

        try:
            _PARQUET[path] = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(DATA_FILE, f"cannot read it as a table: {type(e).__name__}: {e}", path) from None
    return _PARQUET[path]


def clear_cache() -> None:
    """Forget the row group kept by :func:`read_block` (its memory goes)."""
    _GROUP.clear()


def _row_group(path: str, group: int):
    if (path, group) not in _GROUP:
        _GROUP.clear()
        _GROUP[(path, group)] = _parquet(path).read_row_group(group)
    return _GROUP[(path, group)]


def _jsonl_block(path: str, block: Block) -> list[tuple[int, Any]]:
    with _open(path) as f:
        if block.start:
            f.seek(block.start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the end of a line that starts in an earlier block
        at = f.tell()
        out = []
        for _, _, obj, (start, _) in _iter_json_lines(f, path):
            if at + start >= block.end:
                break
            out.append((at + start, obj))
        return out


_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpeg"), (b"GIF8", "gif"), (b"RIFF", "webp"), (b"BM", "bmp"))


def _image_kind(data: bytes) -> str:
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    return "unknown"


def _inline(cell: Any) -> Any:
    """An image cell (``{"bytes", "path"}``, or a list of them) as the sources a record names.

    Bytes become a ``data:`` URI: the map-style ``table:`` reference would open the whole table,
    which for parquet means converting all of it first.
    """
    if isinstance(cell, list):
        return [_inline(c) for c in cell]
    if isinstance(cell, dict) and "bytes" in cell:
        data = cell["bytes"]
        return f"data:image/{_image_kind(data)};base64,{base64.b64encode(data).decode()}" if data else cell.get("path")
    return cell


class _Rows(Sequence):
    """The rows of a table block as ``(row, record)``, converted when asked for."""

    def __init__(self, table, first: int):
        self.table, self.first = table, first

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        record = self.table.slice(i, 1).to_pylist()[0]
        for column in IMAGE_COLUMNS:
            if column in record:
                record[column] = _inline(record[column])
        return self.first + i, record


def read_block(src: Source, block: Block) -> Sequence[tuple[int, Any]]:
    """``(place, record)`` for every record of ``block``: the byte offset of a JSON Lines record's
    line, or a table's row; the record decoded, or a ``malformed_json`` DataError (place unlocated).

    Raises:
        DataError: ``data_file`` when the file cannot be read.
    """
    if src.kind == "jsonl":
        return _jsonl_block(src.path, block)
    try:
        if src.kind == "parquet":
            table = _row_group(src.path, block.group).slice(block.start - block.base, block.end - block.start)
        else:
            table = open_table(src.path).with_format("arrow")[block.start:block.end]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise DataError(DATA_FILE, f"cannot read rows {block.start}-{block.end}: {type(e).__name__}: {e}",
                        src.path) from None
    return _Rows(table, block.start)


def head_records(src: Source, rows: int) -> list[tuple[int, int | None, Any]]:
    """``(index, line, record)`` of a file's first records (at most :data:`HEAD_RECORDS` and about
    a block of a JSON Lines file, ``rows`` of a table), with exact places: read from its start."""
    if src.kind == "jsonl":
        with _open(src.path) as f:
            out = []
            for index, line, obj, (start, _) in _iter_json_lines(f, src.path):
                if index >= HEAD_RECORDS or (out and start >= BLOCK_BYTES):
                    break  # records with inline images can be megabytes each
                out.append((index, line, obj))
            return out
    blocks = list_blocks([src], 1)
    got = read_block(src, blocks[0]) if blocks else []
    return [(row, None, obj) for row, obj in (got[i] for i in range(min(len(got), rows)))]


class LineCounter:
    """Line and record index of a line start in a JSON Lines file, counted only when an error needs
    them, from the nearest offset counted before (not from the start of the file for each error)."""

    def __init__(self):
        self.known: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}

    def at(self, path: str, offset: int) -> tuple[int, int]:
        offsets, values = self.known.setdefault(path, ([0], [(1, 0)]))
        k = bisect.bisect_right(offsets, offset) - 1
        pos, (line, index) = offsets[k], values[k]
        with open(path, "rb") as f:
            f.seek(pos)
            while pos < offset:
                raw = f.readline()
                if not raw or pos + len(raw) > offset:
                    break  # the offset is inside this line (after a byte-order mark)
                body = raw[3:] if pos == 0 and raw.startswith(BOM) else raw
                line, index, pos = line + 1, index + bool(body.strip()), pos + len(raw)
        if offsets[k] != offset:
            offsets.insert(k + 1, offset)
            values.insert(k + 1, (line, index))
        return line, index
