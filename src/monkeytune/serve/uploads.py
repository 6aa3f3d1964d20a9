"""Checking images that arrive over the web before they reach the model.

Anything a browser or API client sends may be a non-image, a truncated file, a huge file or a
decompression bomb. :func:`check_upload` turns every such case into an :class:`UploadError`
whose message is meant for the page, so a bad upload is reported to the user and never takes
the server down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from monkeytune.vision.image import ImageLoadError, load_image

__all__ = ["UploadError", "UploadLimits", "check_upload"]


class UploadError(ValueError):
    """An uploaded file cannot be used; the message is written for the person who sent it."""


@dataclass(frozen=True)
class UploadLimits:
    """Limits on uploaded images.

    Attributes:
        max_bytes: Largest accepted file size.
        max_pixels: Largest accepted ``width * height`` (checked from the header, before decoding).
    """

    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000


def _size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def check_upload(path: str | os.PathLike, limits: UploadLimits = UploadLimits(), name: str | None = None) -> Image.Image:
    """Load an uploaded file as an RGB image or explain why it cannot be used.

    Args:
        path: Where the server stored the upload.
        limits: Size limits.
        name: The file name the user chose (for messages); defaults to the stored name.

    Returns:
        The decoded RGB image.

    Raises:
        UploadError: missing, empty, too large, not an image, corrupt or too many pixels.
    """
    path = Path(path)
    shown = name or path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise UploadError(f"The upload {shown!r} could not be read on the server; please upload it again.") from None
    if size == 0:
        raise UploadError(f"{shown!r} is empty (0 bytes).")
    if size > limits.max_bytes:
        raise UploadError(
            f"{shown!r} is {_size_text(size)}; the largest accepted image is {_size_text(limits.max_bytes)}."
        )
    try:
        return load_image(path, max_pixels=limits.max_pixels)
    except ImageLoadError as e:
        reason = str(e).split(": ", 1)[-1] if ": " in str(e) else str(e)
        raise UploadError(f"{shown!r} cannot be used as an image: {reason}.") from None
    except MemoryError:
        raise UploadError(f"{shown!r} is too large to decode on this server.") from None
