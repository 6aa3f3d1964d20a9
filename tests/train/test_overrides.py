"""Dotted overrides at any depth: nested model-config fields, mapping entries, errors per level."""

from __future__ import annotations

import copy

import pytest
import yaml

from monkeytune.cli import main
from monkeytune.config import get_config
from monkeytune.train.config import ConfigError
from monkeytune.train.config_load import load_config, parse_overrides
from monkeytune.train.loop import train

BASE = """\
model:
  preset: tiny
  tokenizer: tok
data:
  train: data/train.jsonl
policy:
  lr: {vision_adapters: 1.0e-3}
"""


def load(tmp_path, overrides: list[str], text: str = BASE):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_config(path, parse_overrides(overrides))


def test_a_nested_model_field_on_a_preset_edits_the_presets_config(tmp_path):
    cfg = load(tmp_path, ["--model.config.image.grid", "[1, 1]", "--model.config.vision.lora_rank_attn", "8"])
    expected = get_config("tiny")
    expected.image.grid, expected.vision.lora_rank_attn = [1, 1], 8
    # The preset became the inline config: everything else is the preset's.
    assert cfg.model.preset is None and cfg.model.config == expected
    assert cfg.model.tokenizer == "tok"
    assert load(tmp_path, ["--model.config.image.grid", "[0, 0]"]).model.config.image.num_views == 1


def test_a_nested_model_field_edits_an_inline_config_in_place(tmp_path):
    inline = BASE.replace("  preset: tiny\n", "  config: {name: mine, image: {grid: [2, 2], window_size: 448}}\n")
    cfg = load(tmp_path, ["--model.config.image.global_view", "false"], inline)
    assert cfg.model.config.name == "mine" and cfg.model.config.image.grid == [2, 2]
    assert cfg.model.config.image.global_view is False


def test_a_mapping_entry_is_set_and_its_siblings_kept(tmp_path):
    cfg = load(tmp_path, ["--policy.lr.llm", "0.5", "--policy.lora.r=8", "--data.columns.messages", "dialog"])
    assert cfg.policy.lr == {"vision_adapters": 1e-3, "llm": 0.5}  # read as YAML: a number, not "0.5"
    assert cfg.policy.lora == {"r": 8} and cfg.data.columns == {"messages": "dialog"}


def test_the_callers_mapping_is_not_changed():
    data = yaml.safe_load(BASE)
    before = copy.deepcopy(data)
    cfg = load_config(data=data, overrides=[("policy.lr.llm", "0.5")])
    assert cfg.policy.lr["llm"] == 0.5 and data == before


@pytest.mark.parametrize("overrides, pattern", [
    (["--model.config.vision.lora_rank", "8"],
     r"model\.config\.vision\.lora_rank: unknown key \(did you mean model\.config\.vision\.lora_rank_\w+\?\); "
     r"known: patch_size, .*lora_rank_attn, lora_rank_mlp"),
    (["--model.config.imag.grid", "[0, 0]"],
     r"model\.config\.imag: unknown key \(did you mean model\.config\.image\?\); known: name, vision, image, llm"),
    (["--model.confg.image.grid", "[0, 0]"], r"model\.confg: unknown key \(did you mean model\.config\?\)"),
    (["--policy.lr.vison", "1e-4"], r"policy\.lr\.vison: unknown key \(did you mean policy\.lr\.vision\?\); known: "),
    (["--policy.lora.rank", "8"], r"policy\.lora\.rank: unknown key; known: r, alpha, dropout, target_modules"),
    (["--model.config.image.grid", "[1, x]"], r"model\.config\.image\.grid\[1\]: expected an integer, got 'x'"),
    (["--model.config.image.grid", "[3, 3]"], r"model\.config: image\.grid \[3, 3\] has 9 windows"),
    (["--train.max_steps.x", "1"], r"train\.max_steps is a single value, it has no key 'x'"),
    (["--policy.lr.llm.x", "1"], r"policy\.lr\.llm is a single value \(0\.5\), it has no key 'x'"),
    (["--train..max_steps", "1"], r"must read SECTION\.KEY or SECTION\.KEY\.SUBKEY"),
])
def test_each_level_names_its_keys(tmp_path, overrides, pattern):
    if overrides[0] == "--policy.lr.llm.x":
        overrides = ["--policy.lr.llm", "0.5", *overrides]
    with pytest.raises(ConfigError, match=pattern):
        load(tmp_path, overrides)


def test_a_model_folder_keeps_its_own_config(tmp_path):
    folder = BASE.replace("  preset: tiny\n", "  from: runs/a/final\n")
    with pytest.raises(ConfigError, match=r"model\.config: the model is loaded from runs/a/final, whose config"):
        load(tmp_path, ["--model.config.image.grid", "[0, 0]"], folder)


def test_a_dotted_yaml_key_is_not_a_path(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml:8: policy\.lr\.llm: unknown key; known: preset, rules, lr,"):
        load(tmp_path, [], BASE + "  lr.llm: 0.5\n")


def test_cli_prints_a_nested_override_and_refuses_a_bad_key_in_one_line(make_config, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    make_config("cli-nested").save(path)
    assert main(["train", str(path), "--model.config.image.grid", "[1, 1]", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["image"]["grid"] == [1, 1]
    assert main(["train", str(path), "--model.config.vision.lora_rank", "8", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monkeytune train: ") and "did you mean model.config.vision.lora_rank_" in err
    assert err.count("\n") == 1


def test_a_global_only_baseline_trains_from_an_override(make_config):
    # The demo's baseline: the same model and data with the global view alone (no windows).
    base = make_config("global-only", train={"max_steps": 1})
    cfg = load_config(data=base.to_dict(), overrides=[("model.config.image.grid", "[0, 0]")])
    result = train(cfg)
    assert result.steps == 1 and cfg.model.config.image.num_views == 1
