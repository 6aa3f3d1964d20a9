"""``monkeytune tokenizer train``: a tokenizer trained on a data set's text, then used by a training run."""

from __future__ import annotations

import json

import pytest

from monkeytune.cli import main
from monkeytune.model.io import load_model, read_config
from monkeytune.tokenizer.loading import load_tokenizer
from monkeytune.tokenizer.simple import SimpleTokenizer
from monkeytune.tokenizer.training import data_texts, train_tokenizer


def test_train_a_tokenizer_on_the_data_then_train_a_model_with_it(synthetic, make_config, tmp_path, capsys):
    train_file, _ = synthetic
    out = tmp_path / "task-tokenizer"
    assert main(["tokenizer", "train", str(train_file), "--vocab-size", "300", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("trained a ") and f"written to {out}" in summary
    tok = load_tokenizer(out)
    assert isinstance(tok, SimpleTokenizer) and 268 < tok.vocab_size <= 300
    # The task's words became tokens: clearly fewer tokens than bytes on its own text.
    texts, samples = data_texts(train_file)
    assert samples == 48 and not any("<img>" in t or "images/" in t for t in texts)
    assert sum(len(tok.encode(t)) for t in texts) < 0.7 * sum(len(t.encode()) for t in texts)
    assert len(tok.encode("What colour is the shape?")) < len("What colour is the shape?") // 2

    # A tiny run with it: the model's vocabulary follows the tokenizer, and the folder records it.
    config = tmp_path / "run.yaml"
    make_config("with-task-tokenizer", model={"tokenizer": str(out)}, checkpoint={"final_save": "full"}).save(config)
    assert main(["train", str(config), "--train.max_steps", "2"]) == 0
    final = tmp_path / "with-task-tokenizer" / "final"
    model, saved_tok = load_model(final)
    assert saved_tok.vocab_size == tok.vocab_size
    assert model.config.llm.vocab_size == -(-tok.vocab_size // 64) * 64  # rounded up for aligned tables
    default = load_tokenizer(synthetic[1])  # the fixture's own tokenizer would have given another table
    assert -(-default.vocab_size // 64) * 64 != model.config.llm.vocab_size
    assert read_config(final)["metadata"]["tokenizer"]["source"] == str(out.resolve())
    assert saved_tok.encode("a red circle") == tok.encode("a red circle")


def test_chatml_text_adds_the_role_headers(synthetic, tmp_path):
    train_file, _ = synthetic
    monkey = train_tokenizer(train_file, tmp_path / "m", vocab_size=320)
    chatml = train_tokenizer(train_file, tmp_path / "c", vocab_size=320, template="chatml")
    assert chatml.samples == monkey.samples == 48 and chatml.characters > monkey.characters
    header = "system\nYou are a helpful assistant."
    assert len(load_tokenizer(tmp_path / "c").encode(header)) < len(load_tokenizer(tmp_path / "m").encode(header))


def test_bad_inputs_are_one_line_with_exit_2(synthetic, tmp_path, capsys):
    train_file, _ = synthetic
    bad = tmp_path / "bad.jsonl"
    good = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")

    def run(*argv: str) -> tuple[int, str]:
        rc = main(["tokenizer", "train", *argv])
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return rc, err

    rc, err = run(str(bad), "--vocab-size", "300", "--out", str(tmp_path / "t1"))
    assert rc == 2 and err.startswith(f"monkeytune tokenizer train: {bad}:2") and "conversations[0]" in err
    assert not (tmp_path / "t1").exists()
    rc, err = run(str(train_file), "--vocab-size", "100", "--out", str(tmp_path / "t2"))
    assert rc == 2 and "vocab_size=100 is too small: need at least 268" in err
    rc, err = run(str(tmp_path / "missing.jsonl"), "--vocab-size", "300", "--out", str(tmp_path / "t3"))
    assert rc == 2 and "missing.jsonl" in err
    assert run(str(train_file), "--vocab-size", "300", "--out", str(tmp_path / "t4"))[0] == 0
    rc, err = run(str(train_file), "--vocab-size", "300", "--out", str(tmp_path / "t4"))
    assert rc == 2 and "already holds a tokenizer" in err and "--overwrite" in err
    assert run(str(train_file), "--vocab-size", "290", "--out", str(tmp_path / "t4"), "--overwrite")[0] == 0
    assert load_tokenizer(tmp_path / "t4").vocab_size <= 290


def test_min_frequency_is_checked(synthetic, tmp_path):
    with pytest.raises(ValueError, match="min_frequency must be at least 1"):
        train_tokenizer(synthetic[0], tmp_path / "x", vocab_size=300, min_frequency=0)
