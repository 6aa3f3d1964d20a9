"""A shortened demo run exercises every step end to end: data, two warm-ups, three trainings, eval, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

from monkeytune.cli import main
from monkeytune.demo.run import STAGES, DemoSettings, demo_model_config, run_demo
from monkeytune.generate import default_template
from monkeytune.model.io import load_model
from monkeytune.serve.launch import find_demo_model

pytestmark = pytest.mark.processes(seconds=50)  # starts several processes (see tests/conftest.py)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``monkeytune demo --quick --task digits --seed 1 --threads 2``, run in this process (the digits
    in ``out/digits``, as the command writes them). The textures task trains through the same code;
    its data is checked in test_generator.py."""
    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    try:
        return run_demo(replace(DemoSettings.quick(out / "digits", seed=1, task="digits"), threads=2))
    finally:
        torch.set_num_threads(threads)


def test_every_stage_is_trained_evaluated_and_saved(demo):
    out = demo.settings.out_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == set(STAGES)
    for name in STAGES:
        m = metrics["models"][name]
        assert set(m["exact_match"]) == {"fine", "coarse", "all"}
        assert all(0.0 <= v <= 1.0 for v in m["exact_match"].values())
        assert m["steps"] == {"stage1": 2, "stage2": 2, "baseline": 4}[name]
        preds = [json.loads(line) for line in (out / f"predictions_{name}.jsonl").read_text().splitlines()]
        assert len(preds) == 2 * 8  # two test images, eight questions each
        assert {p["kind"] for p in preds} == {"fine", "coarse"}
    # Stage 2 is the Monkey recipe: the LLM is frozen, only adapters and resampler train.
    s1, s2 = metrics["models"]["stage1"], metrics["models"]["stage2"]
    assert s2["trainable_params"] < s1["trainable_params"] == s1["total_params"]
    assert set(metrics["targets"]) == {"stage2_fine_min", "baseline_fine_max", "coarse_drop_max", "wall_seconds_max"}
    for png in ("loss_curves.png", "examples.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_stage2_changes_only_adapters_and_resampler(demo):
    models = demo.settings.out_dir / "models"
    s1, _ = load_model(models / "stage1")
    s2, _ = load_model(models / "stage2")
    p1, p2 = dict(s1.named_parameters()), dict(s2.named_parameters())
    changed = {n for n in p1 if not torch.equal(p1[n], p2[n])}
    assert changed, "stage 2 trained nothing"
    assert all(n.startswith("resampler.") or "lora" in n for n in changed), sorted(changed)[:5]


def test_models_have_the_demo_layouts(demo):
    models = demo.settings.out_dir / "models"
    monkey, _ = load_model(models / "stage2")
    single, _ = load_model(models / "baseline")
    assert monkey.config.image.grid == [2, 2] and monkey.config.tokens_per_image == 5 * 4
    assert single.config.image.grid == [0, 0] and single.config.tokens_per_image == 4
    assert demo_model_config((2, 2)).vision.lora_slots == 4
    assert demo_model_config((0, 0)).vision.lora_slots == 0
    # Every folder records the data's prompt layout, so chat, serve and eval use it unasked.
    for name in STAGES:
        model, _ = load_model(models / name)
        assert default_template(model) == "vqa-question-first", name


def test_saved_models_work_with_the_eval_command(demo, tmp_path, capsys):
    out = demo.settings.out_dir
    rc = main(["eval", "--model", str(out / "models" / "stage2"), "--data", str(out / "data" / "test.jsonl"),
               "--metric", "exact_match", "--max-new-tokens", "3", "--out", str(tmp_path)])
    assert rc == 0
    scores = json.loads((tmp_path / "metrics.json").read_text())
    # The command and the demo's own evaluation agree.
    assert scores["exact_match"] == pytest.approx(demo.stages["stage2"].accuracy["all"])


def test_the_demo_is_deterministic_across_processes(demo, tmp_path):
    # The same demo in another process, with another hash seed, two threads each (so that
    # thread-parallel reductions are in play): every model must come out bit for bit the same.
    # Gradients accumulated in an order that depends on the process (as a gather's backward on a
    # multi-threaded CPU does) would break this.
    code = "import sys; from monkeytune.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", code, "demo", "--quick", "--task", "digits", "--seed", "1", "--out", str(out),
         "--no-progress", "--threads", "2"],
        env={**os.environ, "PYTHONHASHSEED": "7" if os.environ.get("PYTHONHASHSEED") != "7" else "1"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = [demo.settings.out_dir, out / "digits"]
    for name in STAGES:
        a, b = ([json.loads(line)["prediction"]
                 for line in open(out / f"predictions_{name}.jsonl", encoding="utf-8")] for out in outs)
        assert a == b, name
        wa, _ = load_model(outs[0] / "models" / name)
        wb, _ = load_model(outs[1] / "models" / name)
        for (n, x), (_, y) in zip(wa.state_dict().items(), wb.state_dict().items()):
            assert torch.equal(x, y), (name, n)
    metrics = json.loads((outs[0] / "metrics.json").read_text())
    assert set(metrics["pixel_visibility"]) == {"window", "global", "single_view", "chance"}
    assert metrics["targets"]["baseline_fine_max"]["target"] == 0.40
    for name in STAGES:  # the probe ran, or says why it could not on so few questions
        assert metrics["models"][name]["fine_probe"], name


def test_serve_finds_the_demo_model_without_being_told(demo):
    # `monkeytune serve` with no --model looks where the demo writes its models.
    assert find_demo_model(demo.settings.out_dir) == demo.settings.out_dir / "models" / "stage2"


def test_the_two_stage_example_is_the_demos_recipe():
    from pathlib import Path

    from monkeytune.train.config_load import load_config

    folder = Path(__file__).resolve().parents[2] / "examples" / "from-scratch-two-stage"
    warm = load_config(folder / "warmup.yaml")
    stage1, stage2 = load_config(folder / "stage1.yaml"), load_config(folder / "stage2.yaml")
    s = DemoSettings()
    built = demo_model_config()
    assert (warm.model.config.vision, warm.model.config.image) == (built.vision, built.image)
    assert warm.train.objective == "window_answer" and warm.policy.preset == "vision"
    assert (warm.optim.lr, warm.policy.lr) == (s.warmup_lr, {"vision": s.warmup_vision_lr})
    assert (warm.train.max_steps, warm.train.micro_batch_size) == (s.vision_warmup_steps, s.batch_size)
    assert stage1.model.from_dir == str(Path(warm.checkpoint.output_dir) / "final")
    assert stage1.policy.preset == "full" and stage1.policy.lr == {"vision": s.vision_lr1, "resampler": s.resampler_lr1}
    assert (stage1.optim.lr, stage1.train.max_steps, stage1.train.micro_batch_size) == (s.lr1, s.steps1, s.batch_size)
    assert stage2.policy.preset == "monkey-fix-llm" and (stage2.optim.lr, stage2.train.max_steps) == (s.lr2, s.steps2)
    assert stage1.data.view_cache_gib == stage2.data.view_cache_gib > 0
