"""Prompt templates, streaming, chat sessions, scoring and the chat/score/export commands on a tiny saved model."""

import dataclasses
import io
import json
import logging

import pytest
import torch
from PIL import Image

from monkeytune.cli import main
from monkeytune.config import get_config
from monkeytune.data.templates import build_prompt
from monkeytune.generate import (
    ChatSession,
    GenerationSettings,
    TokenStreamer,
    answer,
    default_template,
    prompt_ids,
    run_interactive,
    score_answer,
)
from monkeytune.model import build_model
from monkeytune.model.io import load_model, read_tensors, save_model, set_metadata
from monkeytune.prompts import user_text
from monkeytune.tokenizer.qwen import QwenTokenizer
from monkeytune.tokenizer.simple import SimpleTokenizer

TEXTS = ["what is in the picture? Answer: a red square", "Generate the detailed caption in English: a cat on a mat",
         "the quick brown fox jumps over the lazy dog", "how many boxes are there? two boxes"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = SimpleTokenizer.train(TEXTS * 3, vocab_size=320)
    cfg = get_config("tiny").matched_to_tokenizer(tok)
    cfg.vision = dataclasses.replace(cfg.vision, layers=1, n_queries=16)
    cfg.image = dataclasses.replace(cfg.image, window_size=56)
    cfg.llm = dataclasses.replace(cfg.llm, num_layers=1)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_model(model, root / "model", tokenizer=tok)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "red.png")
    return root, model, tok


def test_official_prompt_wordings():
    assert user_text("vqa", "What is it?", "a.jpg") == "<img>a.jpg</img> What is it? Answer: "
    assert user_text("vqa-question-first", "What is it?", "a.jpg") == "What is it? <img>a.jpg</img> Answer: "
    assert user_text("vqa-question-first", "What is it?") == user_text("vqa", "What is it?") == "What is it? Answer: "
    assert user_text("caption", "ignored", "a.jpg") == "<img>a.jpg</img> Generate the detailed caption in English: "
    assert user_text("chatml", "Hi", "a.jpg") == "Picture 1: <img>a.jpg</img>\nHi"
    assert user_text("raw", "x <img>b.jpg</img> y", "a.jpg") == "x <img>b.jpg</img> y"
    assert user_text("raw", "describe", "a.jpg") == "<img>a.jpg</img>describe"
    with pytest.raises(ValueError, match="unknown template"):
        user_text("alpaca", "x")


def test_prompt_ids_match_training_templates(saved):
    _, model, tok = saved
    tpi = model.config.tokens_per_image
    ids, images = prompt_ids("vqa", tok, tpi, "what is in the picture?", "red.png")
    assert images == ["red.png"] and ids.count(tok.image_pad_id) == tpi
    expected, _ = build_prompt("monkey", [{"role": "user", "content": "<img>red.png</img> what is in the picture? Answer: "}], tok, tpi)
    assert ids == expected
    history = [("Picture 1: <img>red.png</img>\nhi", "hello")]
    ids, images = prompt_ids("chatml", tok, tpi, "and then?", None, history)
    msgs = [{"role": "user", "content": history[0][0]}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and then?"}]
    assert (ids, images) == build_prompt("chatml", msgs, tok, tpi, add_generation_prompt=True)


def test_streamer_holds_back_partial_characters(tmp_path):
    tok = QwenTokenizer({bytes([b]): b for b in range(256)})
    pieces = []
    streamer = TokenStreamer(tok, pieces.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: skipped
    for t in "é!".encode():
        streamer.put(torch.tensor([t]))
    streamer.end()
    assert pieces == ["é", "!"] and streamer.text == "é!"


def test_chat_one_shot_streams_the_answer(saved, capsys):
    root, model, tok = saved
    args = ["chat", "--model", str(root / "model"), "--image", str(root / "red.png"), "what is in the picture?",
            "--max-new-tokens", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()
    loaded, _ = load_model(root / "model")
    expected = answer(loaded, tok, "what is in the picture?", str(root / "red.png"), settings=GenerationSettings(6))
    assert printed == expected and printed
    # The same streamed through a callable gives the same text.
    pieces = []
    again = answer(loaded, tok, "what is in the picture?", str(root / "red.png"), settings=GenerationSettings(6),
                   stream=pieces.append)
    assert "".join(pieces).strip() == again == expected


def test_interactive_chatml_keeps_history(saved):
    root, model, tok = saved
    session = ChatSession(model, tok, "chatml", str(root / "red.png"), GenerationSettings(3))
    out = io.StringIO()
    n = run_interactive(session, io.StringIO("hello\n\nhow many boxes?\n/quit\nnot read\n"), out)
    assert n == 2 and len(session.history) == 2
    assert session.history[0][0].startswith("Picture 1: <img>") and "<img>" not in session.history[1][0]
    assert len(out.getvalue().splitlines()) == 2
    single = ChatSession(model, tok, "vqa", str(root / "red.png"), GenerationSettings(3))
    run_interactive(single, io.StringIO("a?\nb?\n"), io.StringIO())
    assert single.history == []


def test_default_template_follows_checkpoint_metadata(saved, caplog):
    _, model, _ = saved
    with caplog.at_level(logging.WARNING, logger="monkeytune.generate"):
        model.metadata = {"chat_format": "chatml"}
        assert default_template(model) == "chatml"
        model.metadata = {"chat_format": "monkey", "prompt_template": "vqa-question-first"}
        assert default_template(model) == "vqa-question-first"
        model.metadata = {}
        assert caplog.text == ""  # recorded: no warning
        # Nothing (usable) recorded: the VQA layout, and a warning naming the folder.
        assert default_template({"chat_format": "monkey"}, "runs/x/final") == "vqa"
        assert "runs/x/final records no prompt template: prompting with the vqa layout" in caplog.text
        caplog.clear()
        assert default_template({"prompt_template": "alpaca"}) == "vqa"  # not a template of this version
        assert "records an unknown prompt template 'alpaca'" in caplog.text

        class Loaded:  # a loaded model is warned about once, not at every answer
            metadata: dict = {}

        caplog.clear()
        one = Loaded()
        assert [default_template(one) for _ in range(3)] == ["vqa"] * 3
        assert caplog.text.count("records no prompt template") == 1


def test_set_metadata_records_the_template_for_every_command(saved, tmp_path):
    root, model, tok = saved
    folder = save_model(model, tmp_path / "m", tokenizer=tok, metadata={"chat_format": "monkey"})
    assert set_metadata(folder, prompt_template="vqa-question-first") == {
        "chat_format": "monkey", "prompt_template": "vqa-question-first"}
    loaded, _ = load_model(folder)
    assert default_template(loaded) == "vqa-question-first"
    # A model saved from it carries the fact on (a fine-tune of the demo keeps its layout).
    again, _ = load_model(save_model(loaded, tmp_path / "again"))
    assert again.metadata["prompt_template"] == "vqa-question-first"
    # The weights were not touched.
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_score_equals_direct_log_softmax(saved, capsys):
    root, model, tok = saved
    image = str(root / "red.png")
    result = score_answer(model, tok, "what is in the picture?", "a red square", image, template="vqa")
    ids, _ = prompt_ids("vqa", tok, model.config.tokens_per_image, "what is in the picture?", image)
    ans = tok.encode("a red square")
    from monkeytune.generate import load_views

    pv, slots = load_views(model, [image])
    with torch.no_grad():
        logits = model(torch.tensor([ids + ans]), pixel_values=pv, view_slots=slots).logits[0]
    direct = [torch.log_softmax(logits[len(ids) - 1 + i], -1)[t].item() for i, t in enumerate(ans)]
    assert [t["id"] for t in result["tokens"]] == ans
    assert [t["logprob"] for t in result["tokens"]] == pytest.approx(direct, abs=1e-5)
    assert result["sum_logprob"] == pytest.approx(sum(direct), abs=1e-4)
    assert result["mean_nll"] == pytest.approx(-sum(direct) / len(ans), abs=1e-5)
    args = ["score", "--model", str(root / "model"), "--prompt", "what is in the picture?", "--answer", "a red square",
            "--image", image, "--prompt-template", "vqa", "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sum_logprob"] == pytest.approx(result["sum_logprob"], abs=1e-5)


def test_commands_report_bad_input(saved, tmp_path, capsys):
    root, _, _ = saved
    assert main(["chat", "--model", str(tmp_path / "none"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["chat", "--model", str(root / "model"), "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["score", "--model", str(root / "model"), "--prompt", "x", "--answer", ""]) == 2
    assert "answer is empty" in capsys.readouterr().err


def test_export_command_round_trips_through_monkeytune(saved, tmp_path):
    root, model, _ = saved
    assert main(["export", "--model", str(root / "model"), "--to", "monkeytune", str(tmp_path / "copy")]) == 0
    a, b = read_tensors(root / "model"), read_tensors(tmp_path / "copy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The tiny preset's 56-pixel windows cannot be expressed in the official layout.
    assert main(["export", "--model", str(root / "model"), "--to", "official", str(tmp_path / "off")]) == 2


def test_infer_template_reads_the_layout_of_the_training_questions():
    from monkeytune.prompts import infer_template, user_text

    for name in ("vqa", "vqa-question-first", "caption"):
        texts = [user_text(name, q, f"images/{i}.png") for i, q in enumerate(["What colour?", "Which pattern is it?"])]
        assert infer_template(texts) == name
    assert infer_template(["<img>a.png</img> describe it"]) == "raw"
    assert infer_template(["anything"], "chatml") == "chatml"


def test_score_takes_a_prompt_written_out_in_the_template_as_the_whole_turn(saved, capsys):
    """`score --prompt "<img>a.png</img> What is it? Answer: "` must not say "Answer:" twice."""
    root, model, tok = saved
    image = str(root / "red.png")
    tpi = model.config.tokens_per_image
    for template, complete in [("vqa", f"<img>{image}</img> what is in the picture? Answer: "),
                               ("vqa", f"<img>{image}</img>what is in the picture?   Answer:"),
                               ("vqa-question-first", f"what is in the picture? <img>{image}</img> Answer: "),
                               ("caption", f"<img>{image}</img> Generate the detailed caption in English: ")]:
        question = "" if template == "caption" else "what is in the picture?"
        # The plain reference: the question and image rendered once, by the template.
        ids, _ = prompt_ids(template, tok, tpi, question, image)
        assert tok.decode(ids).count("Answer:") == (template != "caption")
        plain = score_answer(model, tok, question, "a red square", image, template=template)
        given = score_answer(model, tok, complete, "a red square", template=template)
        assert given["sum_logprob"] == plain["sum_logprob"], (template, complete)
    # The command line, with the template the folder records (none here: the vqa fallback).
    args = ["score", "--model", str(root / "model"), "--answer", "a red square", "--json", "--prompt"]
    assert main([*args, f"<img>{image}</img> what is in the picture? Answer: "]) == 0
    given = json.loads(capsys.readouterr().out)
    assert main([*args, "what is in the picture?", "--image", image]) == 0
    assert given == json.loads(capsys.readouterr().out)
    # --raw takes the text as it stands; an image named twice is refused in one line.
    assert main([*args, "what is in the picture? Answer: ", "--raw"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["sum_logprob"] == score_answer(model, tok, "what is in the picture? Answer: ", "a red square",
                                              template="raw")["sum_logprob"]
    assert main([*args, f"<img>{image}</img> what? Answer: ", "--image", image]) == 2
    assert "already names its image" in capsys.readouterr().err
