"""Images: the one resolver of image references, the one way they are opened, and the views
a sample's images become.

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

:class:`ImageViews` turns a sample's image references into the views the model takes, through
the image processor (:mod:`monkeytune.vision.processor`) and a :class:`ViewCache`.

**The view cache.** Decoding a PNG and cutting it into views costs about as much as the vision
tower's forward pass on a small model, and a dataset whose images are each asked about several
times decodes every image again for every question. The cache keeps what an image was processed
into, keyed by the image, so each is decoded once. The first images drawn stay; once the budget
is spent, later ones are processed every time (nothing is evicted, so the cost of a full cache is
never paid twice).

Each DataLoader worker process holds its own cache, for as long as the worker lives (training
starts new workers each epoch; with ``num_workers: 0`` the cache lasts the whole run).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import TYPE_CHECKING, Any, Hashable
from urllib.parse import unquote, urlparse

import torch
from PIL import Image

from monkeytune.config import ModelConfig
from monkeytune.data.errors import MISSING_IMAGE, UNREADABLE_IMAGE
from monkeytune.data.tables import EMBEDDED, embedded_bytes
from monkeytune.vision.image import ImageLoadError, image_file_problem, load_image

if TYPE_CHECKING:  # messages imports this module's resolver
    from monkeytune.data.messages import ImageRef, Sample


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


def image_bytes(ref: ImageRef) -> bytes:
    """The encoded bytes of any image reference: a file, a ``data:`` URI or a table cell.

    Raises:
        ImageLoadError: invalid base64, or a table cell that cannot be read.
        OSError: a file that cannot be read.
    """
    if ref.inline:
        return _inline_bytes(ref.source)
    if ref.embedded:
        return _embedded_bytes(ref)
    with open(ref.source, "rb") as f:
        return f.read()


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


class ViewCache:
    """Tensors per key, up to ``max_bytes`` in all.

    Args:
        max_bytes: Budget; 0 keeps nothing.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: dict[Hashable, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> tuple[torch.Tensor, ...] | None:
        """The tensors stored under ``key``, or None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
        else:
            self.hits += 1
        return item

    def put(self, key: Hashable, *tensors: torch.Tensor) -> bool:
        """Keep ``tensors`` under ``key`` if they fit in what is left of the budget.

        Returns:
            Whether they were kept. Callers must not modify kept tensors in place.
        """
        size = sum(t.numel() * t.element_size() for t in tensors)
        if key in self._items or self.nbytes + size > self.max_bytes:
            return False
        self._items[key] = tuple(tensors)
        self.nbytes += size
        return True


class ImageViews:
    """A sample's images -> ``(pixel_values [N, 3, S, S], view_slots [N])``, ``N`` = views in all.

    Args:
        model_cfg: Gives the image layout, ``image.max_pixels`` and ``tokens_per_image``.
        processor: Object with ``__call__(image) -> ProcessedImage``; by default an
            :class:`~monkeytune.vision.processor.ImageProcessor` for ``model_cfg.image``, made
            when first needed.
        cache_bytes: Budget of the :class:`ViewCache` (0 keeps nothing).
    """

    def __init__(self, model_cfg: ModelConfig, processor: Any = None, cache_bytes: int = 0):
        self.model_cfg = model_cfg
        self._processor = processor
        self.cache = ViewCache(cache_bytes)

    @property
    def processor(self):
        if self._processor is None:
            from monkeytune.vision.processor import ImageProcessor

            self._processor = ImageProcessor(self.model_cfg.image)
        return self._processor

    def __call__(self, images: list[ImageRef], sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of ``images`` (of ``sample``), in order.

        Raises:
            DataError: ``missing_image`` or ``unreadable_image``, naming the image's field.
        """
        views, slots = [], []
        for ref in images:
            cached = self.cache.get(ref.source)
            if cached is None:
                cached = self._process(ref, sample)
                self.cache.put(ref.source, *cached)
            views.append(cached[0])
            slots.append(cached[1])
        if not views:
            size = self.model_cfg.image.window_size
            return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.int64)
        return torch.cat(views), torch.cat(slots).to(torch.int64)

    def _process(self, ref: ImageRef, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            processed = self.processor(open_image(ref, self.model_cfg.image.max_pixels))
        except ImageLoadError as e:
            raise sample.error(MISSING_IMAGE if e.missing else UNREADABLE_IMAGE, str(e), ref.field) from None
        except (ValueError, OSError) as e:
            raise sample.error(UNREADABLE_IMAGE, f"{ref.display()}: {e}", ref.field) from None
        v = processed.views
        if v.shape[0] * self.model_cfg.tokens_per_view != self.model_cfg.tokens_per_image:
            raise ValueError(
                f"the image processor gave {v.shape[0]} views for {ref.display()}, but the prompt "
                f"reserves {self.model_cfg.tokens_per_image} tokens per image"
            )
        return v, processed.slots
