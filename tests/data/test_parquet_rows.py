"""Parquet read in order straight from the files: the start-up pass converts and maps nothing, and
gives what the rows read out of order (from the arrow copy) give."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from monkeytune.data import DataError, parquet_rows, tables
from monkeytune.data.dataset import ConversationDataset

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURNS = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA = pa.schema([("id", pa.string()), ("images", pa.list_(IMAGE)), ("messages", TURNS)])


def png(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), (40 * k, 200 - 30 * k, 90)).save(buf, format="PNG")
    return buf.getvalue()


def rows(n: int) -> list[dict]:
    return [{"id": f"r{k}", "images": [{"bytes": png(k % 5), "path": None}] if k % 4 else [],
             "messages": [{"role": "user", "content": ("<image>" if k % 4 else "") + f"question {k}"},
                          {"role": "assistant", "content": f"answer {k}"}]} for k in range(n)]


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """Two parquet shards of 7 and 6 rows, read in batches of 3 rows, by a fresh process."""
    for module, name in ((tables, "_OPEN"), (tables, "_CHUNKS"), (tables, "_PLANS"), (parquet_rows, "_CURSORS")):
        monkeypatch.setattr(module, name, {})
    monkeypatch.setattr(tables, "BATCH_ROWS", 3)
    folder = tmp_path / "shards"
    folder.mkdir()
    data = rows(13)
    pq.write_table(pa.Table.from_pylist(data[:7], SCHEMA), folder / "part-0.parquet", row_group_size=4)
    pq.write_table(pa.Table.from_pylist(data[7:], SCHEMA), folder / "part-1.parquet")
    return folder


def test_rows_and_images_in_order_equal_those_read_out_of_order(shards):
    key = str(shards.absolute())
    in_order = [obj for _, _, obj in tables.iter_table_records(shards)]
    assert key not in tables._OPEN  # nothing converted, nothing mapped
    alone, got = [], []
    for k in range(13):  # as scan_all asks: each row, then its images (the cursor of row 0 onward)
        alone.append(tables.table_record(shards, k))
        got += [tables.embedded_bytes(ref) for ref in alone[-1]["images"]]
    assert key not in tables._OPEN and len(got) == 9
    refs = [ref for record in in_order for ref in record["images"]]
    backwards = [tables.table_record(shards, k) for k in reversed(range(13))][::-1]
    assert key in tables._OPEN  # rows behind the cursor: read from the arrow copy
    assert in_order == alone == backwards == [{**r, "images": r["images"] and [
        f"table:{key}#{k}/images/0"]} for k, r in enumerate(rows(13))]
    assert got == [tables.embedded_bytes(ref) for ref in reversed(refs)][::-1]
    assert got == [png(k % 5) for k in range(13) if k % 4]


def test_the_cursor_serves_its_batch_and_the_next_only(shards):
    key = str(shards.absolute())
    assert parquet_rows.row_in_order(key, 4, 3) is None  # no cursor: only row 0 starts one
    assert parquet_rows.row_in_order(key, 0, 3).column("id")[0].as_py() == "r0"
    assert parquet_rows.row_in_order(key, 2, 3).column("id")[0].as_py() == "r2"
    assert parquet_rows.row_in_order(key, 4, 3).column("id")[0].as_py() == "r4"  # the next batch
    assert parquet_rows.row_in_order(key, 1, 3) is None  # behind it
    assert parquet_rows.row_in_order(key, 12, 3) is None  # far ahead: random access
    assert [len(b) for _, b in parquet_rows.batches(key, parquet_rows.parquet_files(key), 3)] == [3, 3, 1, 3, 3]


def test_batches_hold_a_bounded_number_of_bytes(shards, monkeypatch):
    monkeypatch.setattr(parquet_rows, "BATCH_BYTES", 1)  # a row is more: one row a batch
    key = str(shards.absolute())
    assert [len(b) for _, b in parquet_rows.batches(key, parquet_rows.parquet_files(key), 3)] == [1] * 13


def test_a_shard_with_other_columns_is_named(shards):
    pq.write_table(pa.table({"id": ["x"], "text": ["hello"]}), shards / "part-2.parquet")
    with pytest.raises(DataError, match=r"part-2.parquet: its columns \(id, text\) differ"):
        list(tables.iter_table_records(shards))


def test_the_start_up_pass_over_parquet_opens_no_arrow_copy(shards, tok, cfg):
    # Scanning while reading (training) and scanning afterwards (scan_all) both read the files.
    key = str(shards.absolute())
    for scan in (True, False):
        ds = ConversationDataset(shards, tok, cfg, max_length=512, scan=scan)
        assert ds.scan_all() == {} and len(ds) == 13
        assert key not in tables._OPEN
    first = ds[0]
    assert ds[5]["num_images"] == 1 and first["num_images"] == 0


def test_the_arrow_copy_is_written_once_in_few_batches_and_follows_the_files(shards, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    key = str(shards.absolute())
    files = parquet_rows.parquet_files(key)
    copy = parquet_rows.arrow_copy(key, files)
    (written,) = (tmp_path / "hf" / parquet_rows.COPY_FOLDER).glob("*.arrow")
    assert copy.with_format("arrow")[:].to_pylist() == rows(13)
    assert len(copy.with_format("arrow")[:].to_batches()) == 2  # a batch a shard, not 100 rows each
    assert parquet_rows.arrow_copy(key, files).cache_files[0]["filename"] == str(written)  # found again
    pq.write_table(pa.Table.from_pylist(rows(3), SCHEMA), shards / "part-1.parquet")
    assert len(parquet_rows.arrow_copy(key, files)) == 10  # a changed shard: a new copy
