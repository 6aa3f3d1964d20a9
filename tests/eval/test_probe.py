"""Linear probes of the visual tokens: they read what the image shows and nothing it does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from monkeytune.cli import main
from monkeytune.config import get_config
from monkeytune.eval.probe import ProbeError, fit_linear_probe, predict_linear_probe, probe, visual_features
from monkeytune.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    cfg.image.window_size = 56
    cfg.vision.patch_size = 14
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Images whose top-left quarter is red or blue; one question asks that, one has random answers."""
    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    out = []
    for i in range(60):
        colour = ["red", "blue"][i % 2]
        pixels = np.full((112, 112, 3), 128, dtype=np.uint8)
        pixels[:56, :56] = (200, 30, 30) if colour == "red" else (30, 30, 200)
        pixels[56:, 56:] = rng.integers(0, 256, size=3)  # unrelated clutter
        path = root / f"{i}.png"
        Image.fromarray(pixels).save(path)
        out.append({"question_id": f"c{i}", "image": str(path), "question": "colour top-left?", "answer": colour})
        out.append({"question_id": f"r{i}", "image": str(path), "question": "coin?",
                    "answer": ["heads", "tails"][int(rng.integers(2))]})
    return out


def test_fit_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=g)
    y = (x @ torch.randn(5, 3, generator=g)).argmax(dim=1)  # 3 classes with linear boundaries
    mean, std, weight = fit_linear_probe(x, y, 3)
    assert (predict_linear_probe(x, mean, std, weight) == y).float().mean() > 0.95


def test_visual_features_are_the_models_tokens(model, records):
    images = [records[0]["image"], records[2]["image"]]
    feats = visual_features(model, images)
    from monkeytune.vision.processor import ImageProcessor

    pixels, slots = ImageProcessor(model.config.image).batch(images)
    with torch.no_grad():
        tokens = model.encode_images(pixels, slots).view(2, 5, -1)
    assert torch.equal(feats["windows"], tokens[:, :4].flatten(1))
    assert torch.equal(feats["global"], tokens[:, 4])


def test_probe_reads_the_image_and_not_the_coin(model, records):
    result = probe(model, records, folds=5, steps=30)  # two linearly separable colours need few L-BFGS steps
    assert result.groups == 2 and result.records == len(records)
    assert result.per_group["colour top-left?"]["windows"] >= 0.95
    assert result.per_group["colour top-left?"]["global"] >= 0.95
    assert result.per_group["coin?"]["windows"] <= 0.8
    assert 0.4 <= result.chance <= 0.8


def test_probe_cli(tmp_path, model, records, capsys):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records if r["question"] == "colour top-left?"))
    assert main(["probe", "--model", str(folder), "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"]["windows"] >= 0.95 and out["groups"] == 1 and out["unscored"] == 0
    # Held-out questions the training file never asks are counted, not dropped silently.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "question": "new?"}) + "\n" for r in records[:8:2]))
    assert main(["probe", "--model", str(folder), "--data", str(data), "--test", str(other)]) == 2
    assert main(["probe", "--model", str(folder), "--data", str(data), "--test", str(data)]) == 0
    capsys.readouterr()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(data.read_text() + other.read_text())
    assert main(["probe", "--model", str(folder), "--data", str(data), "--test", str(mixed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unscored"] == 4
    single = tmp_path / "one.jsonl"
    same = [{**records[0], "answer": "red"}, {**records[2], "answer": "red"}]
    single.write_text("".join(json.dumps(r) + "\n" for r in same))
    assert main(["probe", "--model", str(folder), "--data", str(single)]) == 2
    assert "two different answers" in capsys.readouterr().err


def test_probe_needs_answers(model, records):
    with pytest.raises(ProbeError, match="no reference answer"):
        probe(model, [{**r, "answer": None} for r in records[:10]])
