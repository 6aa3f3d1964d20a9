"""Per-request limits: prompts longer than the model can take, and a time limit with cancellation.

The same limits apply in the page, ``chat``, ``score`` and ``eval``.
"""

from __future__ import annotations

import itertools
import json

import pytest

from monkeytune.cli import main
from monkeytune.limits import GenerationTimeout, PromptTooLongError, longest_token_chars
from monkeytune.serve.engine import ChatEngine, Exchange, settings_from_form

from .conftest import parrot

GREEDY = settings_from_form(32, False, 0.7, 0.9)
HUGE = "why " * 500_000  # 2,000,000 characters


def test_a_huge_question_is_refused_from_its_length_before_tokenizing(engine, monkeypatch):
    longest_token_chars(engine.tokenizer)  # computed once per tokenizer, from the vocabulary

    def no_tokenizing(text):
        raise AssertionError("the huge question was tokenized")

    monkeypatch.setattr(engine.tokenizer, "encode", no_tokenizing)
    with pytest.raises(PromptTooLongError, match=r"^the prompt is 2,000,000 characters long, more than this model "
                                                 r"can take: at most 4,064 tokens \(4,096 positions minus 32 new "
                                                 r"tokens\)"):
        list(engine.stream([Exchange(HUGE)], "vqa", GREEDY))


def test_a_question_just_too_long_in_tokens_is_refused_after_tokenizing(engine):
    budget = engine.model.config.llm.max_position_embeddings - 2048
    question = "left " * budget  # under the raw bound, over the token budget
    with pytest.raises(PromptTooLongError, match=r"^the prompt is [\d,]+ tokens \(images and template included\), "
                                                 r"more than this model can take: at most 2,048 tokens"):
        engine.prompt([Exchange(question)], "vqa", max_new_tokens=2048)
    # The same question fits when fewer new tokens are asked for.
    ids, _ = engine.prompt([Exchange("left " * 100)], "vqa", max_new_tokens=2048)
    assert len(ids) < budget


def fake_clock(monkeypatch, step=1.0):
    """Every reading of the clock the time limit uses advances it by ``step`` seconds."""
    ticks = itertools.count()
    monkeypatch.setattr("monkeytune.limits.time.monotonic", lambda: next(ticks) * step)


def test_the_time_limit_stops_an_endless_answer_and_frees_the_model(picture, monkeypatch):
    engine = ChatEngine(*parrot(loop=True), name="endless", time_limit_s=5)
    fake_clock(monkeypatch)
    pieces = []
    with pytest.raises(GenerationTimeout, match=r"^the answer was stopped after 5 s, the time limit per request$"):
        for text in engine.stream([Exchange("go on", str(picture))], "vqa", settings_from_form(2048, False, 1, 1)):
            pieces.append(text)
    assert pieces and len(engine.tokenizer.encode(pieces[-1])) < 20  # stopped after a few tokens, not 2048
    assert not engine._lock.locked()
    monkeypatch.undo()
    assert engine.answer([Exchange("again", str(picture))], "vqa", settings_from_form(3, False, 1, 1))


def test_chat_score_and_eval_apply_the_same_limits(parrot_dir, picture, tmp_path, capsys, monkeypatch):
    assert main(["chat", "--model", str(parrot_dir), HUGE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monkeytune chat: the prompt is 2,000,000 characters long") and err.count("\n") == 1

    assert main(["score", "--model", str(parrot_dir), "--prompt", HUGE, "--answer", "red"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monkeytune score: the prompt with its answer is 2,000,003 characters long")

    data = tmp_path / "eval.jsonl"
    rows = [{"question_id": 1, "image": str(picture), "question": "what?", "answer": "red"},
            {"question_id": 2, "image": str(picture), "question": HUGE, "answer": "red"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--model", str(parrot_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "monkeytune eval: record 2 (question_id 2): the prompt is 2,000,000 characters long" in err

    fake_clock(monkeypatch)
    endless = tmp_path / "endless"
    from monkeytune.model.io import save_model

    model, tok = parrot(loop=True)
    save_model(model, endless, tokenizer=tok)
    assert main(["chat", "--model", str(endless), "--max-new-tokens", "2048", "--time-limit", "5", "go on"]) == 2
    captured = capsys.readouterr()
    assert captured.out.strip()  # the text so far was streamed
    assert captured.err == "monkeytune chat: the answer was stopped after 5 s, the time limit per request\n"
