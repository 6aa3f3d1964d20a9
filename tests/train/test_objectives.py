"""The window_answer objective: a grounded vision stage run by the ordinary loop.

It learns what the named window shows, trains nothing but the vision path, weighs records
without a window at zero, and runs under two real processes (DDP) with the same losses as one
process that sees the same global batches.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from monkeytune.train.config import ConfigError
from monkeytune.train.loop import train
from monkeytune.train.objectives import window_readout
from monkeytune.train.setup import SetupError

from .conftest import fork_ranks, wait_ranks
from .test_engines import losses

pytestmark = pytest.mark.processes(seconds=10)  # starts several processes (see tests/conftest.py)

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def write_window_data(folder, images=30, seed=0, window=True, text_only=0):
    """Four coloured quadrants per 56-pixel image; one record per quadrant asks its colour.

    ``text_only`` text records without an image (nor a window) come between the image records,
    as mixed data comes.
    """
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
    for j in range(text_only):
        lines.insert(3 * j + 1, json.dumps({"id": f"t{j}", "conversations": [
            {"from": "user", "value": "Say a colour."}, {"from": "assistant", "value": "red"}]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def window_sections(tmp_path, images=12, **data):
    return dict(
        data={"train": str(write_window_data(tmp_path / "data", images=images, **data)), "shuffle": False},
        policy={"preset": "vision"},
        optim={"lr": 3e-3, "warmup_ratio": 0.0, "weight_decay": 0.0, "grad_clip": 0.0},
        train={"objective": "window_answer", "epochs": 1, "micro_batch_size": 8},
        log={"every": 1, "progress": False, "plot": False},
    )


def test_window_readout_is_the_mean_of_rms_normalised_tokens():
    tokens = torch.randn(3, 4, 8)
    plain = (tokens / tokens.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()).mean(1)
    torch.testing.assert_close(window_readout(tokens), plain)


def test_the_stage_learns_what_the_named_window_shows_and_trains_only_the_vision_path(make_config, tmp_path):
    sections = window_sections(tmp_path, images=30)
    sections["train"] |= {"epochs": 4}
    sections["data"]["shuffle"] = True
    cfg = make_config("warm", **sections, checkpoint={"output_dir": str(tmp_path / "warm"), "final_save": "full"})
    from monkeytune.model.io import load_model

    before = load_model_from_config(cfg)
    result = train(cfg)
    curve = losses(result.run_dir)
    # Three colours: ln 3 at step 1; the named window's colour is learnt.
    assert curve[1] > 0.8 and max(curve[s] for s in list(curve)[-3:]) < 0.2, curve
    after, _ = load_model(result.final_dir)
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("vision.", "resampler.")) for n in changed), sorted(changed)
    assert any(n.startswith("resampler.") for n in changed) and any(n.startswith("vision.") for n in changed)
    assert set(dict(after.named_parameters())) == set(before)  # the head is not in the final folder
    rows = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert rows["lr/objective"] == pytest.approx(3e-3)


def load_model_from_config(cfg):
    """The weights ``cfg``'s run starts from, by name."""
    from monkeytune.train.setup import load_model_and_tokenizer, resolve_run_model

    model, _ = load_model_and_tokenizer(cfg, device=torch.device("cpu"), resolved=resolve_run_model(cfg))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_records_without_a_window_weigh_nothing_and_are_counted(make_config, tmp_path, caplog):
    sections = window_sections(tmp_path, images=4, text_only=4)
    cfg = make_config("mixed", **sections)
    with caplog.at_level("INFO", logger="monkeytune"):
        result = train(cfg)
    assert "16 records name a window (4 do not and weigh nothing), 3 answers" in caplog.text
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # 20 records in micro-batches of 8 in file order; text records (lines 2, 5, 8, 11) are not counted.
    assert [r["samples"] for r in rows] == [5, 7, 4]


def test_a_single_view_model_reads_its_global_view(make_config, micro_model, tmp_path):
    micro_model["image"] = {"grid": [0, 0], "window_size": 28, "global_view": True}
    micro_model["vision"]["lora_slots"] = 0
    result = train(make_config("single-view", model={"config": micro_model}, **window_sections(tmp_path, images=4)))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("value, says", [("1", "expected the row-major index"), (True, "expected the row-major"),
                                         (-1, "expected the row-major"), (4, r"has 4 windows \(0\.\.3\), got 4")])
def test_a_bad_window_names_file_line_and_field(make_config, tmp_path, value, says):
    sections = window_sections(tmp_path, images=1)
    path = tmp_path / "data" / "train.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["window"] = value
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SetupError, match=rf"train.jsonl:3: field 'window': .*{says}"):
        train(make_config("bad", **sections))


def test_what_the_stage_cannot_use_is_refused_in_one_line(make_config, tmp_path):
    sections = window_sections(tmp_path, images=1, window=False)
    with pytest.raises(SetupError, match="no record of .* has a 'window' field"):
        train(make_config("none", **sections))
    sections = window_sections(tmp_path / "b", images=1)
    with pytest.raises(SetupError, match="trains the vision path only, .* use policy.preset vision"):
        train(make_config("llm", **{**sections, "policy": {"preset": "full"}}))
    with pytest.raises(ConfigError, match="checkpoint.every 0"):
        make_config("ckpt", **sections, checkpoint={"every": 2})
    with pytest.raises(ConfigError, match="data.packing false"):
        make_config("packed", **{**sections, "data": {**sections["data"], "packing": True}})
    with pytest.raises(ConfigError, match="vision_warmup section is now a stage of its own"):
        make_config("old", vision_warmup={"steps": 2})


def test_two_processes_match_one_process(make_config, tmp_path):
    """DDP with 2 forked ranks, on mixed records, against one process accumulating both ranks' micro-batches.

    (FSDP2 gave the same losses as DDP to 1e-7 when this was written; the sharding engines run
    the same module, so the suite launches DDP only.)"""
    sections = window_sections(tmp_path, images=8, text_only=3)
    sections["train"] |= {"micro_batch_size": 4}
    sections["optim"] |= {"lr": 1e-4}  # gentle steps: the summation order's gap is not amplified by a steep descent
    make_config("ddp", **sections).save(tmp_path / "ddp.yaml")
    ranks = fork_ranks(tmp_path / "ddp.yaml", tmp_path)
    try:  # the reference trains beside the ranks
        one = train(make_config("one", **{**sections, "train": {**sections["train"], "grad_accum": 2}}))
    finally:
        ranks = wait_ranks(ranks, tmp_path)
    for code, stderr in ranks:
        assert code == 0, stderr[-3000:]
    got, want = losses(tmp_path / "ddp"), losses(one.run_dir)
    assert got.keys() == want.keys() and len(got) == 4
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["engine"] == "ddp"
    for step in want:
        # 1e-4, not the language loss's 1e-5: AdamW's first step moves every element by the
        # rate times the sign of its gradient, and the tower's many near-zero gradient
        # elements take their sign from the fp32 summation order (two ranks against one).
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got, want)
