"""``monkeytune data convert``: any supported input written as Monkey JSON Lines or as parquet.

To JSON Lines (``OUT.jsonl``), for inspection and for tools that only read Monkey's layout: each
sample is written exactly as training parsed it, image paths absolute and in place of their
placeholders. Images inside the input (``data:`` URIs, table cells) are written as files next to
the output (``<OUT stem>_images/<record>_<k>.<type>``) since a Monkey tag holds a path.

To parquet (``OUT.parquet``, or a folder of shards), to package a dataset: one row per sample in the sharegpt layout
(``messages`` with ``<image>`` placeholders, ``images`` as ``datasets.Image`` cells holding the
bytes, ``id``), so the file carries its images and LLaMA-Factory, ms-swift and ``datasets`` read
it too. monkeytune reads it back into the same samples (:mod:`monkeytune.data.tables`).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from monkeytune.data.errors import MALFORMED_RECORD, UNREADABLE_IMAGE, DataError
from monkeytune.data.messages import PLACEHOLDER, ImageRef, Sample
from monkeytune.data.reading import Samples
from monkeytune.data.views import image_bytes


def _inline_to_file(ref: ImageRef, folder: Path, stem: str) -> str:
    """Write an image held in the data (a ``data:`` URI or a table cell) to a file; its path."""
    data = image_bytes(ref)
    if ref.inline:
        ext = ref.source[len("data:image/") :].split(";", 1)[0] or "img"
    else:
        ext = (Image.open(io.BytesIO(data)).format or "img").lower()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.{ext}"
    path.write_bytes(data)
    return str(path.resolve())


def sharegpt_record(sample: Sample) -> dict[str, Any]:
    """A parsed sample as a sharegpt row with its images' bytes (the parquet layout).

    Raises:
        DataError: a text holds ``<image>``, which the layout reads as a placeholder.
        OSError: an image file cannot be read.
    """
    messages = [] if sample.system is None else [{"role": "system", "content": sample.system}]
    images = []
    for turn in sample.turns:
        pieces = []
        for part in turn.parts:
            if isinstance(part, str):
                if PLACEHOLDER in part:
                    raise sample.error(MALFORMED_RECORD, f"the text holds {PLACEHOLDER}, which the parquet layout "
                                       "reads as an image placeholder", turn.field)
                pieces.append(part)
            else:
                try:
                    images.append({"bytes": image_bytes(part), "path": None})
                except (OSError, ValueError) as e:
                    raise sample.error(UNREADABLE_IMAGE, f"{part.display()}: {e}", part.field) from None
                pieces.append(PLACEHOLDER)
        messages.append({"role": turn.role, "content": "".join(pieces)})
    return {"id": str(sample.id), "messages": messages, "images": images}


def monkey_record(sample: Sample, image_dir: Path | None = None) -> dict[str, Any]:
    """The Monkey-format record of a parsed sample.

    Args:
        sample: A parsed sample of any format.
        image_dir: Where inline images are written (required when the sample has any).

    Raises:
        DataError: a text holds ``<img>`` or ``</img>``, which Monkey's format would read as a tag.
    """
    convs: list[dict[str, str]] = []
    if sample.system is not None:
        convs.append({"from": "system", "value": sample.system})
    k = 0
    for turn in sample.turns:
        pieces = []
        for part in turn.parts:
            if isinstance(part, str):
                if "<img>" in part or "</img>" in part:
                    raise sample.error(
                        MALFORMED_RECORD, "the text holds <img> or </img>, which Monkey's format reads as an image tag",
                        turn.field,
                    )
                pieces.append(part)
                continue
            source = part.source
            if part.inline or part.embedded:
                if image_dir is None:
                    raise ValueError("an image held in the data needs an image folder to be written to")
                try:
                    source = _inline_to_file(part, image_dir, f"{sample.index}_{k}")
                except (OSError, ValueError) as e:
                    raise sample.error(UNREADABLE_IMAGE, f"{part.display()}: {e}", part.field) from None
            k += 1
            pieces.append(f"<img>{source}</img>")
        convs.append({"from": turn.role, "value": "".join(pieces)})
    return {"id": sample.id, "conversations": convs, **sample.extra}


SHARD_MB = 500  # the size of a parquet shard written to a folder, as ``datasets`` shards by default
ROWS_PER_GROUP = 1000  # rows of a parquet row group: memory holds one group's images


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    errors: list[DataError],
    format: str = "auto",
    image_root: str | None = None,
    allow_empty_answers: bool = False,
    shard_mb: float = SHARD_MB,
) -> tuple[int, str]:
    """Write ``src`` (any format) to ``dst``: parquet when ``dst`` ends in ``.parquet``, parquet
    shards (``train-00000-of-00003.parquet``, ...) when ``dst`` is a folder (it exists, or is
    written with a trailing ``/``), a new shard once the one before holds ``shard_mb`` MB, else
    Monkey-format JSON Lines.

    One pass over the input: each record is written as it is read, so memory does not grow with
    the input. Bad records are appended to ``errors`` and left out; every good one is written.

    Returns:
        ``(records written, format read)``.

    Raises:
        DataError: the input file cannot be read or its format not decided (``data_file``,
            ``unknown_format``); nothing is left at ``dst`` then.
    """
    if shard_mb <= 0:
        raise ValueError(f"the shard size must be above 0 MB, got {shard_mb:g}")
    folder = str(dst).endswith(("/", os.sep)) or Path(dst).is_dir()
    dst = Path(dst)
    if folder:
        out: _JsonLinesOutput | _ParquetOutput = _ParquetOutput(dst, int(shard_mb * 2**20))
    elif dst.suffix == ".parquet":
        out = _ParquetOutput(dst)
    else:
        out = _JsonLinesOutput(dst)
    formats: dict[str, str] = {}
    found: list[DataError] = []
    try:
        # visit writes each good record as it is parsed; a DataError it raises is the record's.
        Samples([src], found, format, image_root, allow_empty_answers, formats, visit=lambda i, s: out.add(s))
        for e in found:
            if e.index is None:
                raise e
    except BaseException:
        out.abort()
        raise
    errors.extend(found)
    errors.sort(key=lambda e: e.index if e.index is not None else -1)
    return out.close(), formats.get(str(src), format)


class _JsonLinesOutput:
    """Monkey-format records, one a line; images held in the data are written beside as files."""

    def __init__(self, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.dst, self.image_dir = dst, dst.parent / f"{dst.stem}_images"
        self.file = open(dst, "w", encoding="utf-8")
        self.written = 0

    def add(self, sample: Sample) -> None:
        self.file.write(json.dumps(monkey_record(sample, self.image_dir), ensure_ascii=False, default=str) + "\n")
        self.written += 1

    def close(self) -> int:
        self.file.close()
        return self.written

    def abort(self) -> None:
        self.file.close()
        self.dst.unlink(missing_ok=True)


class _ParquetOutput:
    """Sharegpt rows with embedded images, a row group (:data:`ROWS_PER_GROUP`) at a time, so memory holds
    one group's images: one file, or (``shard_bytes``) numbered shards in a folder, each starting
    once the one before holds ``shard_bytes``. Files are written under a temporary name and
    renamed when complete: a reader never sees half a file."""

    def __init__(self, dst: Path, shard_bytes: int | None = None) -> None:
        import datasets  # noqa: PLC0415 - heavy, and only this output needs it

        turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
        self.features = datasets.Features({"id": datasets.Value("string"), "messages": datasets.List(turn),
                                           "images": datasets.List(datasets.Image())})
        self.dst, self.shard_bytes = dst, shard_bytes
        (dst if shard_bytes else dst.parent).mkdir(parents=True, exist_ok=True)
        self.group: list[dict[str, Any]] = []
        self.files: list[Path] = []  # written so far, under temporary names
        self.writer = None
        self.written = 0

    def add(self, sample: Sample) -> None:
        self.group.append(sharegpt_record(sample))
        if len(self.group) == ROWS_PER_GROUP:
            self._flush()

    def _table(self, rows: list[dict[str, Any]]):
        import datasets  # noqa: PLC0415

        # The features' metadata travels in the schema: datasets reads the cells as images.
        return datasets.Dataset.from_list(rows, features=self.features).data.table

    def _flush(self) -> None:
        import pyarrow.parquet as pq  # noqa: PLC0415

        table = self._table(self.group)
        if self.writer is not None and self.shard_bytes and os.path.getsize(self.files[-1]) >= self.shard_bytes:
            self.writer.close()
            self.writer = None
        if self.writer is None:
            name = f".tmp-{len(self.files):05d}.parquet" if self.shard_bytes else f".tmp-{self.dst.name}"
            self.files.append((self.dst if self.shard_bytes else self.dst.parent) / name)
            self.writer = pq.ParquetWriter(str(self.files[-1]), table.schema)
        self.writer.write_table(table)
        self.written, self.group = self.written + len(self.group), []

    def close(self) -> int:
        if self.group or self.writer is None:  # the last group, or an empty table with the schema
            self._flush()
        self.writer.close()
        if not self.shard_bytes:
            os.replace(self.files[0], self.dst)
            return self.written
        for k, f in enumerate(self.files):
            os.replace(f, f.with_name(f"train-{k:05d}-of-{len(self.files):05d}.parquet"))
        return self.written

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for f in self.files:
            f.unlink(missing_ok=True)
