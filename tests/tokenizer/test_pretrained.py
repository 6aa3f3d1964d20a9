"""PretrainedTokenizer: a transformers LLM tokenizer (built here, no hub) as a monkeytune tokenizer."""

import pytest

pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from monkeytune.data.index import tokenizer_identity  # noqa: E402
from monkeytune.tokenizer.base import encode_with_images  # noqa: E402
from monkeytune.tokenizer.loading import load_tokenizer  # noqa: E402
from monkeytune.tokenizer.pretrained import IMAGE_TOKENS, PretrainedTokenizer  # noqa: E402
from monkeytune.tokenizer.simple import MARKER_FILE  # noqa: E402

CORPUS = ["the cat sat on the mat", "a red square and a blue circle", "hello world, 123!"] * 4
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
TRICKY = "a caption naming <img> and </img>, <imgpad>, <|im_end|>, <|endoftext|>, <s> and </s>: 中文 🙂"


def _bpe(specials: list[str]) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(CORPUS, trainer=trainer)
    return hf


def qwen_like() -> PreTrainedTokenizerFast:
    """ChatML specials, eos <|im_end|> and pad <|endoftext|> as in Qwen2 instruct models."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML,
    )


def llama_like() -> PreTrainedTokenizerFast:
    """<s>/</s>, a BOS-adding post-processor and no pad token, as in Llama 2."""
    hf = _bpe(["<unk>", "<s>", "</s>"])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=LLAMA_TEMPLATE
    )


@pytest.fixture(params=["qwen", "llama"])
def llm_dir(request, tmp_path):
    """An LLM's own tokenizer folder, as save_pretrained writes it (no image tokens)."""
    (qwen_like if request.param == "qwen" else llama_like)().save_pretrained(str(tmp_path / "llm"))
    return tmp_path / "llm"


@pytest.fixture
def tok(llm_dir):
    return PretrainedTokenizer.from_dir(llm_dir, add_image_tokens=True)


def test_image_tokens_get_new_ids_at_the_end(llm_dir):
    hf = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    n = len(hf)
    before = hf.encode("the cat sat", add_special_tokens=False)
    tok = PretrainedTokenizer.add_image_tokens(hf)
    assert (tok.image_start_id, tok.image_end_id, tok.image_pad_id) == (n, n + 1, n + 2)
    assert tok.vocab_size == n + 3
    assert tok.encode("the cat sat") == before  # the LLM's own ids are unchanged
    assert [tok.special_id(t) for t in IMAGE_TOKENS] == [n, n + 1, n + 2]
    again = PretrainedTokenizer.add_image_tokens(hf)  # idempotent
    assert again.vocab_size == n + 3 and again.image_pad_id == n + 2


def test_refuses_tokenizer_without_image_tokens(llm_dir):
    hf = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    with pytest.raises(ValueError, match="add_image_tokens"):
        PretrainedTokenizer(hf)
    with pytest.raises(ValueError, match="<img>"):
        load_tokenizer(llm_dir)  # a checkpoint's tokenizer must already match its embeddings
    with pytest.raises(TypeError):
        PretrainedTokenizer(object())


def test_encode_reads_special_strings_as_text(tok):
    ids = tok.encode(TRICKY)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == TRICKY
    assert tok.decode(ids, skip_special=False) == TRICKY
    assert tok.encode("the cat")[0] == tok.encode("the")[0]  # no BOS in front


def test_control_ids_and_decode(tok):
    hello = tok.encode("hello world")
    ids = [tok.image_start_id, tok.image_pad_id, tok.image_end_id, *hello, tok.eos_id]
    assert tok.decode(ids) == "hello world"
    shown = tok.decode(ids, skip_special=False)
    assert "<img>" in shown and "<imgpad>" in shown and "hello world" in shown
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(KeyError):
        tok.special_id("<|not_a_token|>")


def test_eos_pad_and_named_specials(tmp_path):
    qwen = PretrainedTokenizer.add_image_tokens(qwen_like())
    assert qwen.eos_id == qwen.special_id("<|im_end|>")
    assert qwen.pad_id == qwen.special_id("<|endoftext|>")
    assert qwen.special_id("<|im_start|>") == 1
    assert qwen.chat_template == CHATML
    llama = PretrainedTokenizer.add_image_tokens(llama_like())
    assert llama.eos_id == llama.pad_id == llama.special_id("</s>")
    with pytest.raises(KeyError):
        llama.special_id("<|im_start|>")
    assert "bos_token" in llama.chat_template


def test_save_and_load_roundtrip(tok, tmp_path):
    out = tok.save(tmp_path / "ckpt")
    assert (out / "tokenizer.json").is_file() and not (out / MARKER_FILE).exists()
    back = load_tokenizer(out)
    assert isinstance(back, PretrainedTokenizer)
    for name in ("vocab_size", "eos_id", "pad_id", "image_start_id", "image_end_id", "image_pad_id"):
        assert getattr(back, name) == getattr(tok, name)
    assert back.encode(TRICKY) == tok.encode(TRICKY)
    assert back.special_tokens == tok.special_tokens
    assert back.chat_template == tok.chat_template
    assert tokenizer_identity(back) == tokenizer_identity(tok)


def test_plain_transformers_reads_the_saved_folder(tok, tmp_path):
    tok.save(tmp_path / "ckpt")
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"), local_files_only=True)
    assert plain.convert_tokens_to_ids(list(IMAGE_TOKENS)) == [tok.image_start_id, tok.image_end_id, tok.image_pad_id]
    assert plain.encode("the cat sat", add_special_tokens=False) == tok.encode("the cat sat")
    # split_special_tokens was only a per-call choice: plain transformers still parses control
    # tokens, which its chat template relies on.
    assert plain.encode("<img>", add_special_tokens=False) == [tok.image_start_id]
    assert plain.chat_template == tok.chat_template


def test_to_transformers_is_an_independent_copy(tok):
    hf = tok.to_transformers()
    hf.padding_side = "left"
    assert tok.to_transformers().padding_side == "right"
    assert hf.encode("<imgpad>", add_special_tokens=False) == [tok.image_pad_id]


def test_works_with_monkeytune_helpers(tok):
    ids, paths = encode_with_images(tok, "look <img>a.png</img> here", tokens_per_image=3)
    assert paths == ["a.png"]
    assert ids.count(tok.image_pad_id) == 3
    assert ids[ids.index(tok.image_start_id) + 4] == tok.image_end_id
    ident = tokenizer_identity(tok)
    assert ident["class"].endswith("PretrainedTokenizer")
    assert ident["vocab_size"] == tok.vocab_size and ident["image_pad_id"] == tok.image_pad_id


def test_load_tokenizer_still_reports_unreadable_folders(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    msg = str(err.value)
    assert "tokenizer_config.json" in msg and "transformers could not read it" in msg
