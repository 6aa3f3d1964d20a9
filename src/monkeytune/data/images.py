"""The one image-path resolver of the data pipeline, and the one way its images are opened.

Every format names images differently (``<img>path</img>``, an ``image`` field, an
``images`` list, ``image_url`` parts); all of them go through :func:`resolve_image`:

* ``data:image/<type>;base64,...`` is kept as it is (an inline image, decoded when loaded);
* ``table:...`` is kept too: an image stored in a parquet or arrow table
  (:mod:`monkeytune.data.tables`), read from it when loaded;
* ``file://`` URLs become the path they name (percent-escapes decoded);
* ``http://`` and ``https://`` are refused: nothing is downloaded during training;
* ``~`` expands to the home folder;
* a relative path is joined to ``image_root`` when one is given, else to the data file's folder;
* the result is absolute, so it does not depend on the working directory of a later process.

:func:`image_problem` is the dry-run check (``stat`` only, or a full decode) and
:func:`open_image` the loader, both behind the decompression-bomb guard of
:mod:`monkeytune.vision.image`, so ``data check`` and training judge an image the same way.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from urllib.parse import unquote, urlparse

from PIL import Image

from monkeytune.data.records import MISSING_IMAGE, UNREADABLE_IMAGE, ImageRef
from monkeytune.data.tables import EMBEDDED, embedded_bytes
from monkeytune.vision.image import ImageLoadError, image_file_problem, load_image


def resolve_image(written: str, data_file: str, image_root: str | None = None) -> str:
    """The stored source of an image reference as written in a record.

    Args:
        written: Path, ``file://`` URL or ``data:`` URI from the record.
        data_file: The data file holding the record (relative paths resolve against its folder).
        image_root: Folder relative paths resolve against instead, when given.

    Returns:
        An absolute path, or the ``data:`` URI unchanged.

    Raises:
        ValueError: empty references, remote URLs, malformed ``data:`` URIs.
    """
    ref = written.strip()
    if not ref:
        raise ValueError("empty image reference")
    if ref.startswith(EMBEDDED):  # an image stored in a table, as monkeytune.data.tables names it
        return ref
    if ref.startswith("data:"):
        head = ref.split(",", 1)[0]
        if "," not in ref or not head.startswith("data:image/") or not head.endswith(";base64"):
            raise ValueError(f"inline images must be data:image/<type>;base64,<data>, got {head[:60]!r}")
        return ref
    scheme = urlparse(ref).scheme.lower()
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise ValueError(f"remote image {ref!r} is not downloaded; download the images and give local paths")
    if scheme == "file":
        ref = unquote(urlparse(ref).path)
    ref = os.path.expanduser(ref)
    if not os.path.isabs(ref):
        base = image_root if image_root else os.path.dirname(os.path.abspath(data_file))
        ref = os.path.join(os.path.abspath(base), ref)
    return os.path.normpath(ref)


def _inline_bytes(source: str) -> bytes:
    try:
        return base64.b64decode(source.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageLoadError(f"inline image {source.split(',', 1)[0]}: invalid base64 ({e})") from e


def open_image(ref: ImageRef, max_pixels: int) -> Image.Image:
    """Decode ``ref`` to an RGB image (see :func:`monkeytune.vision.image.load_image`).

    Raises:
        ImageLoadError: naming the file (or the inline image) and the reason.
    """
    if not ref.inline and not ref.embedded:
        return load_image(ref.source, max_pixels)
    data = _inline_bytes(ref.source) if ref.inline else _embedded_bytes(ref)
    what = "inline image" if ref.inline else "image"
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises several types for non-images
        raise ImageLoadError(f"{what} {ref.display()}: not a recognised image ({type(e).__name__})") from e
    try:
        return load_image(image, max_pixels)
    except ImageLoadError as e:
        raise ImageLoadError(str(e).replace("<in-memory", f"{what} {ref.display()} <")) from e


def _embedded_bytes(ref: ImageRef) -> bytes:
    try:
        return embedded_bytes(ref.source)
    except ValueError as e:
        raise ImageLoadError(f"image {ref.display()}: {e}") from e


def image_problem(ref: ImageRef, max_pixels: int, decode: bool) -> tuple[str, str] | None:
    """``(kind, reason)`` when ``ref`` cannot be used, else ``None``.

    Without ``decode`` only the file system is asked (or the base64 of an inline image checked).
    """
    try:
        if decode:
            open_image(ref, max_pixels)
        elif ref.inline:
            _inline_bytes(ref.source)
        elif ref.embedded:
            _embedded_bytes(ref)
        else:
            problem = image_file_problem(ref.source)
            if problem is not None:
                raise problem
    except ImageLoadError as e:
        return (MISSING_IMAGE if e.missing else UNREADABLE_IMAGE), str(e)
    return None
