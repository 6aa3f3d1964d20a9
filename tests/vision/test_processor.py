"""ImageProcessor: view layout, exact official stretch pipeline, crop/pad geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from monkeytune.config import CLIP_MEAN, CLIP_STD, ImageConfig
from monkeytune.vision.image import ImageLoadError
from monkeytune.vision.processor import ImageProcessor, ProcessedImage

MEAN = np.array(CLIP_MEAN, dtype=np.float32)
STD = np.array(CLIP_STD, dtype=np.float32)
RED = (230, 20, 20)
BLUE = (20, 20, 230)
GREY = (100, 100, 100)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _normalised(image: Image.Image) -> np.ndarray:
    """Independent ToTensor + Normalize in numpy: [3, H, W] float32."""
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return ((array - MEAN) / STD).transpose(2, 0, 1)


def _reassemble(views: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Windows [rows*cols, 3, S, S] (row-major) -> canvas [3, rows*S, cols*S]."""
    lines = [torch.cat(list(views[r * cols : (r + 1) * cols]), dim=2) for r in range(rows)]
    return torch.cat(lines, dim=1)


def _to_uint8(canvas: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: [3, H, W] -> [H, W, 3] in 0..255 (float)."""
    array = canvas.numpy().transpose(1, 2, 0)
    return (array * STD + MEAN) * 255


def _mask(array: np.ndarray, colour) -> np.ndarray:
    return (np.abs(array - np.array(colour, dtype=np.float32)) < 40).all(axis=-1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def _marked_wide_image() -> Image.Image:
    """900 wide x 300 high grey image: 100x100 squares, red in the centre, blue at the left edge."""
    image = Image.new("RGB", (900, 300), GREY)
    image.paste(RED, (400, 100, 500, 200))
    image.paste(BLUE, (0, 100, 100, 200))
    return image


@pytest.mark.parametrize(
    "grid, global_view, slots",
    [
        ([2, 2], True, [0, 1, 2, 3, -1]),
        ([0, 0], True, [-1]),
        ([1, 3], False, [0, 1, 2]),
        ([1, 3], True, [0, 1, 2, -1]),
        ([3, 2], False, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_view_counts_and_slots_follow_the_config(grid, global_view, slots):
    processor = ImageProcessor(ImageConfig(grid=grid, window_size=28, global_view=global_view))
    out = processor(_noise(40, 30))
    assert isinstance(out, ProcessedImage)
    assert processor.num_views == len(slots)
    assert out.views.shape == (len(slots), 3, 28, 28) and out.views.dtype == torch.float32
    assert out.slots.dtype == torch.int64 and out.slots.tolist() == slots
    assert out.grid == tuple(grid)


def test_stretch_reproduces_the_official_pipeline_on_a_non_square_grid():
    size, rows, cols = 28, 2, 3
    processor = ImageProcessor(ImageConfig(grid=[rows, cols], window_size=size, resize_mode="stretch"))
    image = _noise(50, 37)
    out = processor(image)

    canvas = _normalised(image.resize((cols * size, rows * size), Image.Resampling.BICUBIC))
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        expected = canvas[:, r * size : (r + 1) * size, c * size : (c + 1) * size]
        np.testing.assert_allclose(out.views[k].numpy(), expected, rtol=0, atol=1e-6)
    expected_global = F.interpolate(
        torch.from_numpy(canvas)[None], size=(size, size), mode="bicubic", align_corners=False
    )[0]
    torch.testing.assert_close(out.views[-1], expected_global, rtol=0, atol=1e-6)
    # The global view is the tensor interpolation, not a fresh Pillow (antialiased) resize.
    pillow_global = _normalised(image.resize((size, size), Image.Resampling.BICUBIC))
    assert np.abs(out.views[-1].numpy() - pillow_global).max() > 0.05


def test_no_windows_is_a_single_pillow_resize_to_the_view_size():
    processor = ImageProcessor(ImageConfig(grid=[0, 0], window_size=56))
    image = _noise(90, 61, seed=3)
    out = processor(image)
    expected = _normalised(image.resize((56, 56), Image.Resampling.BICUBIC))
    assert out.views.shape == (1, 3, 56, 56)
    np.testing.assert_allclose(out.views[0].numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_crop_and_pad_global_view_is_the_interpolated_canvas(mode):
    processor = ImageProcessor(ImageConfig(grid=[1, 3], window_size=28, resize_mode=mode))
    out = processor(_noise(31, 47))
    canvas = _reassemble(out.views[:3], 1, 3)
    np.testing.assert_allclose(canvas.numpy(), _normalised(processor.canvas(_noise(31, 47))), atol=1e-6)
    expected = F.interpolate(canvas[None], size=(28, 28), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(out.views[3], expected, rtol=0, atol=1e-6)


def test_stretch_distorts_a_wide_image():
    processor = ImageProcessor(ImageConfig(grid=[2, 2], window_size=56, resize_mode="stretch"))
    canvas = _to_uint8(_reassemble(processor(_marked_wide_image()).views[:4], 2, 2))
    top, bottom, left, right = _bbox(_mask(canvas, RED))
    # x: 400..500 of 900 -> 49.8..62.2 of 112; y: 100..200 of 300 -> 37.3..74.7 of 112.
    assert abs(left - 50) <= 1 and abs(right - 62) <= 1
    assert abs(top - 37) <= 1 and abs(bottom - 74) <= 1
    assert (bottom - top) > 2.5 * (right - left)  # the square became a tall rectangle
    assert _mask(canvas, BLUE).any()


def test_crop_keeps_the_aspect_and_cuts_the_borders():
    processor = ImageProcessor(ImageConfig(grid=[2, 2], window_size=56, resize_mode="crop"))
    canvas = _to_uint8(_reassemble(processor(_marked_wide_image()).views[:4], 2, 2))
    # Height 300 -> 112 (scale 0.3733); the central 300 columns (300..600) fill the width.
    top, bottom, left, right = _bbox(_mask(canvas, RED))
    # Red square 400..500 x 100..200 -> 37.3..74.7 on both axes: still a square.
    assert abs(left - 37) <= 1 and abs(right - 74) <= 1
    assert abs(top - 37) <= 1 and abs(bottom - 74) <= 1
    assert not _mask(canvas, BLUE).any()  # the left border is gone
    assert np.abs(canvas[:5] - GREY).max() < 2  # no bars: the image covers the canvas


def test_pad_keeps_everything_with_mean_colour_bars():
    processor = ImageProcessor(ImageConfig(grid=[2, 2], window_size=56, resize_mode="pad"))
    out = processor(_marked_wide_image())
    normalised = _reassemble(out.views[:4], 2, 2)
    canvas = _to_uint8(normalised)
    # Width 900 -> 112 (scale 0.1244), height 300 -> 37, pasted at row (112 - 37) // 2 = 37.
    top, bottom, left, right = _bbox(_mask(canvas, RED))
    assert abs(left - 50) <= 1 and abs(right - 62) <= 1
    assert abs(top - 49) <= 1 and abs(bottom - 61) <= 1
    assert abs((bottom - top) - (right - left)) <= 1  # still a square
    b_top, b_bottom, b_left, _ = _bbox(_mask(canvas, BLUE))
    assert b_left == 0 and abs(b_top - 49) <= 1 and abs(b_bottom - 61) <= 1  # left border kept
    # Bars above and below the image are the mean colour, which normalises to about zero.
    assert normalised[:, :36].abs().max() < 0.01
    assert normalised[:, 75:].abs().max() < 0.01
    assert out.views[0][:, :30].abs().max() < 0.01
    assert np.abs(canvas[40:70, 80:100] - GREY).max() < 3  # the picture itself is there


def test_modes_agree_when_the_aspect_already_matches():
    image = _noise(90, 30, seed=5)  # 3:1, like a [1, 3] grid
    outs = [
        ImageProcessor(ImageConfig(grid=[1, 3], window_size=28, resize_mode=mode))(image).views
        for mode in ("stretch", "crop", "pad")
    ]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-6)


def test_crop_on_a_square_image_with_a_wide_grid_cuts_top_and_bottom():
    image = Image.new("RGB", (300, 300), GREY)
    image.paste(RED, (0, 0, 300, 60))  # a red band along the top fifth
    processor = ImageProcessor(ImageConfig(grid=[1, 3], window_size=28, resize_mode="crop"))
    canvas = processor.canvas(image)
    assert canvas.size == (84, 28)
    # Only rows 100..200 of the source are kept, so the red band is gone.
    assert not _mask(np.asarray(canvas, dtype=np.float32), RED).any()


def test_default_896_geometry():
    processor = ImageProcessor(ImageConfig())
    out = processor(_noise(64, 48))
    assert processor.cfg.canvas_size == (896, 896)
    assert out.views.shape == (5, 3, 448, 448)
    assert out.slots.tolist() == [0, 1, 2, 3, -1]
    assert out.grid == (2, 2)


def test_paths_and_odd_modes_go_through_load_image(tmp_path: Path):
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 20, 20))
    path = tmp_path / "half.png"
    rgba.save(path)
    processor = ImageProcessor(ImageConfig(grid=[1, 2], window_size=28, global_view=False))
    out = processor(path)
    on_white = Image.new("RGB", (40, 20), (255, 255, 255))
    on_white.paste((255, 0, 0), (0, 0, 20, 20))
    torch.testing.assert_close(out.views, processor(on_white).views, rtol=0, atol=0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="bad.png"):
        processor(bad)


def test_batch_concatenates_views_and_slots():
    processor = ImageProcessor(ImageConfig(grid=[1, 2], window_size=28))
    images = [_noise(30, 40, seed=1), _noise(77, 20, seed=2)]
    views, slots = processor.batch(images)
    assert views.shape == (6, 3, 28, 28)
    assert slots.tolist() == [0, 1, -1, 0, 1, -1]
    torch.testing.assert_close(views[3:], processor(images[1]).views, rtol=0, atol=0)
    empty_views, empty_slots = processor.batch([])
    assert empty_views.shape == (0, 3, 28, 28) and empty_slots.shape == (0,)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"resize_mode": "zoom"}, "resize_mode"),
        ({"grid": [0, 0], "global_view": False}, "no views"),
        ({"grid": [0, 2]}, "grid"),
        ({"window_size": 0}, "window_size"),
    ],
)
def test_bad_config_is_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ImageProcessor(ImageConfig(**kwargs))


@pytest.mark.parametrize("image, message", [
    ({"grid": [2, 0]}, "half-empty grid"),
    ({"grid": [-1, 2]}, "image.grid must be two integers >= 0"),
    ({"grid": [0, 0], "global_view": False}, "no views"),
    ({"window_size": 0}, "image.window_size must be an integer >= 1"),
    ({"std": [0.5, 0.0, 0.5]}, "image.std must be positive"),
    ({"resize_mode": "squash"}, "image.resize_mode must be one of"),
])
def test_the_model_config_and_the_processor_refuse_the_same_image_layouts(image, message):
    # One validator: a layout the model config accepts is one the processor can cut.
    import dataclasses

    from monkeytune.config import get_config

    bad = ImageConfig(**image)
    with pytest.raises(ValueError, match=message):
        ImageProcessor(bad)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_config("tiny"), image=bad).validate()
