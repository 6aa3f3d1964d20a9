"""The grounded vision warm-up: it learns what the named window shows, touches nothing else, and
runs inside ``train`` before step 1 (and not again on resume)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from monkeytune.data.reading import load_samples
from monkeytune.model.monkey import MonkeyForCausalLM
from monkeytune.train.config import VisionWarmupSection
from monkeytune.train.loop import train
from monkeytune.train.setup import SetupError, run_vision_warmup
from monkeytune.train.vision_warmup import VisionWarmupError, warm_up_vision, window_examples, window_readout
from monkeytune.config import ModelConfig

from .conftest import MICRO_MODEL

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def write_window_data(folder, images=30, seed=0, window=True):
    """Four coloured quadrants per 56-pixel image; one record per quadrant asks its colour."""
    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        names = [rng.choice(list(COLOURS)) for _ in range(4)]
        img = Image.new("RGB", (56, 56))
        for k, name in enumerate(names):
            img.paste(COLOURS[name], (28 * (k % 2), 28 * (k // 2), 28 * (k % 2) + 28, 28 * (k // 2) + 28))
        img.save(folder / "img" / f"{i}.png")
        for k, name in enumerate(names):
            rec = {"id": f"{i}-{k}", "conversations": [
                {"from": "user", "value": f"Which colour is part {k}? <img>img/{i}.png</img> Answer: "},
                {"from": "assistant", "value": name}]}
            if window:
                rec["window"] = k
            lines.append(json.dumps(rec))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def micro_config(**changes):
    # Image token ids inside the micro vocabulary (a tokenizer would give them).
    return ModelConfig.from_dict({**MICRO_MODEL, "image_start_id": 509, "image_end_id": 510, "image_pad_id": 511,
                                  **changes})


def micro():
    torch.manual_seed(0)
    return MonkeyForCausalLM(micro_config())


def test_window_readout_is_the_mean_of_rms_normalised_tokens():
    tokens = torch.randn(3, 4, 8)
    plain = (tokens / tokens.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()).mean(1)
    torch.testing.assert_close(window_readout(tokens), plain)


def test_the_warmup_learns_what_the_named_window_shows_and_touches_nothing_else(tmp_path):
    examples, skipped = window_examples(load_samples(write_window_data(tmp_path)), windows=4)
    assert (len(examples), skipped) == (120, 0)
    model = micro()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = VisionWarmupSection(steps=30, batch_size=16)
    result = warm_up_vision(model, examples, settings, seed=0, log_every=1)
    # Three colours: a third by chance at step 1; the named window's colour is learnt.
    assert result.curve[0][2] < 0.6 and min(a for _, _, a in result.curve[-5:]) == 1.0, result.curve
    assert result.answers == 3 and result.examples == 120
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("vision.", "resampler.")) for n in changed), sorted(changed)
    assert any(n.startswith("resampler.") for n in changed) and any(n.startswith("vision.") for n in changed)
    # Deterministic given the seed.
    again = micro()
    warm_up_vision(again, examples, settings, seed=0)
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n


def test_a_single_view_model_warms_its_global_view(tmp_path):
    cfg = micro_config(image={"grid": [0, 0], "window_size": 28, "global_view": True},
                       vision={**MICRO_MODEL["vision"], "lora_slots": 0})
    examples, _ = window_examples(load_samples(write_window_data(tmp_path, images=4)), windows=0)
    assert {e.window for e in examples} == {-1}
    torch.manual_seed(0)
    result = warm_up_vision(MonkeyForCausalLM(cfg), examples, VisionWarmupSection(steps=2, batch_size=4), seed=0)
    assert len(result.curve) == 1


@pytest.mark.parametrize("value, says", [("1", "expected the row-major index"), (True, "expected the row-major"),
                                         (-1, "expected the row-major"), (4, r"has 4 windows \(0\.\.3\), got 4")])
def test_a_bad_window_names_file_line_and_field(tmp_path, value, says):
    path = write_window_data(tmp_path, images=1)
    lines = path.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["window"] = value
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(VisionWarmupError, match=rf"train.jsonl:3: field 'window': .*{says}"):
        window_examples(load_samples(path), windows=4)


def test_a_window_needs_one_image(tmp_path):
    path = tmp_path / "two.jsonl"
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    path.write_text(json.dumps({"window": 0, "conversations": [
        {"from": "user", "value": "Which? <img>a.png</img> <img>a.png</img>"},
        {"from": "assistant", "value": "red"}]}) + "\n")
    with pytest.raises(VisionWarmupError, match="two.jsonl:1: field 'window': .*exactly one image.*has 2"):
        window_examples(load_samples(path), windows=4)


def test_records_without_a_window_are_counted_not_used(tmp_path):
    with_window = load_samples(write_window_data(tmp_path / "a", images=2))
    without = load_samples(write_window_data(tmp_path / "b", images=1, window=False))
    examples, skipped = window_examples(with_window + without, windows=4)
    assert (len(examples), skipped) == (8, 4)


def warm_config(make_config, tmp_path, run, **sections):
    cfg = make_config(run, vision_warmup={"steps": 4, "batch_size": 8},
                      checkpoint={"output_dir": str(tmp_path / run), "final_save": "none", "every": 2}, **sections)
    cfg.data.train = [str(write_window_data(tmp_path / "data", images=12))]
    return cfg


def test_train_warms_up_before_step_1_and_not_again_on_resume(make_config, tmp_path):
    ref = train(warm_config(make_config, tmp_path, "ref"))
    record = json.loads((ref.run_dir / "vision_warmup.json").read_text())
    assert record["examples"] == 48 and record["curve"][-1]["step"] == 4

    class Interrupt(Exception):
        pass

    def stop_at_3(row):
        if row["step"] == 3:
            raise Interrupt

    cfg = warm_config(make_config, tmp_path, "cut")
    with pytest.raises(Interrupt):
        train(cfg, on_step=stop_at_3)
    (cfg_run := tmp_path / "cut" / "vision_warmup.json").unlink()
    resumed = train(cfg, resume="latest")
    assert not cfg_run.exists()  # the checkpoint held the warmed-up weights: no second warm-up
    for (n, p), q in zip(resumed.model.named_parameters(), ref.model.parameters()):
        assert torch.equal(p, q), n


def test_train_refuses_a_warmup_without_windows_and_in_several_processes(make_config, tmp_path):
    cfg = make_config("plain", vision_warmup={"steps": 2})
    with pytest.raises(SetupError, match="vision_warmup: no record of .* has a 'window' field"):
        train(cfg)
    cfg = warm_config(make_config, tmp_path, "two")
    with pytest.raises(SetupError, match=r"vision_warmup needs a single-process run \(2 processes here\)"):
        run_vision_warmup(cfg, micro(), tmp_path, num_processes=2, device="cpu", main=True)
