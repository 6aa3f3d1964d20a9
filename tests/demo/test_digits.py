"""The digits task: real handwritten digits, readable in the windows and gone from the global view."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn", reason="the digits task needs the demo extra (scikit-learn)")

from monkeytune.config import get_config  # noqa: E402
from monkeytune.demo.digits import (  # noqa: E402
    DIGIT_PAIRS, DigitScene, digit_split, load_digits, profile_matrix, random_digit_scene, render_digit_scene,
)
from monkeytune.demo.generator import COARSE_QUESTIONS, TASKS, generate_dataset, question_text  # noqa: E402
from monkeytune.demo.scene import COLOURS, REGIONS  # noqa: E402
from monkeytune.demo.visibility import fine_detail_visibility  # noqa: E402
from monkeytune.tokenizer.simple import SimpleTokenizer  # noqa: E402
from monkeytune.vision.processor import ImageProcessor  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("digits"), task="digits", seed=2, n_train=120, n_val=2,
                            n_test=30, progress=False)


def _bicubic_half(x: torch.Tensor) -> torch.Tensor:
    """A plain 2x bicubic downsample (Keys, A = -0.75) along the last axis, written out."""
    a, b = 3 / 32, 19 / 32
    pad = F.pad(x, (1, 1), mode="replicate")
    return -a * pad[..., 0:-2:2] + b * pad[..., 1:-1:2] + b * pad[..., 2::2] - a * pad[..., 3::2]


def test_any_envelope_vanishes_under_the_2x_bicubic_resize():
    rng = np.random.default_rng(0)
    pairs = 12
    tex = profile_matrix(pairs) @ rng.uniform(0, 1, (pairs, pairs)) @ profile_matrix(pairs).T
    canvas = torch.zeros(64, 64, dtype=torch.float64)
    canvas[9 : 9 + tex.shape[0], 9 : 9 + tex.shape[1]] = torch.from_numpy(tex)  # row 1 at an even coordinate
    ours = F.interpolate(canvas[None, None], size=(32, 32), mode="bicubic", align_corners=False)[0, 0]
    reference = _bicubic_half(_bicubic_half(canvas).T).T
    assert canvas.abs().max() > 0.5
    assert torch.allclose(ours, reference, atol=1e-9)
    assert ours.abs().max() < 1e-9


def test_train_and_test_digits_are_disjoint_and_fixed():
    split = digit_split()
    assert (len(split["train"]), len(split["test"])) == (1597, 200)
    assert not set(split["train"].tolist()) & set(split["test"].tolist())
    assert np.array_equal(digit_split()["test"], split["test"])


def test_scenes_use_their_split_digits_and_answers_match(data):
    images, labels = load_digits()
    split = {k: set(v.tolist()) for k, v in digit_split().items()}
    rows = [json.loads(line) for line in (data.root / "scenes.jsonl").read_text().splitlines()]
    for row in rows:
        pool = split["test"] if row["split"] == "test" else split["train"]
        for part in row["parts"].values():
            assert part["uci_index"] in pool
            assert part["digit"] == str(labels[part["uci_index"]])
    test_digits = [p["uci_index"] for r in rows if r["split"] == "test" for p in r["parts"].values()]
    assert len(test_digits) == len(set(test_digits))  # 120 of the 200 test digits, none twice
    records = [json.loads(line) for line in data.test.read_text().splitlines()]
    by_image = {r["image"]: r["parts"] for r in rows}
    for rec in records:
        part = by_image[rec["image"]][rec["region"]]
        assert rec["answer"] == (part["digit"] if rec["kind"] == "fine" else part["colour"])


def test_the_digit_is_in_its_window_only():
    rng = np.random.default_rng(1)
    scene = random_digit_scene(rng, [int(i) for i in digit_split()["train"][:4]])
    other = DigitScene((dataclasses.replace(scene.parts[0], digit=int(digit_split()["train"][10])),) + scene.parts[1:])
    cfg = dataclasses.replace(get_config("tiny").image, window_size=112)
    va, vb = ImageProcessor(cfg)(render_digit_scene(scene)).views, ImageProcessor(cfg)(render_digit_scene(other)).views
    diff = (va - vb).abs().flatten(1).max(dim=1).values / (1 / 255 / max(cfg.std))  # in grey levels
    assert diff[0] > 20 and torch.all(diff[1:4] == 0)
    assert diff[4] < 2  # the global view: the rounding of the two renderings only
    assert (va[4] - vb[4]).abs().mean() / (1 / 255 / max(cfg.std)) < 0.1


def test_a_simple_classifier_reads_windows_not_the_global_view(data):
    vis = fine_detail_visibility(data.root, max_train=120)
    assert vis["window"] >= 0.8, vis
    assert vis["global"] <= vis["chance"] + 0.15, vis


def test_questions_and_answers_tokenize_evenly(data):
    tok = SimpleTokenizer.from_dir(data.tokenizer)
    for word in list(TASKS["digits"].fine_answers) + list(COLOURS):
        assert len(tok.encode(word)) == 1, word
    lengths = {len(tok.encode(question_text(kind, region, v, "digits")))
               for kind in ("fine", "coarse") for v in range(2) for region in REGIONS}
    assert len(lengths) == 1, lengths
    assert TASKS["digits"].questions["coarse"] == COARSE_QUESTIONS
    assert 2 * DIGIT_PAIRS + 2 <= 112 - 2 * 6 - 4  # a digit fits the smallest square
