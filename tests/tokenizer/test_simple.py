"""SimpleTokenizer: training, plain-text encoding of special strings, save and reload."""

import json

import pytest

from monkeytune.tokenizer.base import Tokenizer, encode_with_images
from monkeytune.tokenizer.simple import MARKER_FILE, SPECIAL_TOKENS, SimpleTokenizer

CORPUS = [
    "a red square on a white background",
    "what colour is the square? red",
    "how many circles are there? two",
    "the blue circle is left of the green triangle",
] * 20


@pytest.fixture(scope="module")
def tok() -> SimpleTokenizer:
    return SimpleTokenizer.train(CORPUS, vocab_size=400)


def test_meets_protocol_and_special_ids(tok):
    assert isinstance(tok, Tokenizer)
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.eos_id == tok.pad_id == tok.special_id("<|endoftext|>") == 0
    assert tok.image_start_id == tok.special_id("<img>")
    assert tok.image_end_id == tok.special_id("</img>")
    assert tok.image_pad_id == tok.special_id("<imgpad>")
    with pytest.raises(KeyError):
        tok.special_id("<|extra_0|>")


def test_training_learns_merges(tok):
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400
    # A frequent word becomes far fewer tokens than its bytes.
    assert len(tok.encode(" square")) < len(" square")


@pytest.mark.parametrize(
    "text", ["what colour is the circle?", "", "  spaces  ", "未见过的文字 😀", "a\nb\tc"]
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_strings_are_plain_text(tok):
    text = "say <|endoftext|> then <img>x.png</img><imgpad><|im_end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids) == text


def test_decode_skips_or_names_specials(tok):
    ids = [tok.special_id("<|im_start|>")] + tok.encode("red") + [tok.eos_id]
    assert tok.decode(ids) == "red"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>red<|endoftext|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_encode_with_images(tok):
    ids, paths = encode_with_images(tok, "<img>a.png</img>red", tokens_per_image=2)
    assert paths == ["a.png"]
    assert ids[:4] == [tok.image_start_id, tok.image_pad_id, tok.image_pad_id, tok.image_end_id]
    assert tok.decode(ids) == "red"


def test_save_and_reload_keep_ids_and_plain_text_specials(tok, tmp_path):
    tok.save(tmp_path)
    again = SimpleTokenizer.from_dir(tmp_path)
    text = "the green <|endoftext|> triangle"
    assert again.encode(text) == tok.encode(text)
    assert again.vocab_size == tok.vocab_size
    assert again.special_tokens == tok.special_tokens


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        SimpleTokenizer.train(CORPUS, vocab_size=100)


def test_from_dir_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=MARKER_FILE):
        SimpleTokenizer.from_dir(tmp_path)
    tok.save(tmp_path)
    marker = tmp_path / MARKER_FILE
    marker.write_text(json.dumps({"format": "other", "version": 1, "special_tokens": []}))
    with pytest.raises(ValueError, match="field 'format'"):
        SimpleTokenizer.from_dir(tmp_path)
    bad = {"format": "monkeytune-simple-bpe", "version": 1, "special_tokens": ["<nope>"]}
    marker.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'<nope>' is not in the tokenizer vocabulary"):
        SimpleTokenizer.from_dir(tmp_path)
    marker.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SimpleTokenizer.from_dir(tmp_path)
