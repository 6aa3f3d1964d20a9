"""Turn one image into the Monkey views: a grid of windows plus an optional global view.

The image is first drawn onto a canvas of ``cfg.canvas_size = (rows * S, cols * S)`` pixels
(``S = cfg.window_size``) by one of three resize modes, converted to a float tensor in
``[0, 1]`` (``uint8 / 255``) and normalised with ``cfg.mean`` / ``cfg.std``. Window ``k`` (row-major)
is the ``S x S`` crop at row ``k // cols``, column ``k % cols`` and uses LoRA slot ``k``; the
global view is the whole normalised canvas bicubically interpolated to ``S x S`` and uses no
slot (``-1``). With ``grid = [0, 0]`` the canvas itself is ``S x S`` and is the only view.

``stretch`` reproduces the official Monkey pipeline bit for bit: Pillow bicubic resize of the
RGB image to the canvas (what torchvision's ``Resize`` does on PIL images), ``ToTensor``,
``Normalize``, tensor slicing for the windows and
``F.interpolate(..., mode="bicubic", align_corners=False)`` (no antialias) for the global view.
``crop`` and ``pad`` keep the aspect ratio: ``crop`` covers the canvas and cuts the overflowing
borders, ``pad`` fits the image inside the canvas and fills the bars with the mean colour, which
normalises to about zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from monkeytune.config import ImageConfig
from monkeytune.vision.image import load_image

__all__ = ["ImageProcessor", "ProcessedImage"]

ImageSource = str | os.PathLike | Image.Image


@dataclass
class ProcessedImage:
    """The views of one image.

    Attributes:
        views: ``[V, 3, S, S]`` float32, normalised; windows in row-major order, then the
            global view.
        slots: ``[V]`` int64 adapter slot per view: window ``k`` -> ``k``, global view -> ``-1``.
        grid: ``(rows, cols)`` of windows (``(0, 0)`` when there are none).
    """

    views: torch.Tensor
    slots: torch.Tensor
    grid: tuple[int, int]


class ImageProcessor:
    """Image -> :class:`ProcessedImage` for one :class:`~monkeytune.config.ImageConfig`.

    Args:
        cfg: View layout, resize mode and normalisation.

    Raises:
        ValueError: The config names an unknown resize mode, a negative grid, a non-positive
            window size, mean/std of the wrong length or would produce no views.
    """

    def __init__(self, cfg: ImageConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.grid = (int(cfg.grid[0]), int(cfg.grid[1]))
        self.window_size = int(cfg.window_size)
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
        # Pad colour in 8-bit RGB: the mean colour, so the bars normalise to ~0.
        self._fill = tuple(int(min(255, max(0, round(m * 255)))) for m in cfg.mean)
        slots = list(range(cfg.num_windows)) + ([-1] if cfg.global_view else [])
        self._slots = torch.tensor(slots, dtype=torch.int64)

    @property
    def num_views(self) -> int:
        """Views per image: windows plus the optional global view."""
        return self.cfg.num_views

    def canvas(self, image: ImageSource) -> Image.Image:
        """Draw ``image`` onto the RGB canvas of ``cfg.canvas_size`` with the configured resize mode.

        Args:
            image: A path or PIL image (any mode; see :func:`~monkeytune.vision.image.load_image`).

        Returns:
            An RGB image of size ``(W, H)`` with ``(H, W) = cfg.canvas_size``.
        """
        rgb = load_image(image, self.cfg.max_pixels)
        height, width = self.cfg.canvas_size
        mode = self.cfg.resize_mode
        if mode == "stretch":
            return rgb.resize((width, height), Image.Resampling.BICUBIC)
        src_w, src_h = rgb.size
        if mode == "crop":
            # Resample only the centred source region with the canvas aspect ratio: the same as
            # scaling to cover the canvas and centre-cropping, with a single resampling and no
            # rounding of an intermediate size. Comparing the aspect ratios in integers picks
            # the side to cut without floating-point ties.
            if src_w * height > width * src_h:  # wider than the canvas: cut left and right
                box_w, box_h = min(float(src_w), src_h * width / height), float(src_h)
            else:  # taller (or equal): cut top and bottom
                box_w, box_h = float(src_w), min(float(src_h), src_w * height / width)
            left, top = (src_w - box_w) / 2, (src_h - box_h) / 2
            box = (left, top, left + box_w, top + box_h)
            return rgb.resize((width, height), Image.Resampling.BICUBIC, box=box)
        # pad: fit inside, centre on a mean-coloured canvas.
        scale = min(width / src_w, height / src_h)
        new_w = min(width, max(1, round(src_w * scale)))
        new_h = min(height, max(1, round(src_h * scale)))
        canvas = Image.new("RGB", (width, height), self._fill)
        resized = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
        canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
        return canvas

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> ``[3, H, W]`` float32, ``(uint8 / 255 - mean) / std``."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        array = np.array(rgb, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
        tensor = torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)
        return tensor.sub(self._mean).div(self._std)

    def __call__(self, image: ImageSource) -> ProcessedImage:
        """Cut ``image`` into views.

        Args:
            image: A path or PIL image of any mode and size.

        Returns:
            :class:`ProcessedImage` with ``views`` ``[V, 3, S, S]``, ``slots`` ``[V]`` and ``grid``.

        Raises:
            ImageLoadError: ``image`` cannot be loaded (see
                :func:`~monkeytune.vision.image.load_image`).
        """
        full = self.normalize(self.canvas(image))  # [3, rows*S, cols*S] (or [3, S, S])
        size = self.window_size
        rows, cols = self.grid
        views = [
            full[:, r * size : (r + 1) * size, c * size : (c + 1) * size]
            for r in range(rows)
            for c in range(cols)
        ]
        if self.cfg.global_view:
            if rows == 0:
                views.append(full)  # the canvas is already S x S
            else:
                views.append(
                    F.interpolate(full[None], size=(size, size), mode="bicubic", align_corners=False)[0]
                )
        return ProcessedImage(views=torch.stack(views), slots=self._slots.clone(), grid=self.grid)

    def batch(self, images: Sequence[ImageSource]) -> tuple[torch.Tensor, torch.Tensor]:
        """Process several images and concatenate their views in order.

        Args:
            images: Paths or PIL images.

        Returns:
            ``views`` ``[sum V, 3, S, S]`` float32 and ``slots`` ``[sum V]`` int64; image ``i``
            owns rows ``i * num_views`` to ``(i + 1) * num_views``.
        """
        if not images:
            size = self.window_size
            return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.int64)
        processed = [self(image) for image in images]
        return torch.cat([p.views for p in processed]), torch.cat([p.slots for p in processed])
