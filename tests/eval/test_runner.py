"""Batched evaluation: reading Monkey-format files, predictions, scoring, and the eval command."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from monkeytune.cli import main
from monkeytune.config import get_config
from monkeytune.eval.metrics import compute_metrics
from monkeytune.eval.runner import EvalDataError, evaluate, read_eval_records, read_predictions
from monkeytune.model import build_model
from monkeytune.model.io import save_model
from monkeytune.tokenizer.simple import SimpleTokenizer

TEXTS = ["what colour is the square? Answer: red", "how many boxes are there? Answer: two",
         "is it a cat or a dog? Answer: a cat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = SimpleTokenizer.train(TEXTS * 3, vocab_size=320)
    cfg = get_config("tiny").matched_to_tokenizer(tok)
    cfg.vision = dataclasses.replace(cfg.vision, layers=1, n_queries=16)
    cfg.image = dataclasses.replace(cfg.image, window_size=56)
    cfg.llm = dataclasses.replace(cfg.llm, num_layers=1)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    save_model(model, root / "model", tokenizer=tok)
    (root / "data" / "img").mkdir(parents=True)
    for name, colour, size in (("a", (250, 0, 0), (40, 30)), ("b", (0, 200, 0), (64, 64)), ("c", (0, 0, 255), (20, 50))):
        Image.new("RGB", size, colour).save(root / "data" / "img" / f"{name}.png")
    records = [
        {"image": "img/a.png", "question": "what colour is the square?", "answer": ["red", "red", "dark red"], "question_id": 1},
        {"image": "img/b.png", "question": "how many boxes?", "answer": "two", "question_id": 2},
        {"image": "img/c.png", "question": "is it a cat or a dog, or perhaps something else entirely?", "answer": "a cat",
         "question_id": "q3"},
    ]
    data = root / "data" / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, model, tok, data


def test_records_resolve_images_against_the_data_file(setup):
    root, _, _, data = setup
    recs = read_eval_records(data)
    assert [r["question_id"] for r in recs] == [1, 2, "q3"]
    assert recs[0]["image"] == str(root / "data" / "img" / "a.png")


def test_batched_predictions_equal_one_at_a_time(setup):
    _, model, tok, data = setup
    recs = read_eval_records(data)
    seen = []
    batched, scores = evaluate(model, tok, recs, ["exact_match", "vqa_score"], batch_size=3, max_new_tokens=5,
                               progress=lambda done, total: seen.append((done, total)))
    single, _ = evaluate(model, tok, recs, ["exact_match"], batch_size=1, max_new_tokens=5)
    assert [p["prediction"] for p in batched] == [p["prediction"] for p in single]
    assert all(p["prediction"] for p in batched)  # real text, so the comparison means something
    assert seen == [(3, 3)]
    assert scores == compute_metrics(["exact_match", "vqa_score"], [p["prediction"] for p in batched],
                                     [r["answer"] for r in recs])


def test_eval_command_end_to_end_and_predictions_rescoring(setup, tmp_path, capsys):
    root, _, _, data = setup
    out = tmp_path / "out"
    args = ["eval", "--model", str(root / "model"), "--data", str(data), "--batch-size", "2", "--max-new-tokens", "4",
            "--metric", "exact_match", "--metric", "anls", "--out", str(out)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["question_id"] for p in lines] == [1, 2, "q3"] and all(isinstance(p["prediction"], str) for p in lines)
    assert json.loads((out / "metrics.json").read_text()) == printed
    assert set(printed) == {"exact_match", "anls"}
    # Rescoring the written predictions without a model gives the same numbers.
    assert main(["eval", "--predictions", str(out / "predictions.jsonl"), "--metric", "exact_match", "--metric", "anls"]) == 0
    assert json.loads(capsys.readouterr().out) == printed


def test_predictions_in_both_layouts(tmp_path):
    ours = tmp_path / "ours.jsonl"
    ours.write_text('{"prediction": "Red", "answer": ["red", "crimson"]}\n{"prediction": "3", "answer": "two"}\n')
    official = tmp_path / "official.jsonl"
    official.write_text('{"answer": "Red", "annotation": ["red"]}\n{"answer": "two", "annotation": "two"}\n')
    assert compute_metrics(["exact_match"], *read_predictions(ours)) == {"exact_match": 0.5}
    assert compute_metrics(["exact_match"], *read_predictions(official)) == {"exact_match": 1.0}


def test_bad_records_name_file_line_and_field(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n\n{"question": 3}\n')
    with pytest.raises(EvalDataError, match=r"d\.jsonl:3: field 'question'"):
        read_eval_records(data)
    data.write_text('{"question": "q", "image": "nope.png"}\n')
    with pytest.raises(EvalDataError, match=r"d\.jsonl:1: field 'image': file .*nope\.png not found"):
        read_eval_records(data)
    data.write_text('{"question": "q"}\n{oops\n')
    with pytest.raises(EvalDataError, match=r"d\.jsonl:2: invalid JSON"):
        read_eval_records(data)
    data.write_text('{"question": "q", "answer": []}\n')
    with pytest.raises(EvalDataError, match=r"d\.jsonl:1: field 'answer'"):
        read_eval_records(data)
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"prediction": "x", "answer": "x"}\n{"guess": "y"}\n')
    assert main(["eval", "--predictions", str(preds)]) == 2
    assert "p.jsonl:2" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(preds), "--metric", "bleu"]) == 2
    assert "unknown metric" in capsys.readouterr().err
