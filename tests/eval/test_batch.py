"""``monkeytune chat --questions``: a JSONL of questions answered in batches, bad lines named."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from monkeytune.cli import main
from monkeytune.config import get_config
from monkeytune.eval.batch import read_questions
from monkeytune.generate import GenerationSettings, answer, load_for_inference
from monkeytune.model import build_model
from monkeytune.model.io import save_model
from monkeytune.tokenizer.simple import SimpleTokenizer

TEXTS = ["what colour is the square? Answer: red", "how many boxes are there? Answer: two",
         "is it a cat or a dog? Answer: a cat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    tok = SimpleTokenizer.train(TEXTS * 3, vocab_size=320)
    cfg = get_config("tiny").matched_to_tokenizer(tok)
    cfg.vision = dataclasses.replace(cfg.vision, layers=1, n_queries=16)
    cfg.image = dataclasses.replace(cfg.image, window_size=56)
    cfg.llm = dataclasses.replace(cfg.llm, num_layers=1)
    torch.manual_seed(2)
    # The folder records a non-default layout: batch answers must use it unasked.
    save_model(build_model(cfg).eval(), root / "model", tokenizer=tok,
               metadata={"chat_format": "monkey", "prompt_template": "vqa-question-first"})
    (root / "q" / "img").mkdir(parents=True)
    for name, colour in (("a", (250, 0, 0)), ("b", (0, 200, 0))):
        Image.new("RGB", (40, 30), colour).save(root / "q" / "img" / f"{name}.png")
    rows = [
        {"image": "img/a.png", "question": "what colour is the square?", "question_id": "x1", "source": "set-1"},
        {"image": "img/b.png", "question": "how many boxes are there?"},
        {"question": "is it a cat or a dog?", "question_id": 7},
    ]
    questions = root / "q" / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, questions, rows


def test_batch_answers_keep_the_records_and_match_single_answers(setup, tmp_path, capsys):
    root, questions, rows = setup
    out = tmp_path / "out" / "answers.jsonl"
    rc = main(["chat", "--model", str(root / "model"), "--questions", str(questions), "--answers", str(out),
               "--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "answered 3 questions" in capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    # Same fields as written (image as given, extra fields kept), question_id filled in from the line.
    assert [{k: v for k, v in g.items() if k != "answer"} for g in got] == [
        rows[0], {**rows[1], "question_id": 2}, rows[2]]
    assert all(isinstance(g["answer"], str) for g in got)
    # Batched, left-padded generation under the recorded template equals one question at a time.
    model, tok = load_for_inference(root / "model", device="cpu")
    single = [answer(model, tok, r["question"], str(root / "q" / r["image"]) if "image" in r else None,
                     template="vqa-question-first", settings=GenerationSettings(4)) for r in rows]
    assert [g["answer"] for g in got] == single
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.parametrize("line, where, message", [
    ('{"question": "ok?"}\nnot json\n', ":2 (record 1)", "invalid JSON"),
    ('{"image": "img/a.png"}\n', ":1 (record 0): question:", "must be a string, got None"),
    ('{"question": "q", "image": "img/nope.png"}\n', ":1 (record 0): image:", "nope.png not found"),
    ('{"question": "q", "image": 3}\n', ":1 (record 0): image:", "must be a non-empty string path"),
    ('{"question": "a", "question_id": 5}\n{"question": "b", "question_id": 5}\n', ":2 (record 1): question_id:",
     "5 was already used on line 1"),
    ('{"question": "q", "answer": "red"}\n', ":1 (record 0): answer:", "is where the generated answer goes"),
    ('["q1", "q2"]\n', ":1 (record 0)", "expected a JSON object"),
])
def test_a_bad_questions_line_is_one_line_naming_file_line_and_field(setup, tmp_path, capsys, line, where, message):
    root, _, _ = setup
    bad = root / "q" / f"bad-{abs(hash(line))}.jsonl"
    bad.write_text(line)
    out = tmp_path / "answers.jsonl"
    # The file is checked before any model is loaded: this folder does not even exist.
    rc = main(["chat", "--model", str(tmp_path / "no-model"), "--questions", str(bad), "--answers", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"monkeytune chat: {bad}{where}") and message in err and "\n" not in err, err
    assert not out.exists()


def test_batch_flags_go_together(setup, tmp_path, capsys):
    root, questions, _ = setup
    model = str(root / "model")
    assert main(["chat", "--model", model, "--questions", str(questions)]) == 2
    assert "--questions needs --answers FILE" in capsys.readouterr().err
    assert main(["chat", "--model", model, "--questions", str(questions), "--answers", str(tmp_path / "a"),
                 "what?"]) == 2
    assert main(["chat", "--model", model, "--answers", str(tmp_path / "a")]) == 2
    assert "--answers goes with --questions" in capsys.readouterr().err


def test_read_questions_resolves_images_against_the_file(setup):
    root, questions, _ = setup
    recs = read_questions(questions)
    assert [r["question_id"] for r in recs] == ["x1", 2, 7]
    assert recs[0]["image"] == str(root / "q" / "img" / "a.png") and recs[2]["image"] is None
