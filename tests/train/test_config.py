"""Training config: YAML and overrides, type conversion, errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from monkeytune.train.config import ConfigError
from monkeytune.train.config_load import coerce, load_config, parse_overrides

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BASE = """\
model:
  preset: tiny
  tokenizer: tok
data:
  train: data/train.jsonl
optim:
  lr: 1e-5
train:
  grad_accum: 4
"""


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_overrides_are_converted(tmp_path):
    cfg = load_config(write(tmp_path, BASE), parse_overrides([
        "--train.max_steps", "100", "--optim.betas=[0.9, 0.99]", "--train.gradient_checkpointing", "llm",
        "--data.packing", "yes", "--model.tokenizer", "null", "--model.tokenizer=other",
        "--policy.lr", "{vision_adapters: 1e-4}",
    ]))
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # "1e-5" is a string to PyYAML
    assert cfg.data.train == ["data/train.jsonl"]
    assert cfg.train.max_steps == 100 and cfg.train.grad_accum == 4
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.train.gradient_checkpointing == ["llm"]
    assert cfg.data.packing is True
    assert cfg.model.tokenizer == "other"
    assert float(cfg.policy.lr["vision_adapters"]) == 1e-4
    # The resolved config round-trips.
    again = load_config(data=yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert "from: null" in cfg.to_yaml()  # YAML key of ModelSection.from_dir


@pytest.mark.parametrize(
    "text, overrides, pattern",
    [
        (BASE + "  micro_batch: 2\n", [], r"run\.yaml:10: train\.micro_batch: unknown key \(did you mean train\.micro_batch_size\?\)"),
        (BASE + "optimizer:\n  lr: 1\n", [], r"run\.yaml:10: optimizer: unknown section \(did you mean optim\?\)"),
        (BASE, ["--train.epochs", "two"], r"--train\.epochs: train\.epochs: expected an integer, got 'two'"),
        (BASE, ["--train.precision", "fp8"], r"train\.precision must be one of \['bf16', 'fp16', 'fp32'\]"),
        (BASE, ["--model.from", "ckpt"], r"model needs exactly one of preset, config, from or compose"),
        (BASE, ["--train.grad_accum", "0"], r"train\.grad_accum must be >= 1"),
        (BASE, ["--optim.betas", "[0.9]"], r"optim\.betas must be two numbers"),
        (BASE, ["--train.max_steps"], r"override --train\.max_steps has no value"),
        (BASE, ["max_steps=3"], r"unexpected argument 'max_steps=3'"),
        (BASE.replace("  lr: 1e-5", "  lr: fast"), [], r"run\.yaml:7: optim\.lr: expected a number, got 'fast'"),
        ("- a\n- b\n", [], r"top level must be a mapping"),
        (BASE, ["--model.preset", "tinny"], r"model\.preset: unknown preset 'tinny' \(did you mean tiny\?\)"),
        (BASE, ["--optim.eps", "0"], r"optim\.eps must be > 0, got 0\.0"),
        (BASE, ["--optim.eps", "-1e-8"], r"optim\.eps must be > 0"),
        (BASE, ["--optim.lr", ".inf"], r"optim\.lr must be a finite number, got inf"),
        (BASE, ["--optim.lr", "nan"], r"optim\.lr must be a finite number, got nan"),
        (BASE.replace("  lr: 1e-5", "  lr: .inf"), [], r"run\.yaml: optim\.lr must be a finite number, got inf"),
        (BASE, ["--optim.weight_decay", "nan"], r"optim\.weight_decay must be a finite number"),
        (BASE, ["--optim.betas", "[0.9, .nan]"], r"optim\.betas must be a finite number"),
        (BASE, ["--policy.lr", "{llm: .inf}"], r"policy\.lr\.llm must be a non-negative number"),
        (BASE, ["--data.view_cache_gib", "-1"], r"data\.view_cache_gib must be >= 0, got -1"),
        (BASE, ["--data.view_cache_gib", ".inf"], r"data\.view_cache_gib must be a finite number, got inf"),
        (BASE, ["--train.objective", "window"], r"train\.objective"),
        (BASE, ["--train.objectiv", "lm"], r"train\.objectiv: unknown key \(did you mean train\.objective\?\)"),
    ],
)
def test_errors_name_the_place(tmp_path, text, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text), parse_overrides(overrides))


def test_inline_model_config_is_checked():
    data = yaml.safe_load(BASE)
    data["model"] = {"config": {"vision": {"widht": 3}}, "tokenizer": "t"}
    with pytest.raises(ConfigError, match="model.config: unknown keys in model config section 'vision'"):
        load_config(data=data)


def test_coerce_rejects_mismatched_shapes():
    with pytest.raises(ConfigError, match="expected a list"):
        coerce({"a": 1}, list[str], "x")
    with pytest.raises(ConfigError, match="expected true or false"):
        coerce("maybe", bool, "x")
    assert coerce("3", float, "x") == 3.0
    assert coerce(None, str | None, "x") is None


def test_examples_are_valid():
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} >= {"tiny-cpu.yaml", "monkey-7b-8gpu.yaml", "monkey-7b-fix-llm.yaml"}
    for f in files:
        load_config(f)
    official = load_config(EXAMPLES / "monkey-7b-8gpu.yaml")
    assert (official.optim.lr, official.optim.weight_decay, official.optim.betas) == (1e-5, 0.1, [0.9, 0.95])
    assert official.policy.preset == "monkey" and official.train.precision == "bf16"
    for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        acc = yaml.safe_load((EXAMPLES / "accelerate" / f"{name}.yaml").read_text())
        assert acc["num_processes"] >= 1 and acc["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
