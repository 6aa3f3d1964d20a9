"""Reading data files line by line into samples: a bad line is named, the rest still read.

A file is a JSON list (first non-blank character ``[``) or JSON Lines; parquet and arrow files,
shard folders and ``save_to_disk`` folders are read row by row (:mod:`monkeytune.data.tables`). Bytes are decoded one
line at a time, so an invalid UTF-8 byte makes that line (or, in a JSON list, the record
spanning it) an error naming the line and byte column, and every other line is still read.
A file that cannot be read at all (missing, a directory, a symlink loop, no permission) is one
error that says what it is.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any, Iterator, Sequence

from monkeytune.data.formats import FORMAT_CHOICES, detect_format, parse_record
from monkeytune.data.records import DATA_FILE, MALFORMED_JSON, DataError, Sample
from monkeytune.data.tables import is_table, iter_table_records


def _read_bytes(path: str) -> bytes:
    def fail(what: str) -> DataError:
        return DataError(DATA_FILE, f"cannot read data file: {what}", path)

    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise fail("it is a symlink loop") from None
        if os.path.islink(path):
            raise fail(f"it is a symlink to a missing file ({os.readlink(path)})") from None
        if isinstance(e, FileNotFoundError):
            raise fail("file not found") from None
        raise fail(e.strerror or str(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise fail("it is a directory; list the data files inside it")
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise fail("permission denied") from None
    except OSError as e:
        raise fail(e.strerror or str(e)) from None


def _decode_lines(data: bytes, path: str) -> tuple[list[str], dict[int, DataError]]:
    """Lines as text, and a located error for every line that is not valid UTF-8.

    A bad line is kept with U+FFFD in place of its bad bytes so a JSON list stays parseable.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark, as some editors write
    lines, bad = [], {}
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad[lineno] = DataError(
                MALFORMED_JSON,
                f"invalid UTF-8 at byte {e.start + 1} of the line ({raw[e.start:e.start + 4]!r}); "
                "re-encode the file as UTF-8",
                path,
                lineno,
            )
            lines.append(raw.decode("utf-8", errors="replace"))
    return lines, bad


def iter_raw_records(path: str | os.PathLike) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(index, line, obj)`` for every record of a JSON-list or JSON-Lines file.

    ``obj`` is a :class:`DataError` (``malformed_json``) for a line that is not valid UTF-8 or
    not valid JSON, and reading goes on. A JSON list whose structure breaks raises it, since
    nothing after the fault can be located reliably.

    Raises:
        DataError: ``data_file`` when the file cannot be read; ``malformed_json`` for a broken
            JSON list.
    """
    path = str(path)
    if is_table(path):
        yield from iter_table_records(path)
        return
    lines, bad = _decode_lines(_read_bytes(path), path)
    first = next((ln for ln in lines if ln.strip()), "")
    if first.lstrip().startswith("["):
        yield from _iter_json_list(lines, bad, path)
        return
    index = 0
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        obj: Any
        if lineno in bad:
            obj = bad[lineno]
            obj.index = index
        else:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                obj = DataError(MALFORMED_JSON, f"invalid JSON: {e.msg} (column {e.colno})", path, lineno, index)
        yield index, lineno, obj
        index += 1


def _iter_json_list(lines: list[str], bad: dict[int, DataError], path: str) -> Iterator[tuple[int, int, Any]]:
    # Decode the list element by element so that each record keeps the line it starts on;
    # json.load would only give us the index.
    text = "\n".join(lines)
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    index = 0

    # Line numbers from a running count: positions only move forward, so each newline is
    # counted once and reading stays linear in the file's size (counting from the start for
    # every record made a 300k-record list take hours).
    seen = {"pos": 0, "line": 1}

    def line_at(p: int) -> int:
        if p < seen["pos"]:
            return 1 + text.count("\n", 0, p)  # a step back (never in the flow below): count afresh
        seen["line"] += text.count("\n", seen["pos"], p)
        seen["pos"] = p
        return seen["line"]

    def fail(p: int, msg: str) -> DataError:
        return DataError(MALFORMED_JSON, f"invalid JSON list: {msg}", path, line_at(p), index)

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        start_line, end_line = line_at(pos), line_at(end)
        broken = [bad[ln] for ln in range(start_line, end_line + 1) if ln in bad]
        if broken:
            # Named at the line the record starts on, like every record error; the reason
            # gives the line of the bad byte.
            first = broken[0]
            obj = DataError(first.kind, f"line {first.line}: {first.reason}", path, start_line, index)
        yield index, start_line, obj
        index += 1
        pos = skip_ws(end)
        if pos >= len(text):
            raise fail(pos, "missing closing ']'")
        if text[pos] == "]":
            if text[pos + 1 :].strip():
                raise fail(pos + 1, "extra data after the closing ']'")
            return
        if text[pos] != ",":
            raise fail(pos, "expected ',' or ']' between records")
        pos += 1


def load_samples(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    errors: list[DataError] | None = None,
    format: str = "auto",
    image_root: str | None = None,
    allow_empty_answers: bool = False,
    formats: dict[str, str] | None = None,
) -> list[Sample]:
    """Read and validate every record of one or more data files.

    Args:
        paths: A data file or a list of them.
        errors: If given, bad records are appended here and reading goes on (a file that
            cannot be read, or a JSON list that breaks, is one error and reading goes on
            with the next file); otherwise the first bad record raises.
        format: ``auto`` (detect per file, see :mod:`monkeytune.data.formats`) or a format name.
        image_root: Folder relative image paths resolve against (default: each file's folder).
        allow_empty_answers: Accept assistant turns without text.
        formats: If given, filled with the format used for each file.

    Returns:
        The valid samples, in file order.

    Raises:
        DataError: on the first problem when ``errors`` is ``None``.
        ValueError: an unknown ``format``.
    """
    if format not in FORMAT_CHOICES:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    samples: list[Sample] = []

    def fault(e: DataError) -> None:
        if errors is None:
            raise e
        errors.append(e)

    for path in map(str, paths):
        records: list[tuple[int, int, Any]] = []
        try:
            for rec in iter_raw_records(path):
                records.append(rec)
        except DataError as e:
            fault(e)  # the records before a JSON-list fault are still checked below
        try:
            fmt = detect_format(records, path) if format == "auto" else format
        except DataError as e:
            fault(e)
            continue
        if formats is not None:
            formats[path] = fmt
        for index, line, obj in records:
            try:
                if isinstance(obj, DataError):
                    raise obj
                samples.append(parse_record(obj, fmt, path, line, index, image_root, allow_empty_answers))
            except DataError as e:
                fault(e)
    return samples
