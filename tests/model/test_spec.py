"""The model spec and its resolver; the one-way layering of model I/O."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from monkeytune.config import ModelConfig, get_config
from monkeytune.model import build_model
from monkeytune.model.io import load_model, save_model
from monkeytune.model.spec import ModelSpec, ModelSpecError, resolve_model
from monkeytune.tokenizer.simple import SimpleTokenizer

SRC = Path(__file__).resolve().parents[2] / "src" / "monkeytune"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tok = SimpleTokenizer.train(["a red square", "two boxes"] * 4, vocab_size=280)
    tok.save(folder)
    return folder, tok


def test_parse_accepts_every_written_form(tmp_path):
    assert ModelSpec.parse("tiny") == ModelSpec(preset="tiny")
    assert ModelSpec.parse({"preset": "tiny", "tokenizer": "t", "init_seed": 3}) == ModelSpec(
        preset="tiny", tokenizer="t", init_seed=3)
    inline = ModelSpec.parse({"config": get_config("tiny").to_dict()})
    assert inline.config == get_config("tiny")
    assert ModelSpec.parse(get_config("tiny").to_dict()).config == get_config("tiny")  # a bare model config
    save_model(build_model(get_config("tiny")), tmp_path / "m")
    assert ModelSpec.parse(str(tmp_path / "m")) == ModelSpec(from_dir=str(tmp_path / "m"))
    assert ModelSpec.parse({"from": str(tmp_path / "m")}).to_dict()["from"] == str(tmp_path / "m")


@pytest.mark.parametrize("value, message", [
    ("tinny", "'tinny' is neither a model preset"),
    ({"preset": "tinny"}, r"model\.preset: unknown preset 'tinny' \(did you mean tiny\?\)"),
    ({"preset": "tiny", "from": "x"}, "exactly one of preset, config, from or compose; got \\['preset', 'from'\\]"),
    ({"config": {"vision": {"widht": 3}}}, r"model\.config: unknown keys in model config section 'vision'"),
    ({"config": {"vision": []}}, "section 'vision' must be a mapping"),
    ({"vision": {"width": 64, "heads": 3}}, r"vision\.width \(64\) must be divisible by vision\.heads \(3\)"),
    (3, "expected a preset name, a model folder or a mapping, got int"),
])
def test_parse_errors_name_the_key(value, message):
    with pytest.raises(ModelSpecError, match=message):
        ModelSpec.parse(value)


def test_a_built_model_takes_vocabulary_and_ids_from_the_tokenizer_and_says_so(tokenizer, caplog):
    folder, tok = tokenizer
    with caplog.at_level(logging.INFO, logger="monkeytune.model.spec"):
        resolved = resolve_model(ModelSpec(preset="tiny", tokenizer=str(folder)))
    assert resolved.config == get_config("tiny").matched_to_tokenizer(tok)
    assert resolved.built_fresh and resolved.tokenizer_dir == str(folder)
    assert resolved.adjusted[0] == f"llm.vocab_size: 1024 -> {resolved.config.llm.vocab_size}"
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"model: {a}" for a in resolved.adjusted]
    # Without a tokenizer the config is as written.
    assert resolve_model(ModelSpec(preset="tiny")).config == get_config("tiny")


def test_a_folder_resolves_to_its_own_config_and_tokenizer(tokenizer, tmp_path):
    folder, tok = tokenizer
    cfg = get_config("tiny").matched_to_tokenizer(tok)
    save_model(build_model(cfg), tmp_path / "m", tokenizer=tok)
    resolved = resolve_model(ModelSpec(from_dir=str(tmp_path / "m")))
    assert resolved.config == cfg and not resolved.adjusted and not resolved.built_fresh
    assert resolved.tokenizer_dir == str(tmp_path / "m") and resolved.tokenizer.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="is not a model folder"):
        resolve_model(ModelSpec(from_dir=str(tmp_path / "none")))
    with pytest.raises(ModelSpecError, match="model.tokenizer: tokenizer folder .* does not exist"):
        resolve_model(ModelSpec(preset="tiny", tokenizer=str(tmp_path / "none")))


def test_folders_saved_with_the_old_runtime_flags_still_load(tmp_path):
    save_model(build_model(get_config("tiny")), tmp_path / "m")
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "gradient_checkpointing" not in info["model"]["vision"]  # a training setting, not saved
    info["model"]["vision"]["gradient_checkpointing"] = True
    info["model"]["llm"]["gradient_checkpointing"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(info))
    model, _ = load_model(tmp_path / "m")
    assert model.config == get_config("tiny") and not model.vision.gradient_checkpointing
    assert ModelConfig.from_dict(info["model"]) == get_config("tiny")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_model_io_is_layered_one_way():
    # Each layer imports only from layers below it, at module level or inside functions.
    below = {
        "weights": set(),
        "folder": {"weights"},
        "assembly": {"weights"},
        "native": {"weights", "folder", "assembly"},
        "official": {"weights", "folder", "assembly"},
        "io": {"weights", "folder", "native", "official"},
        "spec": {"io"},
    }
    for layer, allowed in below.items():
        used = {m.removeprefix("monkeytune.model.") for m in _imports(SRC / "model" / f"{layer}.py")} & set(below)
        assert used <= allowed, (layer, used - allowed)
    assert not {m for m in _imports(SRC / "config.py") if m.startswith("monkeytune.model")}
