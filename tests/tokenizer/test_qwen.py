"""QwenTokenizer on a small vocabulary in the qwen.tiktoken format (and the real one if given)."""

import os
import unicodedata
from pathlib import Path

import pytest

from monkeytune.tokenizer.base import Tokenizer, encode_with_images
from monkeytune.tokenizer.qwen import (
    SPECIAL_TOKENS,
    VOCAB_FILE,
    QwenTokenizer,
    read_tiktoken_ranks,
    write_tiktoken_ranks,
)

BYTES = [bytes([b]) for b in range(256)]
# Ranks 256.. in order; each merge's halves are reachable by lower-ranked merges.
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"12", b"  "]
N_RANKS = len(BYTES) + len(MERGES)


@pytest.fixture
def vocab_dir(tmp_path: Path) -> Path:
    write_tiktoken_ranks(tmp_path / VOCAB_FILE, BYTES + MERGES)
    return tmp_path


@pytest.fixture
def tok(vocab_dir: Path) -> QwenTokenizer:
    return QwenTokenizer.from_dir(vocab_dir)


def test_meets_protocol(tok):
    assert isinstance(tok, Tokenizer)


def test_special_ids_follow_ranks_in_official_order(tok):
    assert tok.num_ranks == N_RANKS
    assert tok.eos_id == N_RANKS
    assert tok.pad_id == tok.eos_id
    assert tok.special_id("<|im_start|>") == N_RANKS + 1
    assert tok.special_id("<|im_end|>") == N_RANKS + 2
    assert tok.special_id("<|extra_0|>") == N_RANKS + 3
    assert tok.special_id("<|extra_204|>") == N_RANKS + 207
    assert tok.special_id("<ref>") == N_RANKS + 208
    assert tok.special_id("</quad>") == N_RANKS + 213
    assert (tok.image_start_id, tok.image_end_id, tok.image_pad_id) == (
        N_RANKS + 214,
        N_RANKS + 215,
        N_RANKS + 216,
    )
    assert tok.vocab_size == N_RANKS + 217 == N_RANKS + len(SPECIAL_TOKENS)
    with pytest.raises(KeyError, match="<pad>"):
        tok.special_id("<pad>")


def test_merges_follow_rank_order(tok):
    assert tok.encode("hello world") == [259, 264]
    assert tok.encode("help") == [256, ord("l"), ord("p")]


def test_pretokenizer_splits_digits_and_keeps_last_space_for_the_word(tok):
    # "12" is in the vocabulary, but Qwen's pattern cuts numbers into single digits.
    assert tok.encode("12") == [ord("1"), ord("2")]
    # "a   w": the run of three spaces gives "  " to one piece and " w" to the next word.
    assert tok.encode("a   w") == [ord("a"), 266, 260]


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "",
        "  leading and trailing  ",
        "tabs\tand\nnewlines\r\n",
        "数字 123 ok",
        "emoji 😀👍🏽!",
        "it's",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.num_ranks for i in ids)
    assert tok.decode(ids) == text


def test_special_strings_are_plain_text(tok):
    text = "<|endoftext|> and <img>cat.jpg</img><imgpad><|im_start|>"
    ids = tok.encode(text)
    assert all(i < tok.num_ranks for i in ids)
    assert tok.decode(ids) == text


def test_decode_skips_or_names_specials(tok):
    ids = [tok.special_id("<|im_start|>")] + tok.encode("hello") + [tok.eos_id]
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>hello<|endoftext|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_decode_cut_utf8_becomes_replacement(tok):
    ids = tok.encode("é")
    assert len(ids) == 2
    assert tok.decode(ids[:1]) == "\ufffd"


def test_nfc_normalisation_like_official(tok):
    decomposed = "e\u0301"
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))


def test_encode_with_images(tok):
    ids, paths = encode_with_images(tok, "hello<img>a.png</img> world", tokens_per_image=3)
    assert paths == ["a.png"]
    pad = tok.image_pad_id
    assert ids == [259, tok.image_start_id, pad, pad, pad, tok.image_end_id, 264]


def test_save_round_trip(tok, tmp_path):
    out = tmp_path / "copy"
    tok.save(out)
    again = QwenTokenizer.from_dir(out)
    assert again.vocab_size == tok.vocab_size
    assert again.encode("hello world 12") == tok.encode("hello world 12")


def test_missing_file_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        QwenTokenizer.from_dir(tmp_path)


def test_malformed_line_names_line(tmp_path):
    path = write_tiktoken_ranks(tmp_path / VOCAB_FILE, BYTES)
    with open(path, "a") as f:
        f.write("aGk= notanumber\n")
    with pytest.raises(ValueError, match=r"qwen.tiktoken:257: rank is not an integer"):
        read_tiktoken_ranks(path)


def test_bad_base64_names_line(tmp_path):
    path = tmp_path / VOCAB_FILE
    path.write_text("!!!! 0\n")
    with pytest.raises(ValueError, match=r":1: token is not valid base64"):
        read_tiktoken_ranks(path)


def test_missing_byte_is_rejected(tmp_path):
    path = write_tiktoken_ranks(tmp_path / VOCAB_FILE, BYTES[1:])
    with pytest.raises(ValueError, match="single-byte tokens are missing"):
        read_tiktoken_ranks(path)


def test_gap_in_ranks_is_rejected(tmp_path):
    path = write_tiktoken_ranks(tmp_path / VOCAB_FILE, BYTES)
    with open(path, "a") as f:
        f.write("aGk= 300\n")
    with pytest.raises(ValueError, match=r"ranks must be exactly 0\.\.256"):
        read_tiktoken_ranks(path)


def test_duplicate_token_is_rejected(tmp_path):
    path = write_tiktoken_ranks(tmp_path / VOCAB_FILE, BYTES + [b"a"])
    with pytest.raises(ValueError, match=r":257: token b'a' already has rank 97"):
        read_tiktoken_ranks(path)


REAL_VOCAB = os.environ.get("MONKEYTUNE_QWEN_TIKTOKEN")


@pytest.mark.skipif(not REAL_VOCAB, reason="set MONKEYTUNE_QWEN_TIKTOKEN to a real qwen.tiktoken")
def test_real_vocabulary_ids():
    tok = QwenTokenizer.from_file(REAL_VOCAB)
    assert tok.num_ranks == 151643
    assert (tok.eos_id, tok.special_id("<|im_end|>")) == (151643, 151645)
    assert (tok.image_start_id, tok.image_end_id, tok.image_pad_id) == (151857, 151858, 151859)
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好") == [108386]
    assert tok.encode("12345") == [16, 17, 18, 19, 20]
