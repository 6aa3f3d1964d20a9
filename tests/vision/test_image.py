"""load_image: every PIL mode to the expected RGB, EXIF orientation, and loud failures."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monkeytune.vision.image import ImageLoadError, load_image

BIG = 10**9


def _pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (254 * 3))
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 0  # palette index 0 is fully transparent
    return image


def _gray16(values, mode="I;16") -> Image.Image:
    array = np.array(values, dtype=np.uint16).reshape(1, -1)
    return Image.fromarray(array).convert(mode) if mode == "I" else _as_mode16(array, mode)


def _as_mode16(array: np.ndarray, mode: str) -> Image.Image:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (array.shape[1], array.shape[0]), array.astype(dtype).tobytes())


@pytest.mark.parametrize(
    "make, xy, expected",
    [
        (lambda: Image.new("RGB", (3, 3), (10, 20, 30)), (1, 1), (10, 20, 30)),
        (lambda: Image.new("RGBA", (3, 3), (10, 20, 30, 0)), (0, 0), (255, 255, 255)),
        (lambda: Image.new("RGBA", (3, 3), (10, 20, 30, 255)), (0, 0), (10, 20, 30)),
        (lambda: Image.new("LA", (3, 3), (40, 0)), (0, 0), (255, 255, 255)),
        (lambda: Image.new("LA", (3, 3), (40, 255)), (0, 0), (40, 40, 40)),
        (lambda: Image.new("L", (3, 3), 77), (2, 2), (77, 77, 77)),
        (lambda: _palette_image(False), (0, 0), (10, 20, 30)),
        (lambda: _palette_image(False), (1, 0), (200, 100, 50)),
        (lambda: _palette_image(True), (0, 0), (255, 255, 255)),
        (lambda: _palette_image(True), (1, 0), (200, 100, 50)),
        (lambda: Image.new("CMYK", (3, 3), (0, 0, 0, 0)), (0, 0), (255, 255, 255)),
        (lambda: Image.new("CMYK", (3, 3), (255, 0, 0, 0)), (0, 0), (0, 255, 255)),
        (lambda: Image.new("CMYK", (3, 3), (0, 0, 0, 255)), (0, 0), (0, 0, 0)),
        (lambda: Image.new("1", (3, 3), 1), (0, 0), (255, 255, 255)),
        (lambda: Image.new("1", (3, 3), 0), (0, 0), (0, 0, 0)),
    ],
)
def test_modes_load_to_expected_rgb(make, xy, expected):
    assert _pixel(load_image(make(), BIG), xy) == expected


def test_half_transparent_is_blended_with_white():
    out = load_image(Image.new("RGBA", (2, 2), (0, 0, 200, 128)), BIG)
    r, g, b = _pixel(out)
    white_share = 1 - 128 / 255
    assert abs(r - 255 * white_share) <= 1 and abs(g - 255 * white_share) <= 1
    assert abs(b - (200 * 128 / 255 + 255 * white_share)) <= 1


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_gray_is_scaled_not_clipped(mode):
    values = [0, 257, 257 * 100, 32768, 65280, 65535]
    image = _gray16(values, mode)
    assert image.mode == mode
    out = np.asarray(load_image(image, BIG))
    assert out.shape == (1, len(values), 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    # round(v / 257); >> 8 agrees on all of these
    assert out[0, :, 0].tolist() == [0, 1, 100, 128, 254, 255]


def test_16_bit_gradient_uses_the_whole_8_bit_range(tmp_path: Path):
    ramp = np.linspace(0, 65535, 256 * 4).astype(np.uint16).reshape(4, 256)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path, BIG))[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 250  # not clipped to a handful of values
    assert np.abs(out - ramp.astype(float) / 257).max() <= 0.5 + 1e-9


def test_rgba_file_from_path(tmp_path: Path):
    image = Image.new("RGBA", (6, 4), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 3, 4))
    path = tmp_path / "half.png"
    image.save(path)
    out = load_image(str(path), BIG)
    assert out.mode == "RGB" and out.size == (6, 4)
    assert _pixel(out, (1, 1)) == (255, 0, 0)
    assert _pixel(out, (4, 1)) == (255, 255, 255)


def test_input_image_is_not_modified_and_not_returned():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    out = load_image(image, BIG)
    assert out is not image
    out.putpixel((0, 0), (9, 9, 9))
    assert image.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "orientation, top, bottom", [(6, (255, 0, 0), (0, 0, 255)), (8, (0, 0, 255), (255, 0, 0))]
)
def test_exif_orientation_rotates(tmp_path: Path, orientation, top, bottom):
    # Stored 40 wide x 20 high: left half red, right half blue.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.png"
    image.save(path, exif=exif)
    out = load_image(path, BIG)
    # 6: rotate 90 degrees clockwise to display, so the left (red) half ends up on top; 8: the reverse.
    assert out.size == (20, 40)
    assert _pixel(out, (10, 5)) == top
    assert _pixel(out, (10, 35)) == bottom


def test_exif_orientation_on_lossy_jpeg(tmp_path: Path):
    image = Image.new("RGB", (64, 32), (250, 0, 0))
    image.paste((0, 0, 250), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif, quality=95)
    out = load_image(path, BIG)
    assert out.size == (32, 64)
    r, _, b = _pixel(out, (16, 8))
    assert r > 200 and b < 60


def _assert_error_names(exc_info, path: Path, reason_fragment: str) -> None:
    message = str(exc_info.value)
    assert str(path) in message
    assert reason_fragment.lower() in message.lower()


def test_zero_byte_file(tmp_path: Path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(path, BIG)
    _assert_error_names(info, path, "empty")


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageLoadError) as info:
        load_image(path, BIG)
    _assert_error_names(info, path, "not found")


def test_not_an_image(tmp_path: Path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is plain text, not a picture\n" * 20)
    with pytest.raises(ImageLoadError) as info:
        load_image(path, BIG)
    _assert_error_names(info, path, "not a recognised image")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_does_not_load_silently(tmp_path: Path, fmt: str):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    full = tmp_path / f"full.{fmt.lower()}"
    noise.save(full, fmt)
    data = full.read_bytes()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert Image.open(path).size == (64, 64)  # the header alone still parses
    with pytest.raises(ImageLoadError) as info:
        load_image(path, BIG)
    _assert_error_names(info, path, "truncated")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels but which holds no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_too_many_pixels_is_refused_from_the_header(tmp_path: Path):
    # 5000 x 5000 is under PIL's own bomb limit; the file has no pixel data, so decoding first
    # would give a truncation error instead of the size error.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(5000, 5000))
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=1_000_000)
    _assert_error_names(info, path, "max_pixels")
    assert "5000x5000" in str(info.value)


def test_pil_decompression_bomb_error_is_wrapped(tmp_path: Path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(20000, 20000))  # over twice PIL's MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=10**12)
    _assert_error_names(info, path, "too many pixels")


def test_max_pixels_boundary_and_in_memory_images(tmp_path: Path):
    path = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(path)
    assert load_image(path, max_pixels=200).size == (20, 10)
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(path, max_pixels=199)
    with pytest.raises(ImageLoadError, match="in-memory RGB image 20x10"):
        load_image(Image.new("RGB", (20, 10)), max_pixels=199)
