"""load_tokenizer picks the tokenizer by the files present."""

import pytest

from monkeytune.tokenizer.loading import load_tokenizer
from monkeytune.tokenizer.qwen import VOCAB_FILE, QwenTokenizer, write_tiktoken_ranks
from monkeytune.tokenizer.simple import SimpleTokenizer


def test_picks_qwen(tmp_path):
    write_tiktoken_ranks(tmp_path / VOCAB_FILE, [bytes([b]) for b in range(256)])
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, QwenTokenizer)
    assert tok.eos_id == 256


def test_picks_simple(tmp_path):
    SimpleTokenizer.train(["one two three"] * 5, vocab_size=300).save(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SimpleTokenizer)
    assert tok.decode(tok.encode("two three")) == "two three"


def test_qwen_wins_when_both_present(tmp_path):
    SimpleTokenizer.train(["one two"] * 5, vocab_size=300).save(tmp_path)
    write_tiktoken_ranks(tmp_path / VOCAB_FILE, [bytes([b]) for b in range(256)])
    assert isinstance(load_tokenizer(tmp_path), QwenTokenizer)


def test_error_lists_what_was_looked_for(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    msg = str(err.value)
    for name in ("qwen.tiktoken", "tokenizer.json", "monkeytune_tokenizer.json", str(tmp_path)):
        assert name in msg


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
