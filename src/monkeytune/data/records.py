"""The parsed form of a conversation record, and the one error type for bad data.

Every supported file format (see :mod:`monkeytune.data.formats`) is parsed once into a
:class:`Sample`: its turns hold text pieces and :class:`ImageRef` objects in order, so each image
sits exactly where its placeholder was (no tag is parsed twice, no parallel list of paths).

Every problem becomes a :class:`DataError` that names the file, the line (JSON Lines line, or the
line where a JSON-list record starts, plus its index) and the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from monkeytune.tokenizer.base import split_image_tags

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLE_ALIASES = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT, "system": SYSTEM}


def turn_order_problem(role: str, position: int, turns: int) -> str | None:
    """Why a turn of ``role`` cannot come here, or None: the one rule every reader of turns applies.

    Args:
        role: The turn's role (``USER``, ``ASSISTANT`` or ``SYSTEM``).
        position: Its index among all the messages, the system turn included.
        turns: How many user and assistant turns came before it.
    """
    if role == SYSTEM:
        return None if position == 0 else "a system turn is only allowed first"
    expected = USER if turns % 2 == 0 else ASSISTANT
    if role != expected:
        return f"expected a {expected} turn here (turns must alternate user/assistant, starting with user)"
    return None

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


@dataclass(frozen=True)
class ImageRef:
    """One image of a sample, resolved once by :func:`monkeytune.data.images.resolve_image`.

    Attributes:
        source: Absolute file path, a ``data:image/...;base64,`` URI for an inline image, or a
            ``table:`` reference to an image stored in a table (:mod:`monkeytune.data.tables`).
        field: Where the record names it, e.g. ``images[1]`` or ``conversations[0].value``.
    """

    source: str
    field: str = ""

    @property
    def inline(self) -> bool:
        return self.source.startswith("data:")

    @property
    def embedded(self) -> bool:
        """Stored in a table's cell (:mod:`monkeytune.data.tables`), read when decoded."""
        return self.source.startswith("table:")

    def display(self) -> str:
        """The source for messages: inline images shortened to their media type, embedded ones
        to their table's file name, row and cell."""
        if self.inline:
            return self.source.split(",", 1)[0] + ",..."
        if self.embedded:
            table, _, cell = self.source[len("table:"):].rpartition("#")
            row, column, item = cell.split("/")
            return f"{table.rsplit('/', 1)[-1]} row {row}, {column}" + (f"[{item}]" if item != "-1" else "")
        return self.source


Part = Union[str, ImageRef]


@dataclass
class Turn:
    """One message: text pieces and images in order.

    Attributes:
        role: ``user``, ``assistant`` or ``system``.
        parts: Strings and :class:`ImageRef` objects in order of appearance.
        field: The record field holding the message, e.g. ``messages[2]`` (for errors).
    """

    role: str
    parts: list[Part]
    field: str = ""

    @classmethod
    def from_text(
        cls, role: str, text: str, resolve: Callable[[str], str] | None = None, field: str = ""
    ) -> "Turn":
        """A turn from Monkey's inline syntax, ``<img>path</img>`` tags in the text.

        Args:
            role: Canonical role.
            text: Text that may hold image tags.
            resolve: Maps a tag's path to the stored source (default: kept as written).
            field: Field of the text, recorded on each image.

        Raises:
            ValueError: unbalanced or empty tags.
        """
        pieces, spans = split_image_tags(text)
        parts: list[Part] = []
        for k, piece in enumerate(pieces):
            if piece:
                parts.append(piece)
            if k < len(spans):
                path = spans[k].path
                parts.append(ImageRef(resolve(path) if resolve else path, field))
        return cls(role, parts, field)

    @property
    def text(self) -> str:
        """The turn in Monkey's inline syntax (what ``monkeytune data convert`` writes)."""
        return "".join(p if isinstance(p, str) else f"<img>{p.source}</img>" for p in self.parts)

    @property
    def images(self) -> list[ImageRef]:
        return [p for p in self.parts if isinstance(p, ImageRef)]

    @property
    def plain_text(self) -> str:
        """The text pieces alone."""
        return "".join(p for p in self.parts if isinstance(p, str))


@dataclass
class Sample:
    """A validated conversation.

    Attributes:
        id: The record's ``id`` (or ``"<file>:<index>"`` when absent).
        turns: Alternating user/assistant turns, first user, last assistant.
        system: System prompt from a leading ``system`` turn, or ``None`` for the template default.
        file: Data file the record came from.
        line: 1-based line where the record starts.
        index: 0-based record index within the file.
        format: The file format the record was read as (``monkey``, ``llava``, ...).
        extra: Other top-level fields of the record.
    """

    id: Any
    turns: list[Turn]
    system: str | None
    file: str
    line: int
    index: int
    format: str = "monkey"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[ImageRef]:
        """Every image in order of appearance."""
        return [ref for t in self.turns for ref in t.images]

    def error(self, kind: str, reason: str, field: str = "") -> DataError:
        return DataError(kind, reason, self.file, self.line, self.index, field, self.id)
