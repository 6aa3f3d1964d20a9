"""Reading data files line by line into samples: a bad line is named, the rest still read.

A file is a JSON list (first non-blank character ``[``) or JSON Lines; parquet and arrow files,
shard folders, ``save_to_disk`` folders and ``hf:`` dataset names are read row by row
(:mod:`monkeytune.data.tables`). Bytes are decoded one line at a time, so an invalid UTF-8 byte
makes that line (or, in a JSON list, the record spanning it) an error naming the line and byte
column, and every other line is still read.
A file that cannot be read at all (missing, a directory, a symlink loop, no permission) is one
error that says what it is.

Detection, per file, over all of its records (``data.format: auto``, the default):

1. turns with ``role``/``content``: ``openai`` if any record has list-valued ``content``,
   else ``sharegpt``;
2. turns with ``from``/``value``: ``llava`` if any record has an ``image`` or ``images`` field
   or an ``<image>`` placeholder, else ``monkey``;
3. a file that mixes the two turn styles, or Monkey ``<img>`` tags with LLaVA images, is an
   error that names a line of each: set ``data.format`` to say which one is meant.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from array import array
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import numpy as np

from monkeytune.data.columns import RecordShape
from monkeytune.data.errors import DATA_FILE, MALFORMED_JSON, UNKNOWN_FORMAT, DataError
from monkeytune.data.hub import PREFIX as DATASET_PREFIX
from monkeytune.data.json_list import iter_json_list, utf8_error
from monkeytune.data.messages import FORMAT_CHOICES, FORMATS, PLACEHOLDER, Sample, parse_record
from monkeytune.data.parquet_rows import SAVED_MARK
from monkeytune.data.tables import TABLE_SUFFIXES, iter_table_records, table_record


def is_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as a table (:mod:`monkeytune.data.tables`): a ``datasets`` name
    (``hf:NAME``), a parquet or arrow file, or a folder of them or of a ``save_to_disk``."""
    if os.fspath(path).startswith(DATASET_PREFIX):
        return True
    if os.path.isfile(path):
        return os.path.splitext(path)[1] in TABLE_SUFFIXES
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, SAVED_MARK)) or any(
            os.path.splitext(name)[1] in TABLE_SUFFIXES for name in os.listdir(path))
    return False


def _fail(path: str, what: str) -> DataError:
    return DataError(DATA_FILE, f"cannot read data file: {what}", path)


def _open(path: str):
    """The data file opened for reading bytes, or a ``data_file`` error that says why not."""

    def fail(what: str) -> DataError:
        return _fail(path, what)

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
        return open(path, "rb")
    except PermissionError:
        raise fail("permission denied") from None
    except OSError as e:
        raise fail(e.strerror or str(e)) from None


def iter_raw_records(path: str | os.PathLike) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(index, line, obj)`` for every record of a JSON-list or JSON-Lines file (or a table).

    ``obj`` is a :class:`DataError` (``malformed_json``) for a line that is not valid UTF-8 or
    not valid JSON, and reading goes on. A JSON list whose structure breaks raises it, since
    nothing after the fault can be located reliably.

    Raises:
        DataError: ``data_file`` when the file cannot be read; ``malformed_json`` for a broken
            JSON list.
    """
    for index, line, obj, _ in iter_spans(path):
        yield index, line, obj


def iter_spans(path: str | os.PathLike, columns: dict[str, str] | None = None,
               load_options: dict | None = None) -> Iterator[tuple[int, int | None, Any, tuple[int, int] | None]]:
    """:func:`iter_raw_records` with each record's byte span ``(start, end)`` in the file.

    The span reads the record back alone (:func:`read_span`). It is None for table rows (a row
    is read back by its index), and for a record that is a ``malformed_json`` error.
    ``columns`` renames a table's columns (JSON records are
    renamed by :class:`~monkeytune.data.columns.RecordShape`); ``load_options`` open an ``hf:``
    dataset name (:mod:`monkeytune.data.hub`).
    """
    path = str(path)
    if is_table(path):
        for row, line, obj in iter_table_records(path, columns, load_options):
            yield row, line, obj, None
        return
    with _open(path) as f:
        if not _is_json_list(f):
            yield from _iter_json_lines(f, path)
            return
        try:
            yield from iter_json_list(f, path)
        except OSError as e:
            raise _fail(path, e.strerror or str(e)) from None


def _is_json_list(f) -> bool:
    """Whether the file's first non-blank character is ``[`` (a byte-order mark skipped)."""
    head = f.read(1 << 16)
    while head and not head.lstrip(b"\xef\xbb\xbf \t\r\n"):
        head = f.read(1 << 16)
    f.seek(0)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _iter_json_lines(f, path: str) -> Iterator[tuple[int, int, Any, tuple[int, int]]]:
    # Line by line from the file: memory holds one line, whatever the file's size.
    index, offset = 0, 0
    try:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], start + 3  # a UTF-8 byte-order mark, as some editors write
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            if not raw.strip():
                continue
            obj: Any
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                obj = utf8_error(e, raw, path, lineno, index)
            except json.JSONDecodeError as e:
                obj = DataError(MALFORMED_JSON, f"invalid JSON: {e.msg} (column {e.colno})", path, lineno, index)
            yield index, lineno, obj, (start, start + len(raw))
            index += 1
    except OSError as e:
        raise _fail(path, e.strerror or str(e)) from None


def read_span(path: str, span: tuple[int, int]) -> Any:
    """The record at byte ``span`` of a JSON or JSON Lines file, decoded (see :func:`iter_spans`)."""
    with open(path, "rb") as f:
        f.seek(span[0])
        return json.loads(f.read(span[1] - span[0]).decode("utf-8"))


def _turns(obj: Any) -> tuple[str, list] | None:
    for key in ("messages", "conversations"):
        if isinstance(obj, dict) and isinstance(obj.get(key), list):
            return key, obj[key]
    return None


def detect_format(records: Sequence[tuple[int, int, Any]], file: str) -> str:
    """The format of one file's records (``(index, line, obj)``), by the rule in the module doc.

    Raises:
        DataError: ``unknown_format`` for a file mixing layouts.
    """
    first: dict[str, int] = {}
    for _, line, obj in records:
        found = _turns(obj)
        if found is None:
            continue
        turns = [t for t in found[1] if isinstance(t, dict)]
        if any("role" in t or "content" in t for t in turns):
            first.setdefault("role/content", line)
            if any(isinstance(t.get("content"), list) for t in turns):
                first.setdefault("content parts", line)
        elif turns:
            first.setdefault("from/value", line)
        values = [t.get("value") for t in turns if isinstance(t.get("value"), str)]
        if "image" in obj or "images" in obj or any(PLACEHOLDER in v for v in values):
            first.setdefault("llava", line)
        if any("<img>" in v for v in values):
            first.setdefault("<img> tags", line)

    def mixed(a: str, b: str) -> DataError:
        return DataError(
            UNKNOWN_FORMAT,
            f"the file mixes {a} records (line {first[a]}) and {b} records (line {first[b]}); "
            f"set data.format (--format) to one of {', '.join(FORMATS)}",
            file,
        )

    if "role/content" in first and "from/value" in first:
        raise mixed("role/content", "from/value")
    if "role/content" in first:
        return "openai" if "content parts" in first else "sharegpt"
    if "llava" in first and "<img> tags" in first:
        raise DataError(
            UNKNOWN_FORMAT,
            f"the file mixes Monkey <img>path</img> tags (line {first['<img> tags']}) and LLaVA "
            f"image fields or <image> placeholders (line {first['llava']}); set data.format "
            "(--format) to monkey or llava",
            file,
        )
    return "llava" if "llava" in first else "monkey"


class Samples(Sequence):
    """The valid samples of one or more data files, parsed again each time one is used.

    Construction reads every record once to decide each file's format (``auto``) and once more
    to parse and check it; bad records go to ``errors`` (or the first raises). For a valid sample only its place stays in memory, in arrays of
    fixed-size numbers (about 40 bytes a sample): its file, its byte span (a JSON record) or row
    (a table), its line and index. ``samples[i]`` reads that record back and parses it, so the
    memory of a run does not grow with the text of its records. Each record
    is shaped (``columns``, the_cauldron's ``texts``: :mod:`monkeytune.data.columns`) before its
    format is detected and it is parsed, each time it is read.

    Args:
        paths: A data file or a list of them.
        errors: If given, bad records are appended here and reading goes on (a file that
            cannot be read, or a JSON list that breaks, is one error and reading goes on
            with the next file); otherwise the first bad record raises.
        format: ``auto`` (detect per file, see the module doc) or a format name.
        image_root: Folder relative image paths resolve against (default: each file's folder).
        allow_empty_answers: Accept assistant turns without text.
        formats: If given, filled with the format used for each file.
        columns: ``data.columns``: the data's own names of record fields (``{messages: dialog}``).
        load_options: ``datasets.load_dataset`` keyword arguments for ``hf:`` dataset names.
        visit: Called with ``(i, sample)`` for each valid sample as it is read, so a caller
            can work on it without parsing it again (a :class:`DataError` it raises is
            handled like a bad record's).

    Raises:
        DataError: on the first problem when ``errors`` is ``None``.
        ValueError: an unknown ``format``.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        errors: list[DataError] | None = None,
        format: str = "auto",
        image_root: str | None = None,
        allow_empty_answers: bool = False,
        formats: dict[str, str] | None = None,
        columns: dict[str, str] | None = None,
        load_options: dict | None = None,
        visit: Callable[[int, Sample], None] | None = None,
    ):
        if format not in FORMAT_CHOICES:
            raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMAT_CHOICES)}")
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.image_root, self.allow_empty_answers = image_root, allow_empty_answers
        self.columns, self.load_options = dict(columns or {}), dict(load_options or {})
        self._shapes: dict[str, RecordShape] = {}
        self._files: list[str] = []
        self._formats: list[str] = []
        self._file = array("i")
        self._start, self._end, self._line, self._index = array("q"), array("q"), array("q"), array("q")

        def fault(e: DataError) -> None:
            if errors is None:
                raise e
            errors.append(e)

        for path in map(str, paths):
            try:
                fmt = format if format != "auto" else detect_format(self._until_fault(path), path)
            except DataError as e:
                fault(e)
                continue
            if formats is not None:
                formats[path] = fmt
            self._files.append(path)
            self._formats.append(fmt)
            records = iter_spans(path, self.columns, self.load_options)
            try:
                for index, line, obj, span in records:
                    try:
                        if isinstance(obj, DataError):
                            raise obj
                        sample = parse_record(self._shaped(obj, path, line, index), fmt, path, line, index,
                                              image_root, allow_empty_answers)
                    except DataError as e:
                        fault(self._shape(path).in_file_terms(e, obj))
                        continue
                    self._add(len(self._files) - 1, span, line, index)
                    if visit is not None:
                        visit(len(self._index) - 1, sample)
            except DataError as e:
                fault(e)  # a file that cannot be read, or a JSON list that breaks: the records before it stay

    @property
    def file_formats(self) -> dict[str, str]:
        """The format each read file was parsed with."""
        return dict(zip(self._files, self._formats))

    def state(self) -> dict[str, Any]:
        """The places as arrays (what :meth:`from_state` takes)."""
        return {"files": np.array(json.dumps(self._files)), "formats": np.array(json.dumps(self._formats)),
                "file_of": np.frombuffer(self._file, np.int32), "start": np.frombuffer(self._start, np.int64),
                "end": np.frombuffer(self._end, np.int64), "line": np.frombuffer(self._line, np.int64),
                "index": np.frombuffer(self._index, np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, Any], image_root: str | None = None, allow_empty_answers: bool = False,
                   columns: dict[str, str] | None = None, load_options: dict | None = None) -> Samples:
        """Samples rebuilt from :meth:`state`, without reading the files."""
        self = cls.__new__(cls)
        self.image_root, self.allow_empty_answers = image_root, allow_empty_answers
        self.columns, self.load_options = dict(columns or {}), dict(load_options or {})
        self._shapes = {}
        self._files, self._formats = json.loads(str(state["files"])), json.loads(str(state["formats"]))
        self._file = array("i", state["file_of"].astype(np.int32).tobytes())
        self._start, self._end, self._line, self._index = (
            array("q", state[k].astype(np.int64).tobytes()) for k in ("start", "end", "line", "index"))
        return self

    def _add(self, file: int, span: tuple[int, int] | None, line: int | None, index: int) -> None:
        self._file.append(file)
        self._start.append(span[0] if span else -1)
        self._end.append(span[1] if span else -1)
        self._line.append(-1 if line is None else line)
        self._index.append(index)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        i %= len(self)
        path, fmt = self._files[self._file[i]], self._formats[self._file[i]]
        index, line = self._index[i], (None if self._line[i] < 0 else self._line[i])
        if self._start[i] < 0:
            obj = table_record(path, index, self.columns, self.load_options)
        else:
            obj = read_span(path, (self._start[i], self._end[i]))
        obj = self._shaped(obj, path, line, index)
        return parse_record(obj, fmt, path, line, index, self.image_root, self.allow_empty_answers)

    def _shaped(self, obj: Any, path: str, line: int | None, index: int) -> Any:
        """``obj`` shaped for the parser. Without ``columns``, only a record in the_cauldron's
        ``texts`` layout needs it; every other record goes straight to the parser."""
        if self.columns or (isinstance(obj, dict) and "texts" in obj):
            return self._shape(path)(obj, path, line, index)
        return obj

    def _shape(self, path: str) -> RecordShape:
        if path not in self._shapes:
            self._shapes[path] = RecordShape(self.columns, renamed=is_table(path))
        return self._shapes[path]

    def _until_fault(self, path: str) -> Iterator[tuple[int, int | None, Any]]:
        """A file's shaped records for format detection (one that cannot be shaped is its
        error); a JSON list that breaks ends them (the fault is reported by the parsing pass)
        and a file that cannot be read raises."""
        records = iter_spans(path, self.columns, self.load_options)
        while True:
            try:
                index, line, obj, _ = next(records)
            except StopIteration:
                return
            except DataError as e:
                if e.kind == DATA_FILE:
                    raise
                return
            if not isinstance(obj, DataError):
                try:
                    obj = self._shaped(obj, path, line, index)
                except DataError as e:
                    obj = e
            yield index, line, obj


def load_samples(paths: str | os.PathLike | Sequence[str | os.PathLike], *args: Any, **kwargs: Any) -> list[Sample]:
    """Every valid sample of one or more data files, parsed, in file order: :class:`Samples`
    (same arguments, same errors) as a list."""
    return list(Samples(paths, *args, **kwargs))
