"""Bad rows in parquet, as ``monkeytune data check`` and the skip policy see them: each named by
file, row and field on one line (undecodable image bytes, a placeholder mismatch, a missing
column, a column of the wrong type), as the same records in JSON Lines are."""

from __future__ import annotations

import io
import json

import datasets
import pytest
from PIL import Image

from monkeytune.cli import main
from monkeytune.data import SkipBadSamples
from monkeytune.data.dataset import ConversationDataset


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def conv(question):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def bad(tmp_path):
    """``llava.parquet``: a good row, then bytes that are no image, two placeholders for one
    image, and a row without its conversations cell. ``typed.parquet``: ``messages`` holds ints."""
    rows = [{"id": "good", "image": [{"bytes": png(), "path": None}], "conversations": conv("<image>\nColour?")},
            {"id": "bytes", "image": [{"bytes": b"not an image", "path": None}], "conversations": conv("<image>\nQ")},
            {"id": "mismatch", "image": [{"bytes": png(), "path": None}], "conversations": conv("<image><image>\nQ")},
            {"id": "missing", "image": None, "conversations": None}]
    ds = datasets.Dataset.from_list(rows)
    features = ds.features.copy()
    features["image"] = datasets.Sequence(datasets.Image())
    ds.cast(features).to_parquet(str(tmp_path / "llava.parquet"))
    datasets.Dataset.from_list([{"id": "int", "messages": 7}]).to_parquet(str(tmp_path / "typed.parquet"))
    (tmp_path / "img.png").write_bytes(png())
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [{"id": "good", "image": ["img.png"], "conversations": conv("<image>\nColour?")},
             {"id": "bytes", "image": ["broken.png"], "conversations": conv("<image>\nQ")},
             {"id": "mismatch", "image": ["img.png"], "conversations": conv("<image><image>\nQ")},
             {"id": "missing", "image": None, "conversations": None}]
    (tmp_path / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return tmp_path


def test_data_check_names_every_bad_row(bad, capsys):
    llava, typed = bad / "llava.parquet", bad / "typed.parquet"
    assert main(["data", "check", str(llava), str(typed), "--config", "tiny"]) == 1
    out = capsys.readouterr().out
    problems = [line.strip() for line in out.splitlines() if line.startswith(f"  {bad}")]
    assert problems == [
        f"{llava} (record 1): image[0]: image llava.parquet row 1, image[0]: not a recognised image "
        "(UnidentifiedImageError)",
        f"{llava} (record 2): conversations[0].value: <image> placeholder number 2 has no image: the record lists 1",
        f"{llava} (record 3): conversations: must be a non-empty list of turns, got null",
        f"{typed} (record 0): messages: must be a non-empty list of turns, got int",
    ]
    assert "records:  5 (1 valid, 4 with errors)" in out and "result: FAILED (4 errors)" in out
    # The same records in JSON Lines: the same problems, at the same records.
    assert main(["data", "check", str(bad / "llava.jsonl"), "--config", "tiny"]) == 1
    out = capsys.readouterr().out
    found = [line.split(": ", 2)[1] for line in out.splitlines() if line.startswith(f"  {bad}")]
    assert found == ["image[0]", "conversations[0].value", "conversations"]
    assert "(record 1)" in out and "(record 3)" in out


def test_skip_mode_counts_and_reports_bad_rows(bad, tok, cfg, tmp_path):
    report = tmp_path / "skipped.jsonl"
    ds = ConversationDataset([bad / "llava.parquet", bad / "typed.parquet"], tok, cfg, max_length=512, strict=False)
    skipping = SkipBadSamples(ds, report, max_skip_fraction=1.0)
    # Parse errors and the mismatch are known at start; the bytes are found bad when decoded.
    assert skipping.summary().startswith("skipped 3 of 5 samples (60.0%)")
    assert ds[0]["id"] == "good" and ds[1]["id"] == "good"  # row 1 replaced by the next good one
    assert skipping.summary().startswith("skipped 4 of 5 samples")
    records = map(json.loads, report.read_text().splitlines())
    kinds = [(r["file"].rsplit("/", 1)[-1], r["index"], r["kind"]) for r in records]
    assert sorted(kinds) == [("llava.parquet", 1, "unreadable_image"), ("llava.parquet", 2, "image_mismatch"),
                             ("llava.parquet", 3, "malformed_record"), ("typed.parquet", 0, "malformed_record")]
