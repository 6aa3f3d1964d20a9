"""``data.columns`` (the data's own field names) for tables and JSON alike, and the_cauldron's
``images`` + ``texts`` layout, read into the items of the same records in the project's layout."""

from __future__ import annotations

import io
import json

import datasets
import pytest
import torch
from PIL import Image

from monkeytune.cli import main
from monkeytune.data import DataError, load_samples
from monkeytune.data.dataset import ConversationDataset

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210)]


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def image_table(rows, column):
    ds = datasets.Dataset.from_list(rows)
    features = ds.features.copy()
    features[column] = datasets.Sequence(datasets.Image())
    return ds.cast(features)


def items(path, tok, cfg, **kw):
    ds = ConversationDataset(path, tok, cfg, max_length=512, **kw)
    return [ds[i] for i in range(len(ds))]


def assert_same_items(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["num_images"] == y["num_images"]
        for key in ("input_ids", "labels", "pixel_values", "view_slots"):
            assert torch.equal(x[key], y[key]), key


def sharegpt_reference(tmp_path, records):
    """The records in the project's sharegpt layout, their images as files (``(colour index, ...)``)."""
    lines = []
    for i, (messages, colours) in enumerate(records):
        names = []
        for k, c in enumerate(colours):
            (tmp_path / f"ref{i}_{k}.png").write_bytes(png(COLOURS[c]))
            names.append(f"ref{i}_{k}.png")
        lines.append(json.dumps({"id": f"r{i}", "messages": messages, "images": names}))
    (tmp_path / "reference.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "reference.jsonl"


def chat(*texts):
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]


RECORDS = [(chat("<image>What colour?", "red"), [0]), (chat("Hi?", "hello"), []),
           (chat("<image><image>Which two?", "green, blue", "Sure?", "yes"), [1, 2])]


def test_a_column_mapping_reads_tables_and_json_alike(tmp_path, tok, cfg):
    reference = items(sharegpt_reference(tmp_path, RECORDS), tok, cfg)
    rows, lines = [], []
    for i, (messages, colours) in enumerate(RECORDS):
        rows.append({"qid": f"r{i}", "dialog": messages, "pics": [{"bytes": png(COLOURS[c]), "path": None}
                                                                  for c in colours]})
        lines.append(json.dumps({"qid": f"r{i}", "dialog": messages,
                                 "pics": [f"ref{i}_{k}.png" for k in range(len(colours))]}))
    image_table(rows, "pics").to_parquet(str(tmp_path / "mapped.parquet"))
    (tmp_path / "mapped.jsonl").write_text("\n".join(lines) + "\n")
    columns = {"messages": "dialog", "images": "pics", "id": "qid"}
    from_table = items(tmp_path / "mapped.parquet", tok, cfg, columns=columns)
    assert_same_items(from_table, reference)
    assert [x["id"] for x in from_table] == ["r0", "r1", "r2"]
    assert_same_items(items(tmp_path / "mapped.jsonl", tok, cfg, columns=columns), reference)
    # Errors name the data's own fields.
    errors = []
    load_samples(tmp_path / "mapped.jsonl", errors, columns={"messages": "dialog", "images": "photos"})
    assert str(errors[0]).startswith(f"{tmp_path / 'mapped.jsonl'}:1 (record 0): dialog[0].content: "
                                     "<image> placeholder number 1 has no image")


def test_a_mapping_to_a_column_the_table_lacks_is_one_line(tmp_path, tok, cfg, capsys):
    path = tmp_path / "t.parquet"
    datasets.Dataset.from_list([{"dialog": chat("q", "a")}]).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        load_samples(path, columns={"messages": "dialog", "images": "pics"})
    assert str(info.value) == (f"{path}: data.columns maps images to the column 'pics', which the table lacks "
                               "(its columns: dialog)")
    # The command line takes the mapping too, and says what it found.
    assert main(["data", "check", str(path), "--config", "tiny", "--columns", "{messages: dialog}"]) == 0
    assert "format:   sharegpt (t.parquet)" in capsys.readouterr().out
    assert main(["data", "check", str(path), "--config", "tiny", "--columns", "{message: dialog}"]) == 2
    assert "error: data.columns: unknown field 'message'" in capsys.readouterr().out


@pytest.mark.parametrize("stored", ["list of pairs", "dict of lists"])
def test_the_cauldron_layout_reads_as_sharegpt(stored, tmp_path, tok, cfg):
    # images + texts [{user, assistant, source}], no placeholder: the images open the first user turn.
    reference = items(sharegpt_reference(tmp_path, RECORDS), tok, cfg)
    rows = []
    for messages, colours in RECORDS:
        pairs = [{"user": messages[k]["content"].replace("<image>", ""), "assistant": messages[k + 1]["content"],
                  "source": "test"} for k in range(0, len(messages), 2)]
        if stored == "dict of lists":  # how datasets gives a Sequence of a dict
            pairs = {k: [p[k] for p in pairs] for k in ("user", "assistant", "source")}
        rows.append({"images": [{"bytes": png(COLOURS[c]), "path": None} for c in colours], "texts": pairs})
    image_table(rows, "images").to_parquet(str(tmp_path / "cauldron.parquet"))
    assert_same_items(items(tmp_path / "cauldron.parquet", tok, cfg), reference)


def test_cauldron_errors_name_the_pair(tmp_path):
    lines = [{"images": [], "texts": [{"user": "q", "assistant": "a"}, {"user": "q2", "assistant": ""}]},
             {"images": [], "texts": [{"user": "q", "assistant": 3}]},
             {"images": ["x.png"], "texts": []}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    errors = []
    assert load_samples(path, errors) == []
    assert [e.describe().split(": ", 2)[1:] for e in errors] == [
        ["texts[1].assistant", "empty answer: it would teach the model to stop at once (data.allow_empty_answers: "
         "true, or data check --allow-empty-answers, accepts it)"],
        ["texts[0].assistant", "must be a string, got int"],
        ["texts", "must be a non-empty list of {user, assistant} pairs, got an empty list"],
    ]


def test_the_training_config_checks_the_mapping():
    from monkeytune.train.config import ConfigError, TrainConfig, validate

    cfg = TrainConfig()
    cfg.model.preset, cfg.data.train = "tiny", ["train.parquet"]
    cfg.data.columns = {"messages": "dialog", "images": "pics"}
    validate(cfg)
    for columns, message in (({"message": "dialog"}, "unknown field 'message'"),
                             ({"images": "x", "image": "x"}, "two fields are mapped to the same column"),
                             ({"images": 3}, "images: the column must be a non-empty string")):
        cfg.data.columns = columns
        with pytest.raises(ConfigError, match=f"config: data.columns: {message}"):
            validate(cfg)
