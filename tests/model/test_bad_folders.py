"""Broken model folders are refused in one line naming the file: corrupt weights, absurd sizes, pickles."""

from __future__ import annotations

import fractions
import json

import pytest
import torch

from monkeytune.cli import main
from monkeytune.config import get_config
from monkeytune.memory import estimate_parameters
from monkeytune.model import build_model
from monkeytune.model.io import ModelFolderError, load_model, save_model
from monkeytune.model.weights import read_tensors
from monkeytune.tokenizer.simple import SimpleTokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny model folder (with a tokenizer) to be damaged by each test on a copy."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_model(build_model(get_config("tiny")), out, tokenizer=SimpleTokenizer.train(["a cat sat on the mat"], vocab_size=300))
    return out


@pytest.fixture
def damaged(folder, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    return copy


def chat_says(folder, capsys) -> str:
    assert main(["chat", "--model", str(folder), "hello"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_truncated_or_corrupt_safetensors_file_is_named(damaged, capsys, damage):
    path = damaged / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10" + b"\0" * 7 + b"{not json")
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: not a readable safetensors file, truncated or corrupt"):
        load_model(damaged)
    assert "not a readable safetensors file" in chat_says(damaged, capsys)


@pytest.mark.parametrize("section, key, value, message", [
    ("llm", "num_layers", -1, r"llm\.num_layers must be an integer >= 0, got -1"),
    ("vision", "width", 0, r"vision\.width must be an integer >= 1, got 0"),
    ("llm", "hidden_size", "big", r"llm\.hidden_size must be an integer >= 1, got 'big'"),
    ("llm", "num_layers", 10_000_000, r"the model config describes about \d\.\d+e\+12 parameters \([\d,.]+ GiB at 2 "
                                      r"bytes each\), more than this machine's memory"),
])
def test_negative_or_absurd_sizes_in_config_json_are_refused_before_building(damaged, capsys, section, key, value,
                                                                              message):
    path = damaged / "config.json"
    info = json.loads(path.read_text())
    info["model"][section][key] = value
    path.write_text(json.dumps(info))
    with pytest.raises(ModelFolderError, match=rf"config\.json: .*{message}"):
        load_model(damaged)
    chat_says(damaged, capsys)


def test_the_parameter_estimate_matches_the_built_model():
    for name in ("tiny", "mid", "monkey-7b", "qwen-vl-7b"):
        cfg = get_config(name)
        with torch.device("meta"):
            built = sum(p.numel() for p in build_model(cfg).parameters())
        assert estimate_parameters(cfg) == built, name


def test_the_pickle_refusal_is_plain_text(tmp_path):
    torch.save({"w": torch.zeros(1), "x": fractions.Fraction(1, 3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFolderError) as info:
        read_tensors(tmp_path)
    message = str(info.value)
    assert "\x1b" not in message and "\n" not in message
    assert "refusing to load" in message and "fractions.Fraction" in message
