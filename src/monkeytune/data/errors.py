"""The one error type for bad data, and its kinds.

Every problem a record can have becomes a :class:`DataError` that names the file, the line (JSON
Lines line, the line where a JSON-list record starts, or a table's row) and the offending field.
A good record never touches this module.
"""

from __future__ import annotations

from typing import Any

# Error kinds, used to group findings in reports and skip summaries.
DATA_FILE = "data_file"  # the data file itself cannot be read (directory, permissions, ...)
MALFORMED_JSON = "malformed_json"  # invalid UTF-8 or invalid JSON on a line
MALFORMED_RECORD = "malformed_record"
UNKNOWN_FORMAT = "unknown_format"
BAD_ROLES = "bad_roles"
UNBALANCED_IMAGE_TAGS = "unbalanced_image_tags"  # Monkey <img>...</img> tags that do not pair up
IMAGE_MISMATCH = "image_mismatch"  # <image> placeholders and listed images differ in number
EMPTY_ANSWER = "empty_answer"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
TOO_LONG = "too_long"
TEMPLATE = "template"
TOO_MANY_SKIPPED = "too_many_skipped"


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

    def __reduce__(self):
        # DataLoader workers pickle exceptions; keep every attribute across the process boundary.
        return (DataError, (self.kind, self.reason, self.file, self.line, self.index, self.field, self.sample_id))

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
