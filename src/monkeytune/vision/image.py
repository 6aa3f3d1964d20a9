"""Load any image file or PIL image as a fully decoded 8-bit RGB image, or fail loudly.

Training data is scraped from many sources, so the loader accepts every common PIL mode and
turns it into RGB the same way each time:

* alpha (``RGBA``, ``LA``, ``PA``, premultiplied modes, ``P``/``L``/``RGB`` with a transparency
  key) is composited onto **white**, because documents and screenshots, the usual
  high-resolution inputs, are dark ink on a white page, and a transparent background shown on
  white is what a viewer would see;
* 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) is mapped from the 16-bit range to
  8 bits with ``round(v / 257)`` (``65535 -> 255``, ``257 * k -> k``) instead of PIL's own
  conversion, which clips every value above 255 to white;
* everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through PIL's ``convert``.

EXIF orientation is applied, so a portrait photo stored sideways comes out upright.

Every failure (missing, empty, truncated or non-image file, too many pixels) raises
:class:`ImageLoadError`, a ``ValueError`` whose message names the file and the reason, so a bad
sample in a data set points straight at the offending file. A path that is not a readable file
says what it is instead (a directory, a symlink loop, a dangling symlink, a file without read
permission): :func:`image_file_problem` is that one check, shared by training and ``data check``.

The decompression-bomb guard (``max_pixels``) defaults to :data:`DEFAULT_MAX_PIXELS`, Pillow's
own warning threshold, so no image Pillow would warn about is ever decoded.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from monkeytune.config import DEFAULT_MAX_PIXELS  # the one definition, re-exported

__all__ = ["DEFAULT_MAX_PIXELS", "ImageLoadError", "image_file_problem", "load_image"]


# Modes that carry an alpha channel of their own.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# 16-bit greyscale in its different byte orders, plus PIL's 32-bit signed integer mode.
_WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the file and the reason.

    Attributes:
        missing: True when nothing exists at the path (as opposed to something unusable there).
    """

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def image_file_problem(path: str | os.PathLike) -> ImageLoadError | None:
    """Why ``path`` cannot be opened as an image file, or ``None`` if it is a readable file.

    Only ``stat`` calls and an ``access`` check: no byte of the file is read.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ImageLoadError(f"image path {name} is a symlink loop")
        if os.path.islink(name):
            return ImageLoadError(f"image path {name} is a symlink to a missing file ({os.readlink(name)})", True)
        if isinstance(exc, FileNotFoundError):
            return ImageLoadError(f"image file not found: {name}", missing=True)
        if isinstance(exc, PermissionError):
            return ImageLoadError(f"image file {name} cannot be reached: permission denied on a parent folder")
        return ImageLoadError(f"image file {name} cannot be inspected: {exc.strerror or exc}")
    if stat.S_ISDIR(st.st_mode):
        return ImageLoadError(f"image path {name} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        return ImageLoadError(f"image path {name} is not a regular file (a device, pipe or socket)")
    if not os.access(name, os.R_OK):
        return ImageLoadError(f"image file {name} is not readable (permission denied)")
    return None


def _describe(source: object) -> str:
    """A human-readable name of ``source`` for error messages."""
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "")
        width, height = source.size
        return str(name) if name else f"<in-memory {source.mode} image {width}x{height}>"
    return os.fspath(source)  # type: ignore[arg-type]


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    if width * height > max_pixels:
        raise ImageLoadError(
            f"cannot load image {name}: {width}x{height} = {width * height} pixels is more than "
            f"max_pixels = {max_pixels} (decompression-bomb guard)"
        )
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"cannot load image {name}: empty size {width}x{height}")


def _wide_int_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit (``I;16*``) or ``I`` greyscale to 8-bit RGB without clipping the range.

    ``I`` holds 32-bit signed integers; it is treated as 16-bit data (the only way PIL produces
    it from real files), so values are clipped to ``[0, 65535]`` before scaling.
    """
    values = np.asarray(image).astype(np.int64)
    values = np.clip(values, 0, 65535)
    # (v + 128) // 257 is round(v / 257) for non-negative integers: 0 -> 0, 65535 -> 255.
    gray = ((values + 128) // 257).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to RGB (alpha onto white, 16-bit scaled)."""
    if image.mode in _WIDE_INT_MODES:
        return _wide_int_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # convert("RGBA") turns palette or colour-key transparency into a real alpha channel.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _finish(image: Image.Image) -> Image.Image:
    """Decode fully, apply EXIF orientation and convert to RGB. Returns a new image."""
    # load() forces the whole decode here: a truncated file fails now instead of during training.
    image.load()
    upright = ImageOps.exif_transpose(image)
    rgb = _to_rgb(upright)
    if rgb is image:
        # Never hand back the caller's own object: later in-place edits must not leak back.
        rgb = rgb.copy()
    return rgb


def load_image(source: str | os.PathLike | Image.Image, max_pixels: int) -> Image.Image:
    """Load ``source`` as a fully decoded 8-bit RGB image.

    Transparent pixels are composited onto white (documents and screenshots sit on white
    pages); 16-bit greyscale is scaled with ``round(v / 257)`` rather than clipped; EXIF
    orientation is applied. ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left off, so a
    truncated file is an error rather than a partly grey image.

    Args:
        source: A file path or a ``PIL.Image.Image`` of any mode (it is not modified).
        max_pixels: Largest accepted ``width * height``. For files the size is read from the
            header before any pixel is decoded, so a decompression bomb costs nothing.

    Returns:
        A new ``RGB`` image, EXIF-upright, independent of ``source``.

    Raises:
        ImageLoadError: The file is missing, empty, truncated, not an image, has more than
            ``max_pixels`` pixels or uses a mode that cannot be converted. The message names
            the file and the reason.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size[0], source.size[1], max_pixels, name)
        try:
            return _finish(source)
        except ImageLoadError:
            raise
        except Exception as exc:  # PIL plugins raise many types for corrupt data
            raise ImageLoadError(f"cannot load image {name}: {type(exc).__name__}: {exc}") from exc

    problem = image_file_problem(source)
    if problem is not None:
        raise problem
    size = os.path.getsize(source)
    if size == 0:
        raise ImageLoadError(f"cannot load image {name}: empty file (0 bytes)")

    try:
        with warnings.catch_warnings():
            # Pillow warns from the header at its own threshold; the guard below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        with image:
            # Image.open reads only the header, so the size check runs before decoding.
            _check_pixels(image.size[0], image.size[1], max_pixels, name)
            return _finish(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        # PIL's own guard (Image.MAX_IMAGE_PIXELS) may be stricter than max_pixels.
        raise ImageLoadError(f"cannot load image {name}: too many pixels ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(f"cannot load image {name}: not a recognised image file") from exc
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, struct.error, ...
        raise ImageLoadError(f"cannot load image {name}: {type(exc).__name__}: {exc}") from exc
