"""Synthetic high-resolution scenes whose fine detail vanishes from a downscaled global view.

A scene is a square image cut into four parts (quadrants: top-left, top-right, bottom-left,
bottom-right), which with a 2x2 grid are exactly the four Monkey windows. Each part holds a
coloured square (the *coarse* attribute: its colour) overlaid with a 1-pixel grey texture (the
*fine* attribute): horizontal stripes, vertical stripes or a checkerboard.

Why a global view cannot see the texture
----------------------------------------
The global view of a 2x2 grid is the ``2S``-pixel canvas bicubically resized to ``S`` pixels
(``F.interpolate``, ``align_corners=False``, Keys kernel with ``A = -0.75``, no antialias). Along
one axis that is ``y[i] = -a x[2i-1] + b x[2i] + b x[2i+1] - a x[2i+2]`` with ``a = 3/32`` and
``b = 19/32``. An alternating ``+1, -1, +1, ...`` signal maps to 0 inside, but a plain stripe
patch leaks at its edges. Writing the signal's even and odd samples as ``e_j = x[2j]`` and
``o_j = x[2j+1]``, any ``e_j = b W_j - a W_{j-1}``, ``o_j = -(b W_j - a W_{j+1})`` is mapped to
exactly zero, for any finite envelope ``W``: the texture is therefore built from such a profile
``v`` (:func:`texture_profile`), ``+-1`` inside, ramped down at its ends, so that

* horizontal stripes ``A v(y) box(x)``, vertical stripes ``A box(y) v(x)`` and the checkerboard
  ``A v(y) v(x)`` all resize to exactly zero (separable resize, one factor in the null space);
* the global view of a scene is the global view of its untextured version, up to the rounding
  of pixels to 8 bits.

A single-view model (grid ``[0, 0]``) sees Pillow's antialiased 2x bicubic resize instead. It
also maps the interior alternation to exactly zero; the ramp keeps its edge response to a few
percent of the texture amplitude (at most 3-5 grey levels at the ends of the texture).
Colours survive both resizes: the texture averages out to the square's own colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

TEXTURES = ("horizontal", "vertical", "checker")
REGIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
# Mid-range colours: every channel leaves room for the +-AMPLITUDE texture without clipping.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (190, 60, 60),
    "orange": (196, 128, 58),
    "yellow": (188, 182, 62),
    "green": (62, 160, 72),
    "blue": (66, 88, 192),
    "purple": (142, 66, 178),
}
COLOUR_JITTER = 10
AMPLITUDE = 48  # grey levels of the texture (peak deviation from the square's colour)
RAMP_PAIRS = 8  # texture envelope ramp, in pairs of pixels, at each end
BACKGROUND = 255

# Keys bicubic (A = -0.75) taps of a 2x downsample at offsets +-0.5 and +-1.5 pixels.
TAP_NEAR, TAP_FAR = 19 / 32, 3 / 32


@dataclass(frozen=True)
class Part:
    """One quadrant of a scene.

    Attributes:
        colour: Colour name (a key of :data:`COLOURS`): the coarse answer.
        texture: One of :data:`TEXTURES`: the fine answer.
        rgb: The square's actual colour (the named colour plus a small jitter).
        inset: Margin between the quadrant edge and the coloured square, in pixels (even).
    """

    colour: str
    texture: str
    rgb: tuple[int, int, int]
    inset: int


@dataclass(frozen=True)
class Scene:
    """Four parts in :data:`REGIONS` order (row-major, as the windows)."""

    parts: tuple[Part, Part, Part, Part]

    def content_key(self) -> tuple[tuple[str, str], ...]:
        """The answers of the scene, ``((colour, texture), ...)``: equal keys mean equal content."""
        return tuple((p.colour, p.texture) for p in self.parts)

    def answer(self, region: str, kind: str) -> str:
        """The answer to a ``fine`` (texture) or ``coarse`` (colour) question about ``region``."""
        part = self.parts[REGIONS.index(region)]
        if kind == "fine":
            return part.texture
        if kind == "coarse":
            return part.colour
        raise ValueError(f"question kind must be 'fine' or 'coarse', got {kind!r}")

    def to_dict(self) -> dict:
        return {
            region: {"colour": p.colour, "texture": p.texture, "rgb": list(p.rgb), "inset": p.inset}
            for region, p in zip(REGIONS, self.parts)
        }


def texture_profile(pairs: int, ramp: int = RAMP_PAIRS) -> np.ndarray:
    """A 1-D alternating profile that a 2x bicubic downsample maps to exactly zero.

    Args:
        pairs: Length of the envelope ``W`` in pixel pairs; the profile covers ``2 * pairs + 2``
            pixels. Place it so that its second pixel has an even coordinate (the first and last
            pixels are the small overshoots just outside the textured area).
        ramp: Pairs over which the envelope rises linearly from 0 to 1 at each end; longer ramps
            shrink the edge response of other resize kernels (Pillow's antialiased one).

    Returns:
        ``[2 * pairs + 2]`` float64; ``+1`` on even and ``-1`` on odd pixels inside the envelope.
    """
    if pairs < 2 * ramp + 1:
        raise ValueError(f"texture of {pairs} pixel pairs is too short for a ramp of {ramp} pairs")
    envelope = np.ones(pairs)
    steps = np.arange(1, ramp + 1) / (ramp + 1)
    if ramp:
        envelope[:ramp] = steps
        envelope[-ramp:] = steps[::-1]
    w = np.concatenate([[0.0], envelope, [0.0]])  # W_{-1} .. W_{pairs}
    even = TAP_NEAR * w[1:] - TAP_FAR * w[:-1]  # e_j for j = 0 .. pairs
    odd = -(TAP_NEAR * w[:-1] - TAP_FAR * w[1:])  # o_j for j = -1 .. pairs - 1
    profile = np.empty(2 * pairs + 2)
    profile[0::2] = odd  # pixel 2j + 1 for j = -1 .. pairs - 1, i.e. offsets 0, 2, ...
    profile[1::2] = even  # pixel 2j for j = 0 .. pairs, i.e. offsets 1, 3, ...
    return profile / (TAP_NEAR - TAP_FAR)


def _texture(kind: str, size: int, ramp: int) -> np.ndarray:
    """``[size + 2, size + 2]`` texture (``+-1`` inside) for a ``size``-pixel square area."""
    v = texture_profile(size // 2, ramp)
    box = np.zeros(size + 2)
    box[1:-1] = 1.0
    if kind == "horizontal":
        return np.outer(v, box)
    if kind == "vertical":
        return np.outer(box, v)
    if kind == "checker":
        return np.outer(v, v)
    raise ValueError(f"unknown texture {kind!r}; choose one of {TEXTURES}")


def render_scene(scene: Scene, size: int = 448, amplitude: int = AMPLITUDE, ramp: int = RAMP_PAIRS) -> Image.Image:
    """Draw a scene as an RGB image.

    Args:
        scene: What to draw.
        size: Side of the image in pixels (a multiple of 4); each part is ``size / 2``.
        amplitude: Peak grey-level deviation of the texture from the square's colour.
        ramp: Envelope ramp of the texture, in pixel pairs (see :func:`texture_profile`).

    Returns:
        A ``size x size`` RGB image.
    """
    if size % 4:
        raise ValueError(f"scene size must be a multiple of 4, got {size}")
    half = size // 2
    canvas = np.full((size, size, 3), float(BACKGROUND))
    for k, part in enumerate(scene.parts):
        top, left = (k // 2) * half, (k % 2) * half
        inset = part.inset
        if inset % 2 or inset < 2:
            raise ValueError(f"part inset must be even and >= 2, got {inset}")
        y0, y1 = top + inset, top + half - inset
        x0, x1 = left + inset, left + half - inset
        canvas[y0:y1, x0:x1] = part.rgb
        # The textured area starts 2 pixels inside the square (an even coordinate, aligned with
        # the downsample's pixel pairs); its 1-pixel overshoot stays on the coloured square.
        area = y1 - y0 - 4
        tex = amplitude * _texture(part.texture, area, ramp)  # [area + 2, area + 2]
        canvas[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] += tex[:, :, None]
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def random_scene(rng: np.random.Generator, size: int = 448) -> Scene:
    """Draw colours, textures, colour jitter and insets independently and uniformly for each part."""
    names = list(COLOURS)
    max_inset = max(2, size // 32)
    parts = []
    for _ in REGIONS:
        colour = names[int(rng.integers(len(names)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(c + j) for c, j in zip(COLOURS[colour], jitter))
        inset = 2 * int(rng.integers(1, max_inset // 2 + 1))
        parts.append(Part(colour, texture, rgb, inset))  # type: ignore[arg-type]
    return Scene(tuple(parts))  # type: ignore[arg-type]
