"""``monkeytune data convert``: any supported format written as Monkey ``<img>path</img>`` records.

The output is for inspection (and for tools that only read Monkey's layout): each sample is
written exactly as training parsed it, image paths absolute and in place of their
placeholders. Inline ``data:`` images are written as files next to the output
(``<OUT stem>_images/<record>_<k>.<type>``) since a Monkey tag holds a path.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from monkeytune.data.reading import load_samples
from monkeytune.data.records import MALFORMED_RECORD, DataError, ImageRef, Sample


def _inline_to_file(ref: ImageRef, folder: Path, stem: str) -> str:
    head, payload = ref.source.split(",", 1)
    ext = head[len("data:image/") :].split(";", 1)[0] or "img"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.{ext}"
    path.write_bytes(base64.b64decode(payload))
    return str(path.resolve())


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
            if part.inline:
                if image_dir is None:
                    raise ValueError("an inline image needs an image folder to be written to")
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
    """Write ``src`` (any format) to ``dst`` as Monkey-format JSON Lines.

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
    image_dir = dst.parent / f"{dst.stem}_images"
    written = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
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
