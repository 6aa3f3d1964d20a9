"""transformers conventions: Auto classes, from_pretrained/save_pretrained, the processor, plain-HF exports.

Every export is loaded by plain transformers / peft (no monkeytune class involved) and its logits
are compared with monkeytune's on the same ids.
"""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import monkeytune
from monkeytune import MonkeyForCausalLM, MonkeyProcessor, build_model
from monkeytune.data.templates import build_prompt
from monkeytune.generate import GenerationSettings, answer
from monkeytune.model.io import load_model
from monkeytune.policy.presets import inject_llm_lora
from monkeytune.tokenizer.hf import to_transformers_tokenizer
from monkeytune.tokenizer.loading import load_tokenizer
from monkeytune.tokenizer.simple import SimpleTokenizer

TEXTS = ["what colour is the car? Answer: red", "the cat sat on the mat", "Picture 1: a dog 123"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny monkeytune folder with a trained tokenizer and non-zero per-window adapters."""
    from monkeytune.config import get_config

    tok = SimpleTokenizer.train(TEXTS * 3, vocab_size=300)
    cfg = get_config("tiny").matched_to_tokenizer(tok)
    cfg.vision.layers, cfg.llm.num_layers, cfg.image.window_size, cfg.vision.n_queries = 1, 1, 56, 16
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("mt") / "model"
    model.save_pretrained(path, tokenizer=tok)
    return path


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_auto_classes_read_a_monkeytune_folder(folder):
    info = json.loads((folder / "config.json").read_text())
    assert info["model_type"] == "monkey" and info["architectures"] == ["MonkeyForCausalLM"]
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "MonkeyConfig"
    auto = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    direct, _ = load_model(folder)
    assert isinstance(auto, MonkeyForCausalLM) and not auto.training
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(logits(auto, ids), logits(direct, ids))


def test_import_monkeytune_registers_in_a_fresh_process(folder):
    code = ("import monkeytune\nfrom transformers import AutoModelForCausalLM\n"
            f"print(type(AutoModelForCausalLM.from_pretrained({str(folder)!r})).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "MonkeyForCausalLM"


def test_from_pretrained_and_save_pretrained_on_an_official_folder(off, tmp_path):
    cfg = off.official_config("monkey")
    src = off.write_official(tmp_path / "official", cfg, off.official_state(cfg), fmt="safetensors")
    model = MonkeyForCausalLM.from_pretrained(src, torch_dtype="float32", device_map={"": "cpu"})
    auto = AutoModelForCausalLM.from_pretrained(src)  # official Monkey folders say model_type monkey
    ids = torch.tensor([off.prompt_with_image(cfg)])
    views = off.random_views(5)
    slots = torch.tensor([0, 1, 2, 3, -1])
    expected = logits(model, ids, pixel_values=views, view_slots=slots)
    torch.testing.assert_close(logits(auto, ids, pixel_values=views, view_slots=slots), expected, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "copy")
    again = MonkeyForCausalLM.from_pretrained(tmp_path / "copy")
    torch.testing.assert_close(logits(again, ids, pixel_values=views, view_slots=slots), expected, rtol=0, atol=0)
    assert MonkeyProcessor.from_pretrained(src).config.tokens_per_image == cfg["visual"]["n_queries"] * 5


def test_processor_output_goes_straight_into_generate(folder, tmp_path):
    model = MonkeyForCausalLM.from_pretrained(folder)
    processor = MonkeyProcessor.from_pretrained(folder)
    red, blue = Image.new("RGB", (90, 60), "red"), Image.new("RGB", (40, 70), "blue")
    red.save(tmp_path / "red.png")
    batch = processor(text=["<image> what colour? Answer: ", "the cat sat", f"<img>{tmp_path}/red.png</img> and <image>"],
                      images=[red, blue], return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "view_slots"}
    n = model.config.tokens_per_image
    assert (batch["input_ids"] == model.config.image_pad_id).sum() == 3 * n
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][1, 0]  # left padding
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 3
    # Left padding changes nothing: the first row alone, and through monkeytune's own prompting.
    row = processor(text=["<image> what colour? Answer: "], images=[red])
    alone = model.generate(**row, max_new_tokens=5, do_sample=False)
    assert processor.decode(alone[0]) == processor.decode(out[0])
    single = answer(model, processor.tokenizer, "what colour? Answer: ", image=str(tmp_path / "red.png"),
                    template="raw", settings=GenerationSettings(max_new_tokens=5))
    assert single == processor.decode(out[0]).strip()
    # A question with the folder's template ("auto"): the image goes where training put it.
    templated = processor(text=["what colour?"], images=[red], template="auto")
    assert templated["pixel_values"].shape[0] == model.config.image.num_views


def test_processor_counts_placeholders_against_images(folder):
    processor = MonkeyProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(text=["<image> <image> hi"], images=[Image.new("RGB", (8, 8))])


def test_package_exports_the_main_api():
    for name in ("MonkeyForCausalLM", "MonkeyProcessor", "MonkeyConfig", "load_model", "answer", "score_answer",
                 "load_for_inference", "train", "compute_metrics"):
        assert hasattr(monkeytune, name), name


@pytest.mark.parametrize("merge", [True, False])
def test_hf_llm_export_loads_in_plain_transformers_and_peft(folder, tmp_path, merge):
    from peft import AutoPeftModelForCausalLM

    from monkeytune.model.hf_export import export_hf_llm

    model, tok = load_model(folder)
    inject_llm_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    ids = torch.tensor([tok.encode("the cat sat on the mat")])
    expected = logits(model, ids)
    out = export_hf_llm(model, tmp_path / "llm", tokenizer=tok, merge_lora=merge)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    if merge:
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(plain).__name__ == "Qwen2ForCausalLM"
    else:
        adapter = json.loads((out / "llm_lora" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(out.resolve())
        plain = AutoPeftModelForCausalLM.from_pretrained(str(out / "llm_lora")).eval()
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)
    # The small BPE of the demo splits text by GPT-2's pattern: load it as the generic fast
    # tokenizer (AutoTokenizer would substitute Qwen2's pattern for a qwen2 model folder; the Qwen
    # vocabulary is checked through AutoTokenizer below).
    hf_tok = PreTrainedTokenizerFast.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_export_cli_hf_llm_without_lora(folder, tmp_path):
    from monkeytune.cli import main

    assert main(["export", "--model", str(folder), "--to", "hf-llm", str(tmp_path / "llm")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    model, tok = load_model(folder)
    ids = torch.tensor([tok.encode("what colour is the car?")])
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["simple", "qwen"])
def test_transformers_tokenizer_matches_and_renders_chatml_as_training(off, tmp_path, kind):
    if kind == "simple":
        tok = SimpleTokenizer.train(TEXTS * 3, vocab_size=300)
    else:
        cfg = off.official_config("monkey")
        tok = load_tokenizer(off.write_official(tmp_path / "o", cfg, {}, fmt="safetensors"))
    fast = to_transformers_tokenizer(tok)
    fast.save_pretrained(tmp_path / "tok")
    if kind == "qwen":  # as in an hf-llm export: AutoTokenizer then reads model_type qwen2
        (tmp_path / "tok" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in [*TEXTS, "Ünïcödé café 2024, x\n\n  y", "the  cat\tsat!!"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
    messages = [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "sat"},
                {"role": "user", "content": "on the mat"}]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf(rendered, add_special_tokens=False)["input_ids"]
    assert ids == build_prompt("chatml", messages, tok, 0, add_generation_prompt=True)[0]
