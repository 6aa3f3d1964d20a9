"""Tabular data as public sets ship it: parquet, arrow, shard folders and save_to_disk, with the
image bytes inside, read into the same samples as the same records in JSON Lines with image files."""

from __future__ import annotations

import io
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from monkeytune.data import DataError, load_samples
from monkeytune.data.dataset import ConversationDataset

from .conftest import assert_same_items

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (230, 200, 40)]


def png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def llava_rows():
    """Four LLaVA records: one image each but the third, which is text-only."""
    rows = []
    for i, colour in enumerate(COLOURS):
        question = "What colour?" if i != 2 else "Two plus two?"
        rows.append({"id": f"r{i}", "image": {"bytes": png(colour), "path": None} if i != 2 else None,
                     "conversations": [{"from": "human", "value": ("<image>\n" if i != 2 else "") + question},
                                       {"from": "gpt", "value": f"answer {i}"}]})
    return rows


def as_jsonl(rows, folder):
    """The same records in JSON Lines, each embedded image written to a file it names."""
    lines = []
    for i, row in enumerate(rows):
        row = dict(row)
        for column in ("image", "images"):
            value = row.get(column)
            if value is None:
                row.pop(column, None)
                continue
            cells = value if isinstance(value, list) else [value]
            paths = []
            for k, cell in enumerate(cells):
                path = folder / f"img{i}_{k}.png"
                path.write_bytes(cell["bytes"])
                paths.append(path.name)
            row[column] = paths if isinstance(value, list) else paths[0]
        lines.append(json.dumps(row))
    out = folder / "records.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def table(rows, image_column="image", listed=False):
    features = None
    probe = next(r[image_column] for r in rows if r.get(image_column) is not None)
    ds = datasets.Dataset.from_list(rows)
    image = datasets.Image()
    features = ds.features.copy()
    features[image_column] = datasets.Sequence(image) if listed or isinstance(probe, list) else image
    return ds.cast(features)


def write(ds, kind, folder):
    if kind == "parquet":
        path = folder / "train.parquet"
        ds.to_parquet(str(path))
    elif kind == "shards":
        path = folder / "shards"
        path.mkdir()
        half = len(ds) // 2
        ds.select(range(half)).to_parquet(str(path / "part-00000.parquet"))
        ds.select(range(half, len(ds))).to_parquet(str(path / "part-00001.parquet"))
    elif kind == "arrow":
        path = folder / "train.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
    else:
        path = folder / "saved"
        ds.save_to_disk(str(path))
    return path


def items(data, tok, cfg):
    ds = ConversationDataset(data, tok, cfg, max_length=512)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("kind", ["parquet", "shards", "arrow", "save_to_disk"])
def test_tables_with_embedded_images_give_the_jsonl_items(kind, tmp_path, tok, cfg):
    rows = llava_rows()
    path = write(table(rows), kind, tmp_path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    reference = items(as_jsonl(rows, tmp_path), tok, cfg)
    got = items(path, tok, cfg)
    assert_same_items(got, reference)
    assert [x["num_images"] for x in got] == [1, 1, 0, 1]
    assert (sorted(path.rglob("*")) if path.is_dir() else [path]) == files  # nothing written beside the data


def test_image_lists_and_the_chat_layout_of_datasets(tmp_path, tok, cfg):
    # sharegpt: <image> placeholders take the images list; openai (the layout of datasets and
    # TRL): bare {"type": "image"} parts take it, with the unified schema's null keys.
    pair = [{"bytes": png(COLOURS[0]), "path": None}, {"bytes": png(COLOURS[1]), "path": None}]
    sharegpt = [{"id": "s", "images": pair, "messages": [
        {"role": "user", "content": "<image><image>Which two?"}, {"role": "assistant", "content": "red, green"}]}]
    chat = [{"id": "s", "images": pair, "messages": [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                     {"type": "text", "text": "Which two?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red, green"}]}]}]
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    from_sharegpt = items(write(table(sharegpt, "images"), "parquet", a), tok, cfg)
    from_chat = items(write(table(chat, "images"), "parquet", b), tok, cfg)
    reference = items(as_jsonl(sharegpt, tmp_path), tok, cfg)
    assert_same_items(from_sharegpt, reference)
    assert from_chat[0]["num_images"] == 2
    assert torch.equal(from_chat[0]["pixel_values"], reference[0]["pixel_values"])


def test_bad_rows_are_named_by_file_row_and_field(tmp_path, tok, cfg):
    rows = llava_rows()
    rows[1]["image"] = {"bytes": b"not an image", "path": None}
    rows[3]["conversations"][1]["from"] = "robot"
    path = write(table(rows), "parquet", tmp_path)
    errors = []
    samples = load_samples(path, errors)
    assert [s.index for s in samples] == [0, 1, 2]
    (bad_role,) = errors
    assert bad_role.describe().startswith(f"{path} (record 3): conversations[1].from: unknown role 'robot'")
    ds = ConversationDataset(path, tok, cfg, max_length=512, strict=False)
    with pytest.raises(DataError) as info:
        ds[1]
    assert info.value.describe().startswith(f"{path} (record 1): image: image train.parquet row 1, image")
    assert "not a recognised image" in str(info.value)
    assert ds.image_errors(0, decode=True) == []


def test_a_missing_turns_column_and_an_unreadable_table_are_one_line_errors(tmp_path):
    ds = datasets.Dataset.from_list([{"id": "x", "text": "hello"}])
    path = write(ds, "parquet", tmp_path)
    with pytest.raises(DataError, match=r"train.parquet \(record 0\): .*conversations"):
        load_samples(path, format="llava")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read it as a table"):
        load_samples(broken)


def test_convert_packages_any_input_as_parquet_and_reads_it_back(tmp_path, tok, cfg, capsys):
    from monkeytune.cli import main

    rows = llava_rows()
    jsonl = as_jsonl(rows, tmp_path)  # image files on disk
    out = tmp_path / "packaged" / "train.parquet"
    assert main(["data", "convert", str(jsonl), str(out)]) == 0
    assert "read as llava; wrote 4 records" in capsys.readouterr().out
    reference = items(jsonl, tok, cfg)
    for image in tmp_path.glob("img*.png"):
        image.unlink()  # the parquet holds its own copies
    got = items(out, tok, cfg)
    assert [x["num_images"] for x in got] == [1, 1, 0, 1]
    assert_same_items(got, reference)
    # And a table converts back to JSON Lines with its images written as files.
    back = tmp_path / "back.jsonl"
    assert main(["data", "convert", str(out), str(back)]) == 0
    assert len(list((tmp_path / "back_images").iterdir())) == 3
    assert_same_items(items(back, tok, cfg), got)


def test_convert_writes_a_folder_of_shards_that_reads_back(tmp_path, tok, cfg, capsys, monkeypatch):
    from monkeytune.cli import main
    from monkeytune.data import convert

    monkeypatch.setattr(convert, "ROWS_PER_GROUP", 1)  # a row group per record, a shard per group
    rows = llava_rows()
    jsonl = as_jsonl(rows, tmp_path)
    out = tmp_path / "packaged"
    assert main(["data", "convert", str(jsonl), f"{out}/", "--shard-mb", "0.000001"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"train-{k:05d}-of-00004.parquet" for k in range(4)]
    assert_same_items(items(out, tok, cfg), items(jsonl, tok, cfg))
    assert main(["data", "convert", str(jsonl), f"{tmp_path}/other/", "--shard-mb", "0"]) == 2
    assert "shard size must be above 0 MB" in capsys.readouterr().out


def test_rows_read_in_batches_equal_rows_read_alone(tmp_path, monkeypatch):
    # Record batches of 3 rows over two shards: list cells that are null or empty, structs
    # without bytes (a path), and plain path strings keep their places across batch edges.
    from monkeytune.data import tables
    from monkeytune.data.reading import iter_spans

    monkeypatch.setattr(tables, "BATCH_ROWS", 3)
    cells = [[{"bytes": png(COLOURS[k % 4]), "path": None}] * (k % 3) if k % 4 != 3 else None for k in range(10)]
    cells[4] = [{"bytes": None, "path": "elsewhere.png"}, {"bytes": png(COLOURS[0]), "path": None}]
    rows = [{"id": f"r{k}", "images": cell, "messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}
            for k, cell in enumerate(cells)]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turns = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("id", pa.string()), ("images", pa.list_(image)), ("messages", turns)])
    path = tmp_path / "shards"
    path.mkdir()
    for name, part in (("a", rows[:5]), ("b", rows[5:])):  # pyarrow: datasets would open the path
        pq.write_table(pa.Table.from_pylist(part, schema), path / f"part-{name}.parquet")
    got = [obj for _, _, obj, _ in iter_spans(path)]
    assert got == [tables.table_record(path, k) for k in range(10)]
    key = str(path.absolute())
    assert got[3]["images"] is None and got[0]["images"] == []
    assert got[4]["images"] == ["elsewhere.png", f"table:{key}#4/images/1"]
    assert got[7]["images"] is None and got[8]["images"] == [f"table:{key}#8/images/{i}" for i in range(2)]
    assert tables.embedded_bytes(got[8]["images"][1]) == png(COLOURS[0])
    plain = write(datasets.Dataset.from_list([{"id": "p", "image": "a.png", "conversations": []}]), "parquet",
                  tmp_path)
    assert tables.table_record(plain, 0)["image"] == "a.png" == next(iter_spans(plain))[2]["image"]
