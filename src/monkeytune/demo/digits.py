"""The demo's second task: real handwritten digits that only the windows can read.

A scene is the same four coloured squares as the texture task (:mod:`monkeytune.demo.scene`), but
each square carries one handwritten digit from the UCI set that scikit-learn ships (8x8 images,
16 grey levels, 1797 of them; no download). The *fine* question asks which digit a part shows,
the *coarse* one its colour.

How a digit is drawn below the global view's resolution
-------------------------------------------------------
A plain small digit survives a 2x downsample (an 8x8 digit still reads at 4x4), so the digit is
written as the *envelope* of the 1-pixel alternation that the 2x bicubic resize maps to zero
(:func:`monkeytune.demo.scene.texture_profile`). The resize is linear and separable, and every
column of :func:`profile_matrix` lies in its null space along one axis, so for *any* envelope
``W`` (pairs x pairs), ``P @ W @ P.T`` resizes to exactly zero: the tiled model's global view of
a scene is the global view of the same scene without digits. In the window the digit is plain: a
checkerboard where the ink is, flat colour elsewhere.

Rounding to 8 bits would leave a digit-shaped error of under half a level that survives the
resize; a triangular dither over each whole square hides it.

The envelope is the 8x8 digit upsampled bilinearly to ``DIGIT_PAIRS`` pairs and blurred
(``ENVELOPE_BLUR`` pairs): Pillow's antialiased resize, which a single-view model sees, maps the
alternation to zero as well but responds to the envelope's edges; the blur keeps that response
under half a grey level before rounding.

Splits: the 1797 digits are split once, by a fixed seed, into 1597 for training (and validation
scenes) and 200 for the test scenes, so no test digit is ever seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from monkeytune.demo.scene import TAP_FAR, TAP_NEAR, BACKGROUND, COLOUR_JITTER, COLOURS, REGIONS

DIGITS = tuple(str(d) for d in range(10))
TEST_DIGITS = 200  # held-out handwritten digits, drawn only in test scenes
SPLIT_SEED = 1797  # fixed: the train/test split of the digits does not move with the demo's seed
DIGIT_PAIRS = 36  # side of a drawn digit, in pixel pairs (72 pixels in a 112-pixel window)
ENVELOPE_BLUR = 2.0  # Gaussian blur of the envelope, in pairs
AMPLITUDE = 48  # grey levels of the alternation where the ink is darkest


class DigitsUnavailable(RuntimeError):
    """scikit-learn (the ``demo`` extra), which ships the digits, is not installed."""


@lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI handwritten digits that scikit-learn ships (read from its package, offline).

    Returns:
        ``(images, labels)``: ``[1797, 8, 8]`` float64 in ``0..16`` and ``[1797]`` int64.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DigitsUnavailable(
            "the digits task needs scikit-learn, which ships the UCI digits: pip install 'monkeytune[demo]'"
        ) from exc
    bunch = sk_load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def digit_split() -> dict[str, np.ndarray]:
    """Indices of the training and test digits: ``{"train": [1597], "test": [200]}``, disjoint."""
    _, labels = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    return {"train": np.sort(order[TEST_DIGITS:]), "test": np.sort(order[:TEST_DIGITS])}


@lru_cache(maxsize=8)
def profile_matrix(pairs: int) -> np.ndarray:
    """The linear map from an envelope to an alternating profile that a 2x bicubic resize zeroes.

    Column ``j`` is the profile of the envelope ``W = e_j``; any ``P @ W`` is mapped to zero by the
    resize (same construction as :func:`monkeytune.demo.scene.texture_profile`).

    Returns:
        ``[2 * pairs + 2, pairs]`` float64, read-only (cached: every drawn digit uses it). Place
        row 1 at an even pixel coordinate.
    """
    matrix = np.zeros((2 * pairs + 2, pairs))
    for j in range(pairs):
        w = np.zeros(pairs + 2)  # W_{-1} .. W_{pairs}
        w[j + 1] = 1.0
        matrix[0::2, j] = -(TAP_NEAR * w[:-1] - TAP_FAR * w[1:])  # odd pixels
        matrix[1::2, j] = TAP_NEAR * w[1:] - TAP_FAR * w[:-1]  # even pixels
    matrix /= TAP_NEAR - TAP_FAR
    matrix.setflags(write=False)
    return matrix


def digit_envelope(image: np.ndarray, pairs: int = DIGIT_PAIRS, blur: float = ENVELOPE_BLUR) -> np.ndarray:
    """An 8x8 digit (``0..16``) as a smooth ``[pairs, pairs]`` envelope in ``0..1``."""
    t = torch.as_tensor(image, dtype=torch.float64)[None, None] / 16.0
    t = F.interpolate(t, size=(pairs, pairs), mode="bilinear", align_corners=False)
    if blur > 0:
        radius = int(3 * blur)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (x / blur) ** 2)
        k = k / k.sum()
        t = F.conv2d(F.pad(t, (radius, radius, 0, 0)), k.view(1, 1, 1, -1))
        t = F.conv2d(F.pad(t, (0, 0, radius, radius)), k.view(1, 1, -1, 1))
    return t[0, 0].numpy()


def digit_texture(image: np.ndarray, pairs: int = DIGIT_PAIRS, amplitude: float = AMPLITUDE) -> np.ndarray:
    """``[2 * pairs + 2, 2 * pairs + 2]`` grey-level offsets that draw ``image`` in the windows only."""
    p = profile_matrix(pairs)
    return amplitude * p @ digit_envelope(image, pairs) @ p.T


@dataclass(frozen=True)
class DigitPart:
    """One quadrant: a coloured square carrying one handwritten digit.

    Attributes:
        colour: Colour name (a key of :data:`COLOURS`): the coarse answer.
        digit: Index of the handwritten digit in :func:`load_digits`.
        label: The digit it shows (``"0"`` .. ``"9"``): the fine answer.
        rgb: The square's actual colour.
        inset: Margin between the quadrant edge and the square, in pixels (even).
        offset: ``(dy, dx)`` of the digit inside the square's drawable area, in pixels (even).
        dither: Seed of the sub-level noise added before rounding to 8 bits.
    """

    colour: str
    digit: int
    label: str
    rgb: tuple[int, int, int]
    inset: int
    offset: tuple[int, int]
    dither: int = 0


@dataclass(frozen=True)
class DigitScene:
    """Four parts in :data:`REGIONS` order (row-major, as the windows)."""

    parts: tuple[DigitPart, DigitPart, DigitPart, DigitPart]

    def content_key(self) -> tuple[tuple[str, int], ...]:
        """Colours and digit images: equal keys mean equal content."""
        return tuple((p.colour, p.digit) for p in self.parts)

    def answer(self, region: str, kind: str) -> str:
        """The answer to a ``fine`` (digit) or ``coarse`` (colour) question about ``region``."""
        part = self.parts[REGIONS.index(region)]
        if kind == "fine":
            return part.label
        if kind == "coarse":
            return part.colour
        raise ValueError(f"question kind must be 'fine' or 'coarse', got {kind!r}")

    def to_dict(self) -> dict:
        return {region: {"colour": p.colour, "digit": p.label, "uci_index": p.digit, "rgb": list(p.rgb),
                         "inset": p.inset, "offset": list(p.offset)}
                for region, p in zip(REGIONS, self.parts)}


def _drawable(size: int, inset: int) -> int:
    """Side of the area inside a part's square where the alternation may go (2 pixels in)."""
    return size // 2 - 2 * inset - 4


def random_digit_scene(rng: np.random.Generator, digits: list[int], size: int = 224) -> DigitScene:
    """Four parts showing ``digits`` (indices into :func:`load_digits`), with random colours and places."""
    _, labels = load_digits()
    names = list(COLOURS)
    span = 2 * DIGIT_PAIRS + 2
    parts = []
    for digit in digits:
        colour = names[int(rng.integers(len(names)))]
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(c + j) for c, j in zip(COLOURS[colour], jitter))
        inset = 2 * int(rng.integers(1, max(2, size // 32) // 2 + 1))
        room = _drawable(size, inset) - span
        if room < 0:
            raise ValueError(f"a {size}-pixel scene has no room for {span}-pixel digits")
        # Centred in its square: the inset alone moves it, by a few pixels.
        offset = (2 * (room // 4), 2 * (room // 4))
        dither = int(rng.integers(2**31))
        label = str(int(labels[digit]))
        parts.append(DigitPart(colour, int(digit), label, rgb, inset, offset, dither))  # type: ignore[arg-type]
    return DigitScene(tuple(parts))  # type: ignore[arg-type]


def render_digit_scene(scene: DigitScene, size: int = 224) -> Image.Image:
    """Draw a scene as a ``size x size`` RGB image (``size`` a multiple of 4)."""
    if size % 4:
        raise ValueError(f"scene size must be a multiple of 4, got {size}")
    images, _ = load_digits()
    half = size // 2
    canvas = np.full((size, size, 3), float(BACKGROUND))
    for k, part in enumerate(scene.parts):
        top, left = (k // 2) * half, (k % 2) * half
        y0, x0 = top + part.inset, left + part.inset
        canvas[y0 : top + half - part.inset, x0 : left + half - part.inset] = part.rgb
        tex = digit_texture(images[part.digit])
        # Row/column 1 of the texture lands on an even coordinate (the resize's pixel pairs);
        # rows 0 and -1 are the overshoot, still on the square.
        y, x = y0 + 2 + part.offset[0] - 1, x0 + 2 + part.offset[1] - 1
        canvas[y : y + tex.shape[0], x : x + tex.shape[1]] += tex[:, :, None]
        # Rounding the alternation to 8 bits leaves a sub-level error where the ink is, which the
        # global view keeps; a triangular dither over the whole square spreads it evenly.
        square = canvas[y0 : top + half - part.inset, x0 : left + half - part.inset]
        # Triangular dither (two uniforms) makes both the mean and the power of the rounding error
        # independent of the signal.
        noise = np.random.default_rng(part.dither).uniform(-0.5, 0.5, size=(2, *square.shape[:2])).sum(0)
        square += noise[:, :, None]
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def digit_scenes(rng: np.random.Generator, counts: dict[str, int], size: int = 224) -> dict[str, list[DigitScene]]:
    """Scenes per split; test scenes draw only test digits, each at most once while they last.

    Training (and validation) scenes cycle through the shuffled training digits, so every
    training digit appears about equally often, each time with other colours and places.
    """
    split = digit_split()
    out: dict[str, list[DigitScene]] = {}
    pools = {"train": split["train"], "val": split["train"], "test": split["test"]}
    for name in ("train", "val", "test"):
        n = counts.get(name, 0)
        pool = pools[name]
        order = np.concatenate([rng.permutation(pool) for _ in range(-(-4 * n // len(pool)) or 1)])
        out[name] = [random_digit_scene(rng, [int(d) for d in order[4 * i : 4 * i + 4]], size) for i in range(n)]
    return out
