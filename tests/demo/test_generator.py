"""The demo data: answers match the pixels, splits are disjoint, and the fine detail is invisible
to the global view but plain in the windows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from monkeytune.config import get_config
from monkeytune.demo.generator import QUESTIONS, DemoData, generate_dataset, question_text
from monkeytune.demo.scene import COLOURS, REGIONS, TEXTURES, Part, Scene, render_scene, texture_profile
from monkeytune.prompts import user_text
from monkeytune.tokenizer.simple import SimpleTokenizer
from monkeytune.vision.processor import ImageProcessor


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DemoData:
    return generate_dataset(tmp_path_factory.mktemp("demo"), seed=3, n_train=6, n_val=3, n_test=3, progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_pixels(path: Path) -> list[tuple[str, str]]:
    """Decode (colour, texture) of each part from the pixels alone."""
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    half = img.shape[0] // 2
    out = []
    for k in range(4):
        top, left = (k // 2) * half, (k % 2) * half
        c = half // 2
        # An even-aligned 32x32 block in the middle of the part: the texture is +-A there and
        # averages to zero, leaving the square's colour.
        block = img[top + c - 16 : top + c + 16, left + c - 16 : left + c + 16]
        mean = block.mean(axis=(0, 1))
        colour = min(COLOURS, key=lambda n: np.abs(np.array(COLOURS[n]) - mean).max())
        grey = block.mean(axis=2)
        dy = np.abs(np.diff(grey, axis=0)).mean()  # large when rows alternate
        dx = np.abs(np.diff(grey, axis=1)).mean()  # large when columns alternate
        texture = "checker" if min(dx, dy) > 10 else ("horizontal" if dy > dx else "vertical")
        out.append((colour, texture))
    return out


def test_texture_profile_vanishes_under_2x_bicubic():
    v = torch.tensor(texture_profile(40, ramp=8))
    signal = torch.zeros(256, dtype=torch.float64)
    signal[99 : 99 + v.numel()] = v  # second pixel (the first inside) at an even coordinate
    image = signal.view(1, 1, -1, 1).expand(1, 1, -1, 4)
    down = F.interpolate(image, size=(128, 2), mode="bicubic", align_corners=False)
    assert down.abs().max() < 1e-12
    assert v[2:-2].abs().min() > 0  # a real texture, not an empty one
    # Shifted by one pixel, the same profile does leak: the alignment matters.
    shifted = torch.zeros(256, dtype=torch.float64)
    shifted[100 : 100 + v.numel()] = v
    leak = F.interpolate(shifted.view(1, 1, -1, 1).expand(1, 1, -1, 4), size=(128, 2), mode="bicubic", align_corners=False)
    assert leak.abs().max() > 0.05


def test_answers_are_consistent_with_pixels(data):
    scenes = {row["image"]: row for row in _jsonl(data.root / "scenes.jsonl")}
    assert len(scenes) == 12
    for rel, row in scenes.items():
        decoded = read_pixels(data.root / rel)
        assert decoded == [(row["parts"][r]["colour"], row["parts"][r]["texture"]) for r in REGIONS]
    for path in (data.train, data.train_fine, data.train_coarse):
        for rec in _jsonl(path):
            turns = rec["conversations"]
            rel = turns[0]["value"].split("<img>")[1].split("</img>")[0]
            decoded = dict(zip(REGIONS, read_pixels(data.root / rel)))
            for user, answer in zip(turns[0::2], turns[1::2]):
                region = next(r for r in REGIONS if f"the {r} part" in user["value"])
                colour, texture = decoded[region]
                assert answer["value"] in (colour, texture)
                expected = texture if "pattern" in user["value"] or "texture" in user["value"] else colour
                assert answer["value"] == expected
    for path in (data.val, data.test):
        recs = _jsonl(path)
        assert len(recs) == 3 * 8
        for rec in recs:
            colour, texture = dict(zip(REGIONS, read_pixels(data.root / rec["image"])))[rec["region"]]
            assert rec["answer"] == (texture if rec["kind"] == "fine" else colour)
            assert rec["region"] in rec["question"]


def test_splits_do_not_overlap(data):
    rows = _jsonl(data.root / "scenes.jsonl")
    by_split: dict[str, list[dict]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(row)
    assert {k: len(v) for k, v in by_split.items()} == {"train": 6, "val": 3, "test": 3}
    keys = {
        split: {tuple((p["colour"], p["texture"]) for p in (r["parts"][reg] for reg in REGIONS)) for r in rs}
        for split, rs in by_split.items()
    }
    images = {split: {r["image"] for r in rs} for split, rs in by_split.items()}
    pixels = {split: {hashlib.sha1((data.root / r["image"]).read_bytes()).hexdigest() for r in rs} for split, rs in by_split.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not keys[a] & keys[b]
        assert not images[a] & images[b]
        assert not pixels[a] & pixels[b]
    # The training files only use training images; the eval files only their own split.
    for path in (data.train, data.train_fine, data.train_coarse):
        for rec in _jsonl(path):
            assert "<img>images/train/" in rec["conversations"][0]["value"]
    assert all(r["image"].startswith("images/test/") for r in _jsonl(data.test))


def test_training_files_hold_the_right_kinds(data):
    mixed = _jsonl(data.train)
    assert len(mixed) == 6 * 8  # every training image, every region, fine and coarse
    for path, kind, answers in ((data.train_fine, "fine", set(TEXTURES)), (data.train_coarse, "coarse", set(COLOURS))):
        recs = _jsonl(path)
        assert len(recs) == 6 * 4
        assert all(r["kind"] == kind for r in recs)
        assert {r["conversations"][1]["value"] for r in recs} <= answers
        assert [r for r in mixed if r["kind"] == kind] == recs  # the same records, same order
    for r in mixed:
        # One question per record, laid out as the evaluation prompt: question, image, "Answer: ".
        user, answer = r["conversations"]
        assert user["from"] == "user" and answer["from"] == "assistant"
        question, rest = user["value"].split(" <img>")
        assert question.endswith(" part?") and rest.startswith("images/train/") and rest.endswith("</img> Answer: ")
        assert user["value"] == user_text("vqa-question-first", question, rest.split("</img>")[0])
    # Each image is asked about every region, in both kinds.
    asked = {(r["conversations"][0]["value"].split("<img>")[1], r["kind"], r["id"].rsplit("-", 2)[-2] + "-" + r["id"].rsplit("-", 1)[-1]) for r in mixed}
    assert len(asked) == 6 * 8


def _pair(texture_a: str, texture_b: str, size: int = 448) -> tuple[Image.Image, Image.Image]:
    """Two scenes identical except for the texture of the top-left part."""
    parts = (
        Part("green", texture_a, (70, 150, 80), 8),
        Part("red", "vertical", (185, 64, 60), 4),
        Part("blue", "checker", (60, 90, 185), 12),
        Part("yellow", "horizontal", (190, 176, 70), 6),
    )
    a = Scene(parts)
    b = Scene((dataclasses.replace(parts[0], texture=texture_b),) + parts[1:])
    return render_scene(a, size), render_scene(b, size)


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("pair", [("horizontal", "vertical"), ("horizontal", "checker"), ("vertical", "checker")])
def test_fine_detail_is_below_the_global_view_resolution(pair, size):
    img_a, img_b = _pair(*pair, size=size)
    cfg = dataclasses.replace(get_config("tiny").image, window_size=size // 2)
    va, vb = ImageProcessor(cfg)(img_a).views, ImageProcessor(cfg)(img_b).views  # [5, 3, size/2, size/2]
    diff = (va - vb).abs().flatten(1).max(dim=1).values
    one_level = 1 / 255 / max(cfg.std)
    # The top-left window sees the texture at full resolution ...
    assert diff[0] > 60 * one_level
    # ... the other windows are untouched, and the global view is the same to within a grey level.
    assert torch.all(diff[1:4] == 0)
    assert diff[4] < one_level
    # A single-view model (Pillow's antialiased resize of the whole image) is blind to it too.
    single = dataclasses.replace(cfg, grid=[0, 0])
    sa, sb = ImageProcessor(single)(img_a).views, ImageProcessor(single)(img_b).views
    # Only the ramped ends of the texture leak, by a few grey levels at most.
    assert (sa - sb).abs().max() <= 6 * one_level


def test_generation_is_deterministic(tmp_path, data):
    again = generate_dataset(tmp_path / "again", seed=3, n_train=6, n_val=3, n_test=3, progress=False)
    for name in ("train.jsonl", "train_fine.jsonl", "val.jsonl", "test.jsonl", "scenes.jsonl", "images/test/00002.png"):
        assert (again.root / name).read_bytes() == (data.root / name).read_bytes(), name
    other = generate_dataset(tmp_path / "other", seed=4, n_train=6, n_val=3, n_test=3, progress=False)
    assert (other.root / "scenes.jsonl").read_bytes() != (data.root / "scenes.jsonl").read_bytes()


def test_tokenizer_encodes_every_answer_as_one_token(data):
    tok = SimpleTokenizer.from_dir(data.tokenizer)
    for word in list(TEXTURES) + list(COLOURS):
        assert len(tok.encode(word)) == 1, word
        assert tok.decode(tok.encode(word)) == word
    q = question_text("fine", "bottom-left")
    assert tok.decode(tok.encode(q)) == q


def test_every_prompt_has_the_same_token_length(data):
    # Rotary positions are relative: with prompts of one length, each window's visual tokens sit
    # at the same distance from the answer and from the region words in every record.
    tok = SimpleTokenizer.from_dir(data.tokenizer)
    lengths = {
        (kind, variant, region): len(tok.encode(question_text(kind, region, variant)))
        for kind in QUESTIONS for variant in range(len(QUESTIONS[kind])) for region in REGIONS
    }
    assert len(set(lengths.values())) == 1, lengths
    assert DemoData.at(data.root).counts == {"train": 6, "val": 3, "test": 3}
