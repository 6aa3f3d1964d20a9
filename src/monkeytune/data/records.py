"""Reading conversation files: JSON lists or JSON Lines, validated record by record.

A record looks like::

    {"id": "q1", "conversations": [
        {"from": "user", "value": "<img>images/cat.jpg</img> What is this?"},
        {"from": "assistant", "value": "A cat."}]}

Roles may be spelled ``user``/``human`` and ``assistant``/``gpt`` (any case); an optional
first ``system`` turn overrides the template's system prompt. After it, turns must alternate
user, assistant, user, ... and end with an assistant turn. Image paths inside ``<img>`` tags
are resolved against the folder of the data file unless absolute.

Every problem becomes a :class:`DataError` that names the file, the line (JSON Lines line, or the
line where a JSON-list record starts, plus its index) and the offending field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from monkeytune.tokenizer.base import split_image_tags

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLE_ALIASES = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT, "system": SYSTEM}

# Error kinds, used to group findings in reports.
MALFORMED_JSON = "malformed_json"
MALFORMED_RECORD = "malformed_record"
BAD_ROLES = "bad_roles"
UNBALANCED_IMAGE_TAGS = "unbalanced_image_tags"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
TOO_LONG = "too_long"
TEMPLATE = "template"


class DataError(ValueError):
    """A problem with one record, located precisely.

    Attributes:
        kind: One of the error-kind constants of this module (``too_long``, ``bad_roles``, ...).
        file: Data file path.
        line: 1-based line where the record starts (``None`` if unknown).
        index: 0-based record index within the file (``None`` for file-level errors).
        field: Dotted path of the offending field, e.g. ``conversations[2].from`` ("" if none).
        reason: Human-readable explanation.
        sample_id: The record's ``id`` when it could be read.
    """

    def __init__(
        self,
        kind: str,
        reason: str,
        file: str = "",
        line: int | None = None,
        index: int | None = None,
        field: str = "",
        sample_id: Any = None,
    ):
        self.kind = kind
        self.reason = reason
        self.file = str(file)
        self.line = line
        self.index = index
        self.field = field
        self.sample_id = sample_id
        super().__init__(self.describe())

    @property
    def location(self) -> str:
        loc = self.file
        if self.line is not None:
            loc += f":{self.line}"
        if self.index is not None:
            loc += f" (record {self.index})"
        return loc

    def describe(self) -> str:
        parts = [self.location]
        if self.field:
            parts.append(self.field)
        parts.append(self.reason)
        return ": ".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, as written to skip reports."""
        return {
            "id": self.sample_id,
            "file": self.file,
            "line": self.line,
            "index": self.index,
            "kind": self.kind,
            "field": self.field,
            "reason": self.reason,
        }


@dataclass
class Turn:
    """One message: ``role`` is ``user``, ``assistant`` or ``system``; ``text`` may hold image tags."""

    role: str
    text: str


@dataclass
class Sample:
    """A validated conversation.

    Attributes:
        id: The record's ``id`` (or ``"<file>:<index>"`` when absent).
        turns: Alternating user/assistant turns, first user, last assistant.
        system: System prompt from a leading ``system`` turn, or ``None`` for the template default.
        images: Resolved image paths in order of appearance.
        image_fields: Field of each image's tag, e.g. ``conversations[2].value``.
        file: Data file the record came from.
        line: 1-based line where the record starts.
        index: 0-based record index within the file.
    """

    id: Any
    turns: list[Turn]
    system: str | None
    images: list[str]
    image_fields: list[str]
    file: str
    line: int
    index: int
    extra: dict[str, Any] = field(default_factory=dict)

    def error(self, kind: str, reason: str, field: str = "") -> DataError:
        return DataError(kind, reason, self.file, self.line, self.index, field, self.id)


def iter_raw_records(path: str | os.PathLike) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(index, line, obj)`` for every record of a JSON-list or JSON-Lines file.

    The format is detected from the first non-blank character (``[`` means a JSON list). Blank
    JSONL lines are ignored. An undecodable JSONL line is yielded as a :class:`DataError`
    (``malformed_json``) in place of ``obj`` so later lines are still read; an undecodable JSON
    list raises it, since nothing after the fault can be located reliably.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(MALFORMED_JSON, f"cannot read data file: {e}", path) from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_json_list(text, path)
        return
    index = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            # A bad line does not hide the lines after it: hand the error over and go on.
            obj = DataError(
                MALFORMED_JSON, f"invalid JSON: {e.msg} (column {e.colno})", path, lineno, index
            )
        yield index, lineno, obj
        index += 1


def _iter_json_list(text: str, path: str) -> Iterator[tuple[int, int, Any]]:
    # Decode the list element by element so that each record keeps the line it starts on;
    # json.load would only give us the index.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    index = 0

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, msg: str) -> DataError:
        lineno = 1 + text.count("\n", 0, p)
        return DataError(MALFORMED_JSON, f"invalid JSON list: {msg}", path, lineno, index)

    last = pos
    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        line += text.count("\n", last, pos)
        last = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from e
        yield index, line, obj
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


def parse_record(obj: Any, file: str, line: int, index: int) -> Sample:
    """Validate one decoded record and turn it into a :class:`Sample`.

    Raises:
        DataError: ``malformed_record`` for wrong structure or types, ``bad_roles`` for unknown
            roles or turns out of order, ``unbalanced_image_tags`` for bad ``<img>`` tags.
    """

    def err(kind: str, reason: str, fld: str = "", sid: Any = None) -> DataError:
        return DataError(kind, reason, file, line, index, fld, sid)

    if not isinstance(obj, dict):
        raise err(MALFORMED_RECORD, f"a record must be a JSON object, got {type(obj).__name__}")
    sid = obj.get("id", f"{Path(file).name}:{index}")
    convs = obj.get("conversations")
    if convs is None:
        raise err(MALFORMED_RECORD, "missing field", "conversations", sid)
    if not isinstance(convs, list) or not convs:
        raise err(MALFORMED_RECORD, "must be a non-empty list of turns", "conversations", sid)

    turns: list[Turn] = []
    system: str | None = None
    images: list[str] = []
    image_fields: list[str] = []
    for i, turn in enumerate(convs):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise err(MALFORMED_RECORD, "a turn must be an object with 'from' and 'value'", where, sid)
        if "from" not in turn:
            raise err(MALFORMED_RECORD, "missing field", f"{where}.from", sid)
        if "value" not in turn:
            raise err(MALFORMED_RECORD, "missing field", f"{where}.value", sid)
        role_raw, value = turn["from"], turn["value"]
        if not isinstance(role_raw, str) or role_raw.lower() not in ROLE_ALIASES:
            raise err(
                BAD_ROLES,
                f"unknown role {role_raw!r}; use user/human, assistant/gpt or a first system turn",
                f"{where}.from",
                sid,
            )
        if not isinstance(value, str):
            raise err(MALFORMED_RECORD, f"must be a string, got {type(value).__name__}", f"{where}.value", sid)
        role = ROLE_ALIASES[role_raw.lower()]
        if role == SYSTEM:
            if i != 0:
                raise err(BAD_ROLES, "a system turn is only allowed first", f"{where}.from", sid)
            if "<img>" in value or "</img>" in value:
                raise err(UNBALANCED_IMAGE_TAGS, "images are not allowed in the system turn", f"{where}.value", sid)
            system = value
            continue
        expected = USER if len(turns) % 2 == 0 else ASSISTANT
        if role != expected:
            raise err(
                BAD_ROLES,
                f"expected a {expected} turn here (turns must alternate user/assistant, starting "
                f"with user), got {role_raw!r}",
                f"{where}.from",
                sid,
            )
        try:
            _, spans = split_image_tags(value)
        except ValueError as e:
            raise err(UNBALANCED_IMAGE_TAGS, str(e), f"{where}.value", sid) from e
        images.extend(resolve_image_path(span.path, file) for span in spans)
        image_fields.extend(f"{where}.value" for _ in spans)
        turns.append(Turn(role, value))
    if not turns:
        raise err(MALFORMED_RECORD, "no user/assistant turns", "conversations", sid)
    if turns[-1].role != ASSISTANT:
        raise err(
            BAD_ROLES,
            "the conversation ends with a user turn: nothing to learn from it",
            f"conversations[{len(convs) - 1}].from",
            sid,
        )
    extra = {k: v for k, v in obj.items() if k not in ("id", "conversations")}
    return Sample(sid, turns, system, images, image_fields, str(file), line, index, extra)


def load_samples(
    paths: str | os.PathLike | list[str | os.PathLike], errors: list[DataError] | None = None
) -> list[Sample]:
    """Read and validate every record of one or more data files.

    Args:
        paths: A data file or a list of them.
        errors: If given, bad records are appended here and reading goes on; otherwise the
            first bad record raises.

    Returns:
        The valid samples, in file order.

    Raises:
        DataError: on the first problem when ``errors`` is ``None``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    samples: list[Sample] = []
    for path in paths:
        path = str(path)
        try:
            for index, line, obj in iter_raw_records(path):
                try:
                    if isinstance(obj, DataError):
                        raise obj
                    samples.append(parse_record(obj, path, line, index))
                except DataError as e:
                    if errors is None:
                        raise
                    errors.append(e)
        except DataError as e:
            # An undecodable JSON list stops this file.
            if errors is None or e.kind != MALFORMED_JSON:
                raise
            errors.append(e)
    return samples


def resolve_image_path(path: str, data_file: str) -> str:
    """Resolve an ``<img>`` path the way records do: relative to the data file's folder."""
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(data_file)), path)
