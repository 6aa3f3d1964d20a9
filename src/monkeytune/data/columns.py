"""Records whose fields have other names, and the_cauldron's ``texts`` layout, shaped before parsing.

``data.columns`` maps the project's field names to a data set's own (``{messages: dialog,
images: pics}``, as LLaMA-Factory's ``dataset_info`` ``columns`` does). Tables rename their
columns once (:mod:`monkeytune.data.tables`); a JSON record is renamed as it is read. Either way
the record then goes through format detection and parsing as if it had been written with the
project's names, and errors name the data's own fields again (``dialog[2].content``).

The_cauldron (``HuggingFaceM4/the_cauldron``) keeps a record's turns in ``texts``, a list of
``{"user", "assistant", "source"}`` pairs, and its pictures in ``images``, with no placeholder:
the pictures belong at the start of the first user turn. Such a record (``texts`` and no
``messages`` or ``conversations``) is read as the sharegpt record
``{"messages": [{"role": "user", "content": "<image>" * len(images) + user}, {"role":
"assistant", "content": assistant}, ...], "images": images}``. Turns that already hold
``<image>`` placeholders keep them instead. ``source`` is ignored. A ``texts`` cell stored as a
dict of lists (how ``datasets`` stores ``Sequence`` of a dict) is read pair by pair too. Errors
name the pair's field: ``texts[1].assistant: empty answer ...``.
"""

from __future__ import annotations

import re
from typing import Any

from monkeytune.data.errors import MALFORMED_RECORD, DataError

# The record fields a mapping may name (the columns every layout reads).
FIELDS = ("id", "messages", "conversations", "image", "images", "texts")
TURN_FIELDS = ("messages", "conversations", "texts")
PLACEHOLDER = "<image>"
_MESSAGE = re.compile(r"messages\[(\d+)\](?:\.content)?")


def columns_problem(columns: Any) -> str | None:
    """Why ``columns`` is not a valid ``data.columns`` mapping, or None when it is."""
    if not isinstance(columns, dict):
        return f"must be a mapping of field names to column names, got {type(columns).__name__}"
    for name, column in columns.items():
        if name not in FIELDS:
            return f"unknown field {name!r}; map one of {', '.join(FIELDS)}"
        if not isinstance(column, str) or not column:
            return f"{name}: the column must be a non-empty string, got {column!r}"
    if len(set(columns.values())) < len(columns):
        return "two fields are mapped to the same column"
    return None


class RecordShape:
    """Turns a record as read into the record the parser expects (see the module docstring).

    Args:
        columns: ``data.columns`` (field name -> the data's column name).
        renamed: The record's fields already carry the project's names (a table renames its
            columns once); only the ``texts`` layout is converted then.
    """

    def __init__(self, columns: dict[str, str] | None = None, renamed: bool = False):
        self.columns = dict(columns or {})
        self._renames = {} if renamed else {c: f for f, c in self.columns.items() if c != f}

    def __call__(self, obj: Any, file: str, line: int | None, index: int) -> Any:
        """The shaped record; ``obj`` itself is left unchanged.

        Raises:
            DataError: ``malformed_record`` for a record without a mapped turns column, or a
                ``texts`` pair that is not two strings.
        """
        if not isinstance(obj, dict):
            return obj
        if self._renames:
            obj = self._rename(obj, file, line, index)
        if "texts" in obj and not any(k in obj for k in ("messages", "conversations")):
            obj = self._from_texts(obj, file, line, index)
        return obj

    def _rename(self, obj: dict, file: str, line: int | None, index: int) -> dict:
        for field in TURN_FIELDS:
            column = self.columns.get(field)
            if column is not None and column not in obj:
                raise DataError(MALFORMED_RECORD, f"missing field (data.columns maps {field} to it)",
                                file, line, index, column, obj.get(self.columns.get("id", "id")))
        # A mapped field wins over a field of the same name the record also has; the mapped
        # columns are not kept under their own names as well (they would be extra fields).
        out = {k: v for k, v in obj.items() if k not in self.columns and k not in self._renames}
        for column, field in self._renames.items():
            if column in obj:
                out[field] = obj[column]
        return out

    def _from_texts(self, obj: dict, file: str, line: int | None, index: int) -> dict:
        pairs = self._pairs(obj["texts"], file, line, index, obj.get("id"))
        turns = [{"role": role, "content": text} for pair in pairs for role, text in zip(("user", "assistant"), pair)]
        images = obj.get("images", obj.get("image"))
        count = len(images) if isinstance(images, list) else int(images is not None)
        if turns and count and not any(PLACEHOLDER in t["content"] for t in turns):
            turns[0] = {"role": "user", "content": PLACEHOLDER * count + turns[0]["content"]}
        out = {k: v for k, v in obj.items() if k != "texts"}
        out["messages"] = turns
        return out

    def _pairs(self, texts: Any, file: str, line: int | None, index: int, sid: Any) -> list[tuple[str, str]]:
        name = self.columns.get("texts", "texts")

        def bad(reason: str, where: str = "") -> DataError:
            return DataError(MALFORMED_RECORD, reason, file, line, index, name + where, sid)

        if isinstance(texts, dict) and all(isinstance(v, list) for v in texts.values()):
            keys = list(texts)  # a dict of lists: pair k is made of each list's item k
            texts = [dict(zip(keys, values)) for values in zip(*texts.values())]
        if not isinstance(texts, list) or not texts:
            got = "an empty list" if texts == [] else _kind(texts)
            raise bad(f"must be a non-empty list of {{user, assistant}} pairs, got {got}")
        pairs = []
        for k, pair in enumerate(texts):
            if not isinstance(pair, dict):
                raise bad(f"a pair must be an object with user and assistant, got {_kind(pair)}", f"[{k}]")
            for role in ("user", "assistant"):
                if not isinstance(pair.get(role), str):
                    raise bad(f"must be a string, got {_kind(pair.get(role))}", f"[{k}].{role}")
            pairs.append((pair["user"], pair["assistant"]))
        return pairs

    def in_file_terms(self, error: DataError, raw: Any) -> DataError:
        """``error`` (about the shaped record) naming the field as the data writes it."""
        field, name = error.field, self.columns.get("texts", "texts")
        # raw as read: a table's columns already renamed, a JSON record's not.
        texts = (isinstance(raw, dict) and field.startswith("messages") and ("texts" in raw or name in raw)
                 and not any(k in raw for k in ("messages", "conversations")))
        match = _MESSAGE.fullmatch(field) if texts else None
        if match:
            k = int(match.group(1))
            field = f"{name}[{k // 2}].{'assistant' if k % 2 else 'user'}"
        elif texts:
            field = name
        else:
            head = re.match(r"[^.\[]+", field)
            if head and head.group(0) in self.columns:
                field = self.columns[head.group(0)] + field[head.end():]
        if field == error.field:
            return error
        return DataError(error.kind, error.reason, error.file, error.line, error.index, field, error.sample_id)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
