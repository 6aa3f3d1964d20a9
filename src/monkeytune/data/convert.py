"""``monkeytune data convert``: any supported input written as Monkey JSON Lines or as parquet.

To JSON Lines (``OUT.jsonl``), for inspection and for tools that only read Monkey's layout: each
sample is written exactly as training parsed it, image paths absolute and in place of their
placeholders. Images inside the input (``data:`` URIs, table cells) are written as files next to
the output (``<OUT stem>_images/<record>_<k>.<type>``) since a Monkey tag holds a path.

To parquet (``OUT.parquet``), to package a dataset: one row per sample in the sharegpt layout
(``messages`` with ``<image>`` placeholders, ``images`` as ``datasets.Image`` cells holding the
bytes, ``id``), so the file carries its images and LLaMA-Factory, ms-swift and ``datasets`` read
it too. monkeytune reads it back into the same samples (:mod:`monkeytune.data.tables`).
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from monkeytune.data.messages import PLACEHOLDER, ImageRef, Sample
from monkeytune.data.reading import load_samples
from monkeytune.data.errors import MALFORMED_RECORD, UNREADABLE_IMAGE, DataError
from monkeytune.data.tables import embedded_bytes


def _inline_to_file(ref: ImageRef, folder: Path, stem: str) -> str:
    """Write an image held in the data (a ``data:`` URI or a table cell) to a file; its path."""
    if ref.inline:
        head, payload = ref.source.split(",", 1)
        ext, data = head[len("data:image/") :].split(";", 1)[0] or "img", base64.b64decode(payload)
    else:
        data = embedded_bytes(ref.source)
        ext = (Image.open(io.BytesIO(data)).format or "img").lower()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.{ext}"
    path.write_bytes(data)
    return str(path.resolve())


def image_bytes(ref: ImageRef) -> bytes:
    """The encoded bytes of any image reference: a file, a ``data:`` URI or a table cell."""
    if ref.inline:
        return base64.b64decode(ref.source.split(",", 1)[1])
    if ref.embedded:
        return embedded_bytes(ref.source)
    return Path(ref.source).read_bytes()


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
                source = _inline_to_file(part, image_dir, f"{sample.index}_{k}")
            k += 1
            pieces.append(f"<img>{source}</img>")
        convs.append({"from": turn.role, "value": "".join(pieces)})
    return {"id": sample.id, "conversations": convs, **sample.extra}


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    errors: list[DataError],
    format: str = "auto",
    image_root: str | None = None,
    allow_empty_answers: bool = False,
) -> tuple[int, str]:
    """Write ``src`` (any format) to ``dst``: Monkey-format JSON Lines, or parquet when ``dst`` ends in ``.parquet``.

    Bad records are appended to ``errors`` and left out; every good one is written.

    Returns:
        ``(records written, format read)``.

    Raises:
        DataError: the input file cannot be read or its format not decided (``data_file``,
            ``unknown_format``).
    """
    formats: dict[str, str] = {}
    found: list[DataError] = []
    samples = load_samples([src], found, format, image_root, allow_empty_answers, formats)
    for e in found:
        if e.index is None:
            raise e
    errors.extend(found)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".parquet":
        written = _write_parquet(samples, dst, errors)
        errors.sort(key=lambda e: e.index if e.index is not None else -1)
        return written, formats.get(str(src), format)
    image_dir = dst.parent / f"{dst.stem}_images"
    written = 0
    with open(dst, "w", encoding="utf-8") as f:
        for s in samples:
            try:
                rec = monkey_record(s, image_dir)
            except DataError as e:
                errors.append(e)
                continue
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
            written += 1
    errors.sort(key=lambda e: e.index if e.index is not None else -1)
    return written, formats.get(str(src), format)


def _write_parquet(samples: list[Sample], dst: Path, errors: list[DataError], rows_per_group: int = 1000) -> int:
    """Write ``samples`` as one parquet file of sharegpt rows with embedded images; rows written.

    Rows are encoded and written a row group at a time, so memory holds one group's images.
    """
    import datasets  # noqa: PLC0415 - heavy, and only this output needs it
    import pyarrow.parquet as pq  # noqa: PLC0415

    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features({"id": datasets.Value("string"), "messages": datasets.List(turn),
                                  "images": datasets.List(datasets.Image())})
    tmp = dst.with_name(f".tmp-{dst.name}")
    written, group, writer = 0, [], None
    try:
        for i, s in enumerate(samples):
            try:
                group.append(sharegpt_record(s))
            except DataError as e:
                errors.append(e)
            if group and (len(group) == rows_per_group or i == len(samples) - 1):
                # The features' metadata travels in the schema: datasets reads the cells as images.
                table = datasets.Dataset.from_list(group, features=features).data.table
                writer = writer or pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table)
                written, group = written + len(group), []
        if writer is None:  # nothing to write: an empty table with the schema
            writer = pq.ParquetWriter(str(tmp), datasets.Dataset.from_list([], features=features).data.table.schema)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, dst)  # a reader never sees half a file
    return written
