"""Messages: what every record becomes, and the four record layouts parsed into it.

Every supported layout is parsed once into a :class:`Sample`: its turns hold text pieces and
:class:`ImageRef` objects in order, so each image sits exactly where its placeholder was (no tag
is parsed twice, no parallel list of paths). A bad record raises a located
:class:`~monkeytune.data.errors.DataError`.

The layouts:

``monkey`` (Monkey / Qwen-VL)
    ``{"conversations": [{"from": "user", "value": "<img>a.jpg</img> What?"}, {"from": "assistant", ...}]}``;
    images inline as ``<img>path</img>``.
``llava`` (LLaVA-1.5 ``llava_v1_5_mix665k.json``)
    ``{"id", "image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat?"},
    {"from": "gpt", "value": "..."}]}``; ``image`` is a string or a list, and each ``<image>``
    placeholder takes the next image.
``sharegpt`` (LLaMA-Factory's ``mllm_demo.json``, ms-swift's multimodal data)
    ``{"messages": [{"role": "user", "content": "<image>Who are they?"}, {"role": "assistant", ...}],
    "images": ["mllm_demo_data/1.jpg"]}``; ``conversations`` with ``from``/``value`` turns is
    accepted too, as LLaMA-Factory's sharegpt tags allow.
``openai`` (OpenAI chat messages with content parts)
    ``{"messages": [{"role": "user", "content": [{"type": "text", "text": "What?"},
    {"type": "image_url", "image_url": {"url": "file:///data/x.png"}}]}, ...]}``; parts of type
    ``text``, ``image`` (``"image": PATH``) and ``image_url`` (a path, ``file://`` URL or
    ``data:image/...;base64`` URI, as a string or ``{"url": ...}``). A part ``{"type": "image"}``
    without a payload takes the next image of the record's ``images`` list, as in the chat layout
    that ``datasets`` and TRL use for vision data.

Roles are ``user``/``human``, ``assistant``/``gpt`` and an optional first ``system`` (any case).
Text-only and multi-image records work in every format. A record of another layout than its
file's is an error with a hint, never a silent text-only sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from monkeytune.data.errors import (
    BAD_ROLES,
    EMPTY_ANSWER,
    IMAGE_MISMATCH,
    MALFORMED_RECORD,
    UNBALANCED_IMAGE_TAGS,
    DataError,
)
from monkeytune.data.views import resolve_image
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


@dataclass(frozen=True)
class ImageRef:
    """One image of a sample, resolved once by :func:`monkeytune.data.views.resolve_image`.

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


FORMATS = ("monkey", "llava", "sharegpt", "openai")
FORMAT_CHOICES = ("auto",) + FORMATS
PLACEHOLDER = "<image>"


class _Parser:
    """Parses one record of a known format; ``err`` builds located errors."""

    def __init__(self, fmt: str, file: str, line: int, index: int, image_root: str | None, allow_empty: bool):
        self.fmt, self.file, self.line, self.index = fmt, file, line, index
        self.image_root, self.allow_empty = image_root, allow_empty
        self.sid: Any = None

    def err(self, kind: str, reason: str, fld: str = "") -> DataError:
        return DataError(kind, reason, self.file, self.line, self.index, fld, self.sid)

    def ref(self, written: Any, fld: str) -> ImageRef:
        if not isinstance(written, str):
            raise self.err(MALFORMED_RECORD, f"an image must be a path string, got {type(written).__name__}", fld)
        try:
            return ImageRef(resolve_image(written, self.file, self.image_root), fld)
        except ValueError as e:
            raise self.err(MALFORMED_RECORD, str(e), fld) from None

    # -- record ------------------------------------------------------------------------------

    def parse(self, obj: Any) -> Sample:
        if not isinstance(obj, dict):
            raise self.err(MALFORMED_RECORD, f"a record must be a JSON object, got {type(obj).__name__}")
        self.sid = obj.get("id", f"{Path(self.file).name}:{self.index}")
        key = "messages" if self.fmt == "openai" else "conversations"
        if self.fmt == "sharegpt" and "messages" in obj:
            key = "messages"
        if key not in obj:
            other = next((k for k in ("messages", "conversations") if k in obj), None)
            if other is not None and not isinstance(obj[other], list):
                key = other  # its type is what is wrong (a whole table column of ints reads as no turns)
            else:
                hint = f" (the record has {other!r}: is data.format right?)" if other else ""
                raise self.err(MALFORMED_RECORD, f"missing field; the {self.fmt} format keeps turns in {key!r}{hint}",
                               key)
        convs = obj[key]
        if not isinstance(convs, list) or not convs:
            got = "null" if convs is None else "an empty list" if convs == [] else type(convs).__name__
            raise self.err(MALFORMED_RECORD, f"must be a non-empty list of turns, got {got}", key)
        images = self.listed_images(obj)
        raw: list[tuple[str, str, list[Part], str]] = []  # role as written, role, parts, field
        for i, turn in enumerate(convs):
            where = f"{key}[{i}]"
            role_raw, role, content, text_field = self.turn_fields(turn, where)
            parts = self.parts(content, text_field, images)
            raw.append((role_raw, role, parts, text_field))
        if images is not None and images[1] < len(images[0]):
            n_used, refs = images[1], images[0]
            mark = "image part" if self.fmt == "openai" else f"{PLACEHOLDER} placeholder"
            raise self.err(
                IMAGE_MISMATCH,
                f"{n_used} {mark}{'s' if n_used != 1 else ''} but {len(refs)} images listed; "
                f"put one {mark} where each image belongs",
                refs[n_used].field,
            )
        return self.build(obj, key, raw)

    def listed_images(self, obj: dict) -> list | None:
        """``[refs, used]`` for the formats that list images apart from the text, else ``None``."""
        present = [k for k in ("image", "images") if k in obj and obj[k] is not None]
        if self.fmt == "openai" and present == ["images"]:
            pass  # the chat layout of datasets and TRL: bare image parts take them in order
        elif self.fmt in ("monkey", "openai"):
            if present:
                how = ("<img>path</img> tags in the text" if self.fmt == "monkey"
                       else "content parts of type image or image_url (and an images list for bare image parts)")
                other = "llava or sharegpt" if self.fmt == "monkey" else "sharegpt"
                raise self.err(
                    MALFORMED_RECORD,
                    f"the {self.fmt} format reads images only from {how}, so this field would be "
                    f"ignored; the record looks like {other} (set data.format)",
                    present[0],
                )
            return None
        refs: list[ImageRef] = []
        for k in present:
            value = obj[k]
            items = [value] if isinstance(value, (str, dict)) else value
            if not isinstance(items, list):
                raise self.err(MALFORMED_RECORD, "must be a path or a list of paths", k)
            for j, item in enumerate(items):
                fld = k if isinstance(value, (str, dict)) else f"{k}[{j}]"
                if isinstance(item, dict):  # ms-swift also writes {"path": ...}
                    item = item.get("path", item.get("url"))
                refs.append(self.ref(item, fld))
        return [refs, 0]

    def turn_fields(self, turn: Any, where: str) -> tuple[str, str, Any, str]:
        if not isinstance(turn, dict):
            raise self.err(MALFORMED_RECORD, "a turn must be an object", where)
        if self.fmt in ("monkey", "llava") or (self.fmt == "sharegpt" and "from" in turn):
            role_key, text_key = "from", "value"
        else:
            role_key, text_key = "role", "content"
        for k in (role_key, text_key):
            if k not in turn:
                raise self.err(MALFORMED_RECORD, "missing field", f"{where}.{k}")
        role_raw = turn[role_key]
        if not isinstance(role_raw, str) or role_raw.lower() not in ROLE_ALIASES:
            raise self.err(
                BAD_ROLES,
                f"unknown role {role_raw!r}; use user/human, assistant/gpt or a first system turn",
                f"{where}.{role_key}",
            )
        return role_raw, ROLE_ALIASES[role_raw.lower()], turn[text_key], f"{where}.{text_key}"

    def parts(self, content: Any, fld: str, images: list | None) -> list[Part]:
        if self.fmt == "openai" and isinstance(content, list):
            return self.content_parts(content, fld, images)
        if not isinstance(content, str):
            raise self.err(MALFORMED_RECORD, f"must be a string, got {type(content).__name__}", fld)
        if self.fmt == "monkey":
            try:
                return Turn.from_text("", content, lambda p: self.ref(p, fld).source, fld).parts
            except ValueError as e:
                raise self.err(UNBALANCED_IMAGE_TAGS, str(e), fld) from None
        if images is None:  # openai: a plain string is plain text
            return [content] if content else []
        pieces = content.split(PLACEHOLDER)
        out: list[Part] = []
        for k, piece in enumerate(pieces):
            if piece:
                out.append(piece)
            if k < len(pieces) - 1:
                refs, used = images
                if used >= len(refs):
                    raise self.err(
                        IMAGE_MISMATCH,
                        f"{PLACEHOLDER} placeholder number {used + 1} has no image: the record lists {len(refs)}",
                        fld,
                    )
                out.append(refs[used])
                images[1] += 1
        return out

    def next_listed(self, images: list, fld: str) -> ImageRef:
        """The next image of the record's ``images`` list, for a bare image part."""
        refs, used = images
        if used >= len(refs):
            raise self.err(IMAGE_MISMATCH, f"image part number {used + 1} has no image: the record lists {len(refs)}", fld)
        images[1] += 1
        return refs[used]

    def content_parts(self, content: list, fld: str, images: list | None = None) -> list[Part]:
        out: list[Part] = []
        for k, part in enumerate(content):
            where = f"{fld}[{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise self.err(MALFORMED_RECORD, "a text part needs a string 'text'", f"{where}.text")
                out.append(text)
            elif kind == "image" and part.get("image") is None and images is not None:
                out.append(self.next_listed(images, f"{where}.image"))
            elif kind == "image":
                out.append(self.ref(part.get("image"), f"{where}.image"))
            elif kind == "image_url":
                url = part.get("image_url")
                sub = f"{where}.image_url"
                if isinstance(url, dict):
                    url, sub = url.get("url"), f"{sub}.url"
                out.append(self.ref(url, sub))
            else:
                raise self.err(
                    MALFORMED_RECORD,
                    f"unsupported content part {kind!r}; use text, image or image_url",
                    f"{where}.type",
                )
        return out

    # -- roles, order, answers -----------------------------------------------------------------

    def build(self, obj: dict, key: str, raw: list[tuple[str, str, list[Part], str]]) -> Sample:
        turns: list[Turn] = []
        system: str | None = None
        for i, (role_raw, role, parts, fld) in enumerate(raw):
            role_field = fld.rsplit(".", 1)[0] + (".from" if fld.endswith(".value") else ".role")
            problem = turn_order_problem(role, i, len(turns))
            if problem:
                raise self.err(BAD_ROLES, problem if role == SYSTEM else f"{problem}, got {role_raw!r}", role_field)
            if role == SYSTEM:
                if any(isinstance(p, ImageRef) for p in parts):
                    raise self.err(UNBALANCED_IMAGE_TAGS, "images are not allowed in the system turn", fld)
                system = "".join(p for p in parts if isinstance(p, str))
                continue
            turn = Turn(role, parts, fld)
            if role == ASSISTANT and not self.allow_empty and not turn.plain_text.strip() and not turn.images:
                raise self.err(
                    EMPTY_ANSWER,
                    "empty answer: it would teach the model to stop at once "
                    "(data.allow_empty_answers: true, or data check --allow-empty-answers, accepts it)",
                    fld,
                )
            turns.append(turn)
        if not turns:
            raise self.err(MALFORMED_RECORD, "no user/assistant turns", key)
        if turns[-1].role != ASSISTANT:
            last = raw[-1][3]
            raise self.err(
                BAD_ROLES,
                "the conversation ends with a user turn: nothing to learn from it",
                last.rsplit(".", 1)[0] + (".from" if last.endswith(".value") else ".role"),
            )
        skip = {"id", key, "image", "images"}
        extra = {k: v for k, v in obj.items() if k not in skip}
        return Sample(self.sid, turns, system, self.file, self.line, self.index, self.fmt, extra)


def parse_record(
    obj: Any,
    fmt: str,
    file: str,
    line: int,
    index: int,
    image_root: str | None = None,
    allow_empty_answers: bool = False,
) -> Sample:
    """Validate one decoded record of format ``fmt`` and turn it into a :class:`Sample`.

    Args:
        obj: The decoded JSON value.
        fmt: One of :data:`FORMATS`.
        file, line, index: Where the record is, for errors and relative image paths.
        image_root: Folder relative image paths resolve against (default: the file's folder).
        allow_empty_answers: Accept assistant turns without text.

    Raises:
        DataError: ``malformed_record``, ``bad_roles``, ``unbalanced_image_tags``,
            ``image_mismatch`` or ``empty_answer``, naming the field.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    return _Parser(fmt, str(file), line, index, image_root, allow_empty_answers).parse(obj)

