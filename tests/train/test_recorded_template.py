"""Train -> eval -> chat agree without being told: the final folder records what training used."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image

from monkeytune.cli import main
from monkeytune.generate import GenerationSettings, answer, load_for_inference
from monkeytune.model.io import read_config, save_model
from monkeytune.prompts import user_text
from monkeytune.train.loop import train

QUESTIONS = [("what colour is the square?", "red"), ("how many shapes are there?", "one"),
             ("is the square big or small?", "big")]


def _question_first_data(folder: Path) -> tuple[Path, Path]:
    """A training file written in the question-first layout, and an eval file of the same questions."""
    folder.mkdir(parents=True, exist_ok=True)
    train, evaluation = [], []
    for i, (colour, rgb) in enumerate((("red", (230, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 230)))):
        image = folder / f"{colour}.png"
        Image.new("RGB", (40, 32), rgb).save(image)
        for q, a in QUESTIONS:
            answer_text = colour if a == "red" else a
            train.append({"id": f"{colour}-{q}", "conversations": [
                {"from": "user", "value": user_text("vqa-question-first", q, image.name)},
                {"from": "assistant", "value": answer_text}]})
        evaluation.append({"image": image.name, "question": QUESTIONS[0][0], "answer": colour, "question_id": i})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluation))
    return folder / "train.jsonl", folder / "eval.jsonl"


def test_a_trained_folder_records_its_template_and_every_consumer_uses_it(make_config, synthetic, tmp_path,
                                                                           capsys, caplog):
    train_file, eval_file = _question_first_data(tmp_path / "data")
    config = tmp_path / "run.yaml"
    make_config("recorded", data={"train": str(train_file)}, checkpoint={"final_save": "full"}).save(config)
    assert main(["train", str(config), "--train.max_steps", "2"]) == 0
    final = tmp_path / "recorded" / "final"
    capsys.readouterr()

    # What training used, in the folder itself (no separate step).
    meta = read_config(final)["metadata"]
    assert meta["prompt_template"] == "vqa-question-first" and meta["chat_format"] == "monkey"
    assert meta["tokenizer"]["source"] == str(Path(synthetic[1]).resolve())
    assert meta["tokenizer"]["class"] == "SimpleTokenizer" and meta["tokenizer"]["vocab_size"] > 0

    # eval without --prompt-template prompts exactly as with the recorded template named.
    with caplog.at_level(logging.INFO, logger="monkeytune"):
        assert main(["eval", "--model", str(final), "--data", str(eval_file), "--out", str(tmp_path / "e1"),
                     "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert f"prompt template vqa-question-first, as {final} records" in caplog.text
    assert "records no prompt template" not in caplog.text
    assert main(["eval", "--model", str(final), "--data", str(eval_file), "--out", str(tmp_path / "e2"),
                 "--max-new-tokens", "3", "--device", "cpu", "--prompt-template", "vqa-question-first"]) == 0
    e1, e2 = ((tmp_path / e / "predictions.jsonl").read_text() for e in ("e1", "e2"))
    assert e1 == e2

    # chat (one prompt, and a questions file) likewise.
    caplog.clear()
    capsys.readouterr()
    image = str(tmp_path / "data" / "red.png")
    with caplog.at_level(logging.INFO, logger="monkeytune"):
        assert main(["chat", "--model", str(final), "--image", image, "--max-new-tokens", "3", "--device", "cpu",
                     QUESTIONS[0][0]]) == 0
    said = capsys.readouterr().out.strip()
    assert "prompt template vqa-question-first" in caplog.text and "records no prompt template" not in caplog.text
    model, tok = load_for_inference(final, device="cpu")
    expected = answer(model, tok, QUESTIONS[0][0], image, template="vqa-question-first",
                      settings=GenerationSettings(3))
    assert said == expected
    assert answer(model, tok, QUESTIONS[0][0], image, settings=GenerationSettings(3)) == expected  # Python too


def test_a_folder_that_records_nothing_falls_back_with_a_warning(make_config, tmp_path, caplog):
    train_file, eval_file = _question_first_data(tmp_path / "data")
    result = train(make_config("old", data={"train": str(train_file)}, train={"max_steps": 1},
                               checkpoint={"final_save": "full"}))
    # As an older version wrote it: no prompt_template.
    result.model.metadata = {}
    old = save_model(result.model, tmp_path / "old-folder", tokenizer=load_for_inference(result.final_dir)[1])
    with caplog.at_level(logging.WARNING, logger="monkeytune"):
        assert main(["eval", "--model", str(old), "--data", str(eval_file), "--out", str(tmp_path / "e"),
                     "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert f"{old} records no prompt template: prompting with the vqa layout" in caplog.text
