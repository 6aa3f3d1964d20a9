"""Upload checks and the tiling picture."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from monkeytune.config import ImageConfig, get_config
from monkeytune.serve.tiling import GAP, TilingView, describe_tiling
from monkeytune.serve.uploads import UploadError, UploadLimits, check_upload


def test_a_good_upload_loads_as_rgb(picture):
    image = check_upload(picture)
    assert image.mode == "RGB" and image.size == (300, 200)


def _png_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "content, limits, message",
    [
        (b"", UploadLimits(), "is empty"),
        (b"%PDF-1.4 not an image at all", UploadLimits(), "not a recognised image"),
        (_png_bytes()[:120], UploadLimits(), "cannot be used as an image"),  # truncated
        (_png_bytes(), UploadLimits(max_bytes=100), "largest accepted image"),
        (_png_bytes((64, 64)), UploadLimits(max_pixels=1000), "max_pixels"),
    ],
    ids=["empty", "not-an-image", "truncated", "too-many-bytes", "too-many-pixels"],
)
def test_bad_uploads_get_a_message_naming_the_file(tmp_path, content, limits, message):
    stored = tmp_path / "stored-under-a-server-name.png"
    stored.write_bytes(content)
    with pytest.raises(UploadError, match=message) as err:
        check_upload(stored, limits, name="holiday.png")
    assert "holiday.png" in str(err.value)
    assert str(tmp_path) not in str(err.value), "server paths must not reach the page"


def test_missing_upload(tmp_path):
    with pytest.raises(UploadError, match="upload it again"):
        check_upload(tmp_path / "nothing.png")


def test_tiling_shows_windows_and_global_view_as_the_model_sees_them(picture):
    cfg = get_config("tiny").image  # 2x2 windows of 224 px, stretch, global view
    picture_rgb = Image.open(picture).convert("RGB")
    out = TilingView(cfg).draw(picture_rgb)
    assert out.size == (448 + GAP + 448, 448)
    # The canvas is the image stretched to 448x448: the red square's centre (70, 100) of
    # 300x200 lands at (104, 224), the blue one's (230, 100) at (343, 224); y = 180 avoids the window border at 224.
    red, blue = out.getpixel((104, 180)), out.getpixel((343, 180))
    assert red[0] > 150 and red[2] < 90 and blue[2] > 150 and blue[0] < 90
    # The global view sits to the right and shows the same scene at a quarter of the pixels.
    g_red = out.getpixel((448 + GAP + 104, 180))
    assert g_red[0] > 150 and g_red[2] < 90
    # Window outlines are drawn in colour on the window borders.
    assert out.getpixel((224, 300)) != out.getpixel((200, 300))


def test_tiling_of_a_single_view_layout_and_large_canvas(picture):
    single = ImageConfig(grid=[0, 0], window_size=448, global_view=True)
    assert TilingView(single).draw(Image.open(picture)).size == (448, 448)
    big = get_config("monkey-7b").image  # 896 px canvas, scaled down for the page
    out = TilingView(big).draw(Image.open(picture))
    assert out.size[1] == 640 and out.size[0] == 640 + GAP + 640


def test_describe_tiling():
    text = describe_tiling(get_config("monkey-7b").image, 256)
    assert text == "896x896 canvas (stretch): 2x2 windows of 448 px + a 448 px global view; 5 views x 256 = 1280 visual tokens"
