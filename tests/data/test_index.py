"""The start-up pass saved beside the data: a second run loads it instead of reading every record."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from monkeytune.data import ConversationDataset, SkipBadSamples
from monkeytune.data.errors import MISSING_IMAGE, TOO_LONG, DataError
from monkeytune.data.index import CACHE_FOLDER

from .conftest import make_image, write_jsonl


def _records(tmp_path, n=12):
    make_image(tmp_path / "img" / "a.png")
    out = []
    for i in range(n):
        question = f"<img>img/a.png</img> question {i}" if i % 3 else f"text only {i}"
        out.append({"id": str(i), "conversations": [{"from": "user", "value": question},
                                                     {"from": "assistant", "value": "answer " * (1 + i % 4)}]})
    return out


def _dataset(path, tok, cfg, **kw):
    kw.setdefault("max_length", 200)
    return ConversationDataset(path, tok, cfg, cache=True, **kw)


def _items_equal(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], (i, k)


def test_a_second_run_loads_the_index_and_gives_the_same_samples(tmp_path, tok, cfg):
    data = write_jsonl(tmp_path / "d.jsonl", _records(tmp_path))
    first = _dataset(data, tok, cfg)
    assert first.scan_all() == {}
    saved = list((tmp_path / CACHE_FOLDER).iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("d.jsonl-")

    second = _dataset(data, tok, cfg)
    plain = ConversationDataset(data, tok, cfg, max_length=200)
    plain.scan_all()
    assert second.lengths() == plain.lengths() and second.formats == plain.formats
    _items_equal(second, plain)

    # The images were checked when the index was built, not again: a run that loads it meets a
    # missing image when its sample is loaded, named as ever.
    (tmp_path / "img" / "a.png").unlink()
    third = _dataset(data, tok, cfg)
    assert third.scan_all() == {}
    with pytest.raises(DataError) as e:
        third[1]
    assert e.value.kind == MISSING_IMAGE and e.value.line == 2


def test_the_key_follows_the_content_and_the_settings(tmp_path, tok, cfg):
    records = _records(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    _dataset(data, tok, cfg).scan_all()
    _dataset(data, tok, cfg, max_length=300).scan_all()  # another setting: another index
    assert len(list((tmp_path / CACHE_FOLDER).iterdir())) == 2

    # Same size, other content: read afresh, never the old places.
    records[0]["conversations"][1]["value"], records[1]["conversations"][1]["value"] = "yes", "no!"
    write_jsonl(data, records)
    ds = _dataset(data, tok, cfg)
    ds.scan_all()
    assert ds.samples[0].turns[1].parts == ["yes"]
    assert len(list((tmp_path / CACHE_FOLDER).iterdir())) == 3

    off = ConversationDataset(data, tok, cfg, max_length=200)
    off.scan_all()
    assert len(list((tmp_path / CACHE_FOLDER).iterdir())) == 3  # cache off: nothing written


def test_problems_found_by_the_scan_are_saved_for_skip_and_error_runs(tmp_path, tok, cfg, caplog):
    records = _records(tmp_path)
    records[4]["conversations"][1]["value"] = "long " * 100  # over max_length 200
    data = write_jsonl(tmp_path / "d.jsonl", records, raw_lines={8: "{not json"})

    def skipping(report):
        ds = _dataset(data, tok, cfg, strict=False)
        return SkipBadSamples(ds, report, max_skip_fraction=0.5)

    first = skipping(tmp_path / "r1.jsonl")
    with caplog.at_level(logging.INFO, logger="monkeytune.data.dataset"):
        second = skipping(tmp_path / "r2.jsonl")
    assert "data index loaded" in caplog.text
    assert second.summary() == first.summary() == "skipped 2 of 12 samples (16.7%): malformed_json 1 (8.3%), too_long 1 (8.3%)"
    read = [json.loads(x) for x in (tmp_path / "r1.jsonl").read_text().splitlines()]
    assert [json.loads(x) for x in (tmp_path / "r2.jsonl").read_text().splitlines()] == read
    assert second.dataset.lengths() == first.dataset.lengths()

    # An error run over the same data and settings stops at the first problem in file order, as
    # a run that scans while it reads does without the index.
    with pytest.raises(DataError) as cached:
        _dataset(data, tok, cfg)
    with pytest.raises(DataError) as fresh:
        ConversationDataset(data, tok, cfg, max_length=200, scan=True)
    assert cached.value.describe() == fresh.value.describe() and cached.value.line == 5

    # Without the parse error, the first problem is the scan's.
    del records[7]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    skipping(None)
    with pytest.raises(DataError) as e:
        _dataset(data, tok, cfg)
    assert e.value.kind == TOO_LONG and e.value.line == 5


def test_an_unwritable_data_folder_keeps_the_index_in_the_user_cache(tmp_path, tok, cfg, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", _records(tmp_path))
    (tmp_path / CACHE_FOLDER).write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    _dataset(data, tok, cfg).scan_all()
    assert len(list((tmp_path / "user" / "monkeytune" / "index").iterdir())) == 1
    assert _dataset(data, tok, cfg).scan_all() == {}


def test_scanning_while_reading_finds_what_a_later_scan_finds(tmp_path, tok, cfg):
    # Training scans each sample as it is parsed (read once); the result must be the scan's.
    records = _records(tmp_path)
    records[4]["conversations"][1]["value"] = "long " * 100
    data = write_jsonl(tmp_path / "d.jsonl", records, raw_lines={8: "{not json"})
    later = ConversationDataset(data, tok, cfg, max_length=200, strict=False)
    problems = later.scan_all()
    during = ConversationDataset(data, tok, cfg, max_length=200, strict=False, scan=True)
    assert {i: e.describe() for i, e in during.scan_all().items()} == {i: e.describe() for i, e in problems.items()}
    assert [e.describe() for e in during.parse_errors] == [e.describe() for e in later.parse_errors]
    assert during._lengths.tolist() == later._lengths.tolist() and -1 in during._lengths.tolist()
    _items_equal([during[i] for i in range(len(during)) if i not in problems],
                 [later[i] for i in range(len(later)) if i not in problems])


def test_a_damaged_index_is_read_afresh_with_a_warning(tmp_path, tok, cfg, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", _records(tmp_path))
    _dataset(data, tok, cfg).scan_all()
    (saved,) = (tmp_path / CACHE_FOLDER).iterdir()
    saved.write_bytes(saved.read_bytes()[:100])  # cut short, as by a full disk
    with caplog.at_level(logging.WARNING, logger="monkeytune.data.index"):
        ds = _dataset(data, tok, cfg)
    assert "ignoring the unreadable data index" in caplog.text
    assert ds.scan_all() == {} and len(ds) == 12
