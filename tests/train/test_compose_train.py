"""Training a composed model (CLIP + Qwen2 parts saved in the test): what each preset moves, and
2-process engines against one process, with an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monkeytune.model.compose import ComposeOptions, compose
from monkeytune.model.io import read_tensors
from monkeytune.train.loop import train
from tests.model.compose_parts import save_clip, save_qwen2
from tests.train.test_engines import finish, kill, losses, start

pytestmark = pytest.mark.processes(seconds=60)  # starts several processes (see tests/conftest.py)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return save_clip(root / "clip"), save_qwen2(root / "qwen2")


@pytest.fixture(scope="module")
def composed(parts, tmp_path_factory):
    folder = compose(*parts, tmp_path_factory.mktemp("composed") / "model", ComposeOptions(queries=4))
    info = json.loads((folder / "config.json").read_text())
    info["model"]["vision"]["lora_dropout"] = 0.0  # the same numbers whichever process draws them
    (folder / "config.json").write_text(json.dumps(info))
    return folder


def _sections(composed: Path, data: Path, preset: str) -> dict:
    return dict(model={"from": str(composed), "config": None, "tokenizer": None},
                data={"train": str(data), "template": "chatml", "shuffle": False, "max_length": 512},
                policy={"preset": preset}, optim={"lr": 1e-2, "warmup_ratio": 0.0},
                train={"epochs": 1, "micro_batch_size": 4, "grad_accum": 1},
                checkpoint={"final_save": "full"}, log={"every": 1, "progress": False, "plot": False})


def _changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("preset", ["monkey-fix-llm", "align"])
def test_a_preset_moves_its_parts_and_leaves_every_base_weight_bit_identical(preset, composed, synthetic, make_config):
    train_file, _ = synthetic
    sections = _sections(composed, train_file, preset)
    sections["train"] = {**sections["train"], "max_steps": 3, "epochs": 0}
    result = train(make_config(preset, **sections))
    before, after = read_tensors(composed), read_tensors(Path(result.run_dir) / "final")
    moved = _changed(before, after)
    base = {n for n in before if n.startswith(("llm.", "vision.")) and ".lora." not in n}
    assert base and not moved & base  # the encoder's and the LLM's weights, bit for bit
    assert "image_tokens.weight" in moved and any(n.startswith("resampler.") for n in moved)
    adapters_moved = {n for n in moved if ".lora.lora_b" in n}
    if preset == "align":
        assert moved <= {"image_tokens.weight"} | {n for n in before if n.startswith("resampler.")}
    else:
        assert len(adapters_moved) == len([n for n in before if ".lora.lora_b" in n])


def _one_process(composed: Path, uneven: Path, make_config) -> list[float]:
    """The 1-process reference: the two ranks' micro-batches as one accumulation window."""
    sections = _sections(composed, uneven, "monkey")
    sections["train"] = {**sections["train"], "grad_accum": 2}
    return train(make_config("single", **sections)).losses


def _assert_matches(run: Path, reference: list[float]) -> dict[int, float]:
    got = losses(run)
    assert len(got) == len(reference) == 6
    torch.testing.assert_close(torch.tensor([got[s] for s in sorted(got)]), torch.tensor(reference), rtol=1e-5, atol=0)
    return got


def test_fsdp2_and_zero3_shard_the_composed_model_and_match_one_process(
        composed, uneven, make_config, tmp_path):
    # The two engines that split the composed model: FSDP2 wraps the encoder's own layers
    # (EncoderTower.blocks) and the LLM's; ZeRO-3 partitions every part, so the parts must be
    # built by their classes, not on its meta device. Both launches run side by side, and the
    # ranks draw text-only and image micro-batches at the same step (the `uneven` data). DDP and
    # ZeRO-2 hold the model whole, as for a Monkey model (tests/train/test_engines.py, which also
    # resumes each sharding engine's checkpoint: the same code, whatever the model).
    engines = {"fsdp2": "fsdp.yaml", "deepspeed-zero3": "deepspeed_zero3.yaml"}
    procs = {}
    for engine, config_file in engines.items():
        cfg = make_config(engine, **_sections(composed, uneven, "monkey"))
        cfg.checkpoint.every = 3  # the engine's sharded checkpoint of the composed parts is written
        cfg.save(tmp_path / f"{engine}.yaml")
        procs[engine] = start(config_file, tmp_path / f"{engine}.yaml")
    try:  # the reference trains while the ranks start
        reference = _one_process(composed, uneven, make_config)
        for engine, proc in procs.items():
            finish(proc)
            _assert_matches(tmp_path / engine, reference)
    finally:
        kill(list(procs.values()))


def test_a_training_config_composes_in_the_run_folder_and_resumes_from_it(parts, synthetic, make_config, composed):
    # model.compose in the YAML: the run composes RUN/composed once and trains it like `from:`;
    # the same parts composed by the command give the same losses.
    train_file, _ = synthetic
    vision, llm = parts
    sections = _sections(composed, train_file, "align")
    sections["train"] = {**sections["train"], "max_steps": 2, "epochs": 0}
    sections["checkpoint"] = {"every": 1, "final_save": "none"}
    by_command = train(make_config("by-command", **sections))
    sections["model"] = {"from": None, "config": None, "tokenizer": None,
                         "compose": {"vision": str(vision), "llm": str(llm), "queries": 4}}
    cfg = make_config("by-yaml", **sections)
    first = train(cfg)
    run = Path(first.run_dir)
    assert (run / "composed" / "model.safetensors").is_file()
    assert "from: " + str(run / "composed") in (run / "config.yaml").read_text()
    # lora_dropout differs from the command's folder (0 there), but align trains no adapter.
    assert first.losses == by_command.losses
    cfg.train.max_steps = 3
    again = train(cfg, resume="latest")
    assert again.steps == 3 and len(again.losses) == 1


def test_a_bad_composition_is_one_error_naming_the_key(parts, synthetic, make_config):
    from monkeytune.train.config import ConfigError

    vision, llm = parts
    with pytest.raises(ConfigError, match=r"model.compose: unknown keys \['grids'\]"):
        make_config("bad", model={"config": None, "tokenizer": None,
                                  "compose": {"vision": str(vision), "llm": str(llm), "grids": [1, 1]}})


def test_inspect_plans_a_composition_from_its_configs(parts):
    from monkeytune.inspection import inspect_plan
    from monkeytune.model.spec import ModelSpec
    from monkeytune.policy.plan import TrainPlan

    vision, llm = parts
    spec = ModelSpec(compose={"vision": str(vision), "llm": str(llm), "connector": "mlp"})
    plan = inspect_plan(spec, TrainPlan(preset="monkey-fix-llm"))
    trainable = {d.component for d in plan.report.decisions if d.trainable}
    assert trainable == {"vision_adapters", "projector", "image_tokens"}
    # QLoRA holds the encoder's adapted projections in 4 bits too, as it does the Monkey ViT's.
    from monkeytune.policy.quantize import is_vision_4bit_weight

    qlora = inspect_plan(spec, TrainPlan(preset="llm-qlora"))
    encoder_4bit = sum(d.numel for d in qlora.report.decisions if is_vision_4bit_weight(d.name))
    assert encoder_4bit == 2 * (4 * 32 * 32 + 2 * 32 * 64)  # 2 layers of q/k/v/out and fc1/fc2
    assert qlora.quantized > encoder_4bit


def test_an_llm_without_chatml_trains_and_answers_in_its_own_chat_template(synthetic, make_config, tmp_path):
    # Llama's tokenizer has no <|im_start|>: data.template tokenizer renders its own template;
    # the final folder records it, and chat prompts the same way.
    from monkeytune.generate import GenerationSettings, answer, default_template
    from monkeytune.model.io import load_model
    from tests.model.compose_parts import save_llama, save_siglip_pair

    folder = compose(save_siglip_pair(tmp_path / "siglip"), save_llama(tmp_path / "llama"), tmp_path / "model",
                     ComposeOptions(connector="mlp"))
    train_file, _ = synthetic
    sections = _sections(folder, train_file, "monkey")
    sections["data"] = {**sections["data"], "template": "tokenizer"}
    sections["train"] = {**sections["train"], "max_steps": 2, "epochs": 0}
    result = train(make_config("llama", **sections))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    model, tokenizer = load_model(Path(result.run_dir) / "final")
    assert default_template(model) == "tokenizer"
    image = next(train_file.parent.glob("images/*.png"))
    text = answer(model, tokenizer, "what is it?", str(image), settings=GenerationSettings(max_new_tokens=3))
    assert isinstance(text, str)
