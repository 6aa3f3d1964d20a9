"""A run's saved config.yaml is the configuration that ran: resolved model, absolute paths."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from monkeytune.model.io import load_model
from monkeytune.tokenizer.loading import load_tokenizer
from monkeytune.train.config_load import load_config
from monkeytune.train.loop import train


def test_saved_config_is_the_effective_one_and_reruns_from_another_directory(
        synthetic, micro_model, tmp_path, monkeypatch, caplog):
    train_file, tok_dir = synthetic
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # Relative paths, as a user writes them next to the data.
    raw = {
        "model": {"config": micro_model, "tokenizer": os.path.relpath(tok_dir, work)},
        "data": {"train": os.path.relpath(train_file, work), "max_length": 128},
        "policy": {"preset": "full"},
        "train": {"max_steps": 1, "micro_batch_size": 4, "precision": "fp32"},
        "checkpoint": {"output_dir": "run", "final_save": "full"},
        "log": {"progress": False, "plot": False, "tensorboard": "false"},
    }
    with caplog.at_level(logging.INFO, logger="monkeytune"):
        first = train(load_config(data=raw))
    tokenizer = load_tokenizer(tok_dir)
    # The vocabulary and the image ids came from the tokenizer, and the log says so.
    logged = [r.getMessage() for r in caplog.records if r.name == "monkeytune.model.spec"]
    assert any(m.startswith("model: llm.vocab_size: 512 -> ") for m in logged), logged
    assert f"model: image_pad_id: 151859 -> {tokenizer.image_pad_id}" in "\n".join(logged)

    saved_path = work / "run" / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    built, _ = load_model(first.final_dir)
    assert saved["model"]["preset"] is None and saved["model"]["from"] is None
    assert saved["model"]["config"] == built.config.to_dict()  # what ran, not what was written
    assert saved["model"]["config"]["image_pad_id"] == tokenizer.image_pad_id
    for path in (saved["model"]["tokenizer"], *saved["data"]["train"], saved["checkpoint"]["output_dir"]):
        assert Path(path).is_absolute(), path

    # The saved file, run from another directory into another folder, builds the same model.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monkeytune"):
        again = train(load_config(saved_path, [("checkpoint.output_dir", str(elsewhere / "run2"))]))
    assert not [r for r in caplog.records if r.name == "monkeytune.model.spec"]  # nothing left to adjust
    rebuilt, _ = load_model(again.final_dir)
    assert rebuilt.config == built.config
    resaved = yaml.safe_load((elsewhere / "run2" / "config.yaml").read_text())
    assert resaved["model"] == saved["model"] and resaved["data"] == saved["data"]
