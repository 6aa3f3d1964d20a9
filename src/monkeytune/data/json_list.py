"""A JSON list (the layout LLaVA ships) read record by record from the file, in a bounded buffer.

``json.load`` would hold the whole file, its text and every record at once: about 5 bytes of
memory per byte of data, gigabytes for a million records. Here the file is read line by line
into a buffer of text that holds the record being decoded and little more; each record is
decoded with :meth:`json.JSONDecoder.raw_decode` and comes out with the line it starts on and
its byte span, so it can be read back alone later. Line numbers come from the buffer's line
table (positions only move forward), and the buffer drops what was consumed, so reading is
linear in the file's size and memory does not grow with it.

A line that is not valid UTF-8 is decoded with U+FFFD in place of its bad bytes so that the list
stays parseable, and the record spanning it becomes a ``malformed_json`` error naming the line
and byte column; every other record is still read.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from typing import Any, BinaryIO, Iterator

from monkeytune.data.errors import MALFORMED_JSON, DataError

READ_AHEAD_BYTES = 1 << 20  # text read ahead at a time; a record longer than this widens the buffer
_WS = " \t\r\n"


def utf8_error(e: UnicodeDecodeError, raw: bytes, path: str, line: int, index: int | None = None) -> DataError:
    """The ``malformed_json`` error of a line that is not valid UTF-8, naming the bad byte."""
    return DataError(MALFORMED_JSON, f"invalid UTF-8 at byte {e.start + 1} of the line "
                     f"({raw[e.start:e.start + 4]!r}); re-encode the file as UTF-8", path, line, index)


class _Buffer:
    """The decoded text of consecutive whole lines of the file, with where each line starts.

    Attributes:
        text: The lines' text, newlines kept.
        starts: Position in ``text`` where each line starts.
        bytes: Byte offset in the file of each line's start.
        first_line: Line number (1-based) of ``text``'s first line.
        bad: ``malformed_json`` errors of lines that are not valid UTF-8, by line number.
        eof: Whether the file's last line is in the buffer.
    """

    def __init__(self, f: BinaryIO, path: str):
        self.f, self.path = f, path
        self.text, self.starts, self.bytes = "", [], []
        self.first_line, self.next_byte, self.eof = 1, 0, False
        self.bad: dict[int, DataError] = {}

    def read_more(self) -> bool:
        """Append about :data:`READ_AHEAD_BYTES` of whole lines; False at the end of the file."""
        if self.eof:
            return False
        parts, size, length = [], 0, len(self.text)
        while size < READ_AHEAD_BYTES:
            raw = self.f.readline()
            if not raw:
                self.eof = True
                break
            start = self.next_byte
            self.next_byte += len(raw)
            if start == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], 3  # a UTF-8 byte-order mark, as some editors write
            lineno = self.first_line + len(self.starts)
            self.starts.append(length)
            self.bytes.append(start)
            try:
                parts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                self.bad[lineno] = utf8_error(e, raw, self.path, lineno)
                parts.append(raw.decode("utf-8", errors="replace"))
            size += len(raw)
            length += len(parts[-1])
        self.text += "".join(parts)
        return bool(parts)

    def line_index(self, p: int) -> int:
        return max(0, bisect_right(self.starts, p) - 1)

    def line_at(self, p: int) -> int:
        return self.first_line + self.line_index(p)

    def byte_at(self, p: int) -> int:
        k = self.line_index(p)
        return self.bytes[k] + len(self.text[self.starts[k]:p].encode("utf-8"))

    def drop_before(self, p: int) -> int:
        """Forget the lines before the one holding ``p`` once they are a buffer's worth (so
        each line is copied a bounded number of times); returns ``p`` in the kept text."""
        if p < READ_AHEAD_BYTES:
            return p
        k = self.line_index(p)
        if k == 0:
            return p
        cut = self.starts[k]
        self.text = self.text[cut:]
        self.starts = [s - cut for s in self.starts[k:]]
        self.bytes = self.bytes[k:]
        self.first_line += k
        self.bad = {ln: e for ln, e in self.bad.items() if ln >= self.first_line}
        return p - cut

    def skip_ws(self, p: int) -> int:
        """The first non-blank position from ``p``, reading on as needed (``len(text)`` at the end)."""
        while True:
            while p < len(self.text) and self.text[p] in _WS:
                p += 1
            if p < len(self.text) or not self.read_more():
                return p


def _incomplete(buffer: _Buffer, e: json.JSONDecodeError) -> bool:
    # A record cut by the buffer's end fails at the end of the text, or, for a string, where
    # the string starts; more of the file may complete it.
    return not buffer.eof and (e.pos >= len(buffer.text.rstrip(_WS)) or e.msg.startswith("Unterminated string"))


def iter_json_list(f: BinaryIO, path: str) -> Iterator[tuple[int, int, Any, tuple[int, int] | None]]:
    """Yield ``(index, line, obj, (start_byte, end_byte))`` for each element of a JSON list.

    ``obj`` is a ``malformed_json`` :class:`DataError` for a record spanning a line that is not
    valid UTF-8 (its span is then None: its text no longer matches the file's bytes).

    Raises:
        DataError: ``malformed_json`` when the list's structure breaks: nothing after the fault
            can be located reliably.
    """
    buffer, decoder, index = _Buffer(f, path), json.JSONDecoder(), 0

    def fail(p: int, msg: str) -> DataError:
        return DataError(MALFORMED_JSON, f"invalid JSON list: {msg}", path, buffer.line_at(p), index)

    pos = buffer.skip_ws(0) + 1  # past the '[' the caller found
    pos = buffer.skip_ws(pos)
    if pos < len(buffer.text) and buffer.text[pos] == "]":
        return _check_rest(buffer, pos, fail)
    while True:
        pos = buffer.drop_before(buffer.skip_ws(pos))
        obj, end = _decode_one(buffer, decoder, pos, fail)
        start_line, end_line = buffer.line_at(pos), buffer.line_at(end)
        broken = [buffer.bad[ln] for ln in range(start_line, end_line + 1) if ln in buffer.bad]
        span: tuple[int, int] | None = (buffer.byte_at(pos), buffer.byte_at(end))
        if broken:
            # Named at the line the record starts on, like every record error; the reason
            # gives the line of the bad byte.
            obj = DataError(broken[0].kind, f"line {broken[0].line}: {broken[0].reason}", path, start_line, index)
            span = None
        yield index, start_line, obj, span
        index += 1
        pos = buffer.skip_ws(end)
        if pos >= len(buffer.text):
            raise fail(pos, "missing closing ']'")
        if buffer.text[pos] == "]":
            return _check_rest(buffer, pos, fail)
        if buffer.text[pos] != ",":
            raise fail(pos, "expected ',' or ']' between records")
        pos += 1


def _decode_one(buffer: _Buffer, decoder: json.JSONDecoder, pos: int, fail) -> tuple[Any, int]:
    """The element at ``pos`` and where it ends, reading on while the buffer cuts it short."""
    while True:
        try:
            obj, end = decoder.raw_decode(buffer.text, pos)
        except json.JSONDecodeError as e:
            if _incomplete(buffer, e) and buffer.read_more():
                continue
            raise fail(e.pos, e.msg) from None
        # A number (or true/false/null) that ends with the buffer may go on in the file.
        if buffer.skip_ws(end) < len(buffer.text) or buffer.eof:
            return obj, end


def _check_rest(buffer: _Buffer, pos: int, fail) -> None:
    # Only blanks may follow the closing ']'.
    after = buffer.skip_ws(pos + 1)
    if after < len(buffer.text):
        raise fail(after, "extra data after the closing ']'")
