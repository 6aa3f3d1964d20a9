"""A picture of what the model sees: the tiled canvas with its windows, beside the global view.

Both halves are rebuilt from the normalised view tensors the model receives (denormalised back
to 8-bit colour), so the picture shows exactly the pixels that reach the vision tower: the
resize mode's distortion, crop or padding bars, and how coarse the global view is next to the
windows. The global view is enlarged with nearest-neighbour sampling so its real resolution
stays visible.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from monkeytune.config import ImageConfig
from monkeytune.vision.processor import ImageProcessor

__all__ = ["TilingView", "draw_tiling", "describe_tiling"]

# Longest displayed side of the canvas; larger canvases are scaled down for the page.
MAX_DISPLAY = 640
GAP = 16
WINDOW_COLOURS = [(230, 57, 70), (42, 157, 143), (69, 123, 157), (244, 162, 97), (131, 56, 236), (255, 190, 11)]
GLOBAL_COLOUR = (20, 20, 20)


class TilingView:
    """Draw tiling pictures for one image layout.

    Args:
        cfg: The model's image configuration.
    """

    def __init__(self, cfg: ImageConfig) -> None:
        self.cfg = cfg
        self.processor = ImageProcessor(cfg)
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def _to_pil(self, view: torch.Tensor) -> Image.Image:
        """``[3, H, W]`` normalised view -> RGB image (inverse of the processor's normalisation)."""
        pixels = (view * self._std + self._mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()), mode="RGB")

    def draw(self, image: Image.Image) -> Image.Image:
        """The tiling picture of ``image``.

        Args:
            image: A loaded RGB image.

        Returns:
            An RGB image: the canvas (windows reassembled, each outlined and labelled with its
            adapter slot) and, to its right, the global view at the same displayed height.
        """
        processed = self.processor(image)
        views = processed.views  # [V, 3, S, S]
        rows, cols = processed.grid
        size = self.cfg.window_size
        if rows:
            canvas = Image.new("RGB", (cols * size, rows * size))
            for k in range(rows * cols):
                canvas.paste(self._to_pil(views[k]), ((k % cols) * size, (k // cols) * size))
        else:
            canvas = self._to_pil(views[0])
        scale = min(1.0, MAX_DISPLAY / max(canvas.size))
        disp_w, disp_h = max(1, round(canvas.size[0] * scale)), max(1, round(canvas.size[1] * scale))
        canvas = canvas.resize((disp_w, disp_h), Image.Resampling.LANCZOS) if scale < 1 else canvas
        font = _font(max(12, disp_h // 18))  # the page shows the picture at about half size

        panels = [canvas]
        if rows:
            draw = ImageDraw.Draw(canvas)
            cell_w, cell_h = disp_w / cols, disp_h / rows
            for k in range(rows * cols):
                r, c = divmod(k, cols)
                box = (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w) - 1, round((r + 1) * cell_h) - 1)
                colour = WINDOW_COLOURS[k % len(WINDOW_COLOURS)]
                draw.rectangle(box, outline=colour, width=max(2, disp_h // 160))
                _label(draw, (box[0] + 6, box[1] + 6), f"window {k + 1} (slot {k})", colour, font)
            if self.cfg.global_view:
                global_view = self._to_pil(views[-1]).resize((disp_h, disp_h), Image.Resampling.NEAREST)
                gdraw = ImageDraw.Draw(global_view)
                gdraw.rectangle((0, 0, disp_h - 1, disp_h - 1), outline=GLOBAL_COLOUR, width=max(2, disp_h // 160))
                _label(gdraw, (6, 6), f"global view ({size}x{size})", GLOBAL_COLOUR, font)
                panels.append(global_view)
        else:
            _label(ImageDraw.Draw(canvas), (6, 6), f"single view ({size}x{size})", GLOBAL_COLOUR, font)

        width = sum(p.size[0] for p in panels) + GAP * (len(panels) - 1)
        out = Image.new("RGB", (width, disp_h), (255, 255, 255))
        x = 0
        for panel in panels:
            out.paste(panel, (x, 0))
            x += panel.size[0] + GAP
        return out


def describe_tiling(cfg: ImageConfig, tokens_per_view: int) -> str:
    """One line saying how an image is cut, e.g. ``896x896 canvas (stretch): 2x2 windows ...``."""
    height, width = cfg.canvas_size
    parts = [f"{width}x{height} canvas ({cfg.resize_mode})"]
    if cfg.num_windows:
        parts.append(f"{cfg.grid[0]}x{cfg.grid[1]} windows of {cfg.window_size} px")
    if cfg.global_view:
        parts.append(f"a {cfg.window_size} px global view")
    tokens = cfg.num_views * tokens_per_view
    return f"{parts[0]}: {' + '.join(parts[1:])}; {cfg.num_views} views x {tokens_per_view} = {tokens} visual tokens"


def draw_tiling(image: Image.Image, cfg: ImageConfig) -> Image.Image:
    """Shortcut for ``TilingView(cfg).draw(image)``."""
    return TilingView(cfg).draw(image)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support: fixed bitmap font
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour, font) -> None:
    """White text on a box of ``colour`` so labels read on any image."""
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 4, top - 3, right + 4, bottom + 3), fill=colour)
    draw.text(xy, text, fill=(255, 255, 255), font=font)
