import dataclasses
import json
import logging

import pytest
import torch

from monkeytune.data.dataset import ConversationDataset
from monkeytune.data.errors import DataError
from monkeytune.data.skipping import SkipBadSamples, summarize_report

TPI = 20  # tokens per image of the test config: 5 views x 4 queries


@pytest.fixture
def data(tmp_path, h):
    """Three samples: one image, two images over two turns, text only."""
    h.make_image(tmp_path / "img" / "a.png", (40, 30))
    h.make_image(tmp_path / "img" / "b.jpg", (20, 50), (10, 200, 10))
    recs = [
        h.conv(("<img>img/a.png</img>What?", "Red."), id="one"),
        h.conv(("<img>img/a.png</img>A?", "x"), ("<img>img/b.jpg</img>B?", "y"), id="two"),
        h.conv(("Hi", "Hello"), id="text"),
    ]
    return h.write_jsonl(tmp_path / "train.jsonl", recs)


def test_items_hold_ids_labels_and_views(data, tok, cfg):
    ds = ConversationDataset(data, tok, cfg, max_length=256)
    assert len(ds) == 3
    one, two, text = ds[0], ds[1], ds[2]
    assert one["pixel_values"].shape == (5, 3, 28, 28) and one["pixel_values"].dtype == torch.float32
    assert one["view_slots"].tolist() == [0, 1, 2, 3, -1]
    assert two["pixel_values"].shape == (10, 3, 28, 28) and two["num_images"] == 2
    assert text["pixel_values"].shape == (0, 3, 28, 28) and text["view_slots"].numel() == 0
    # Placeholders match the views: views x queries per image.
    for item in (one, two, text):
        n_pad = int((item["input_ids"] == tok.image_pad_id).sum())
        assert n_pad == item["pixel_values"].shape[0] * cfg.vision.n_queries
        assert item["input_ids"].shape == item["labels"].shape
        assert item["labels"][0] == -100
        image_tokens = torch.isin(item["input_ids"], torch.tensor([1, 2, 3]))
        assert (item["labels"][image_tokens] == -100).all()
    assert tok.decode([t for t in one["labels"].tolist() if t != -100]) == "Red."
    assert one["id"] == "one"
    # The image actually differs between a and b: the views are decoded, not placeholders.
    assert not torch.allclose(two["pixel_values"][:5], two["pixel_values"][5:])


def test_lengths_need_no_images(data, tok, cfg, tmp_path):
    ds = ConversationDataset(data, tok, cfg, max_length=256)
    (tmp_path / "img" / "a.png").unlink()  # lengths are computed without opening images
    assert ds.lengths() == [len("What?Red.") + 1 + TPI + 2, len("A?xB?y") + 2 + 2 * (TPI + 2), len("HiHello") + 1]


def test_error_mode_raises_naming_the_sample(data, tok, cfg, tmp_path):
    (tmp_path / "img" / "b.jpg").unlink()
    ds = ConversationDataset(data, tok, cfg, max_length=256)
    ds[0]
    with pytest.raises(DataError) as info:
        ds[1]
    e = info.value
    assert (e.kind, e.file, e.line, e.sample_id) == ("missing_image", str(data), 2, "two")
    assert e.field == "conversations[2].value"  # the turn whose tag names the file
    assert "b.jpg" in str(e)


def test_skip_mode_counts_logs_reports_and_replaces(tmp_path, h, tok, cfg, caplog):
    h.make_image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    recs = [
        h.conv(("<img>ok.png</img>q", "a"), id="good"),
        h.conv(("<img>missing.png</img>q", "a"), id="missing"),
        h.conv(("<img>broken.png</img>q", "a"), id="broken"),
        h.conv(("q" * 300, "a"), id="long"),
    ]
    path = h.write_jsonl(tmp_path / "d.jsonl", recs)
    with path.open("a") as f:
        f.write("{oops\n")  # line 5: undecodable, reported at construction
    report = tmp_path / "skipped.jsonl"
    with caplog.at_level(logging.WARNING):
        base = ConversationDataset(path, tok, cfg, max_length=64, strict=False)
        policy = SkipBadSamples(base, report, max_skip_fraction=1.0)
        # The scan finds what needs no decoding: the bad line, the missing file, the long sample.
        assert len(base) == 4 and policy.num_skipped == 3 and base.skip is policy
        assert "skipped 3 of 5 samples (60.0%)" in caplog.text
        items = [base[i] for i in range(len(base))]
    # Every bad item is replaced by the next good one (wrapping around).
    assert [it["id"] for it in items] == ["good", "good", "good", "good"]
    assert policy.num_skipped == 4
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    assert [(x["id"], x["line"], x["kind"]) for x in lines] == [
        (None, 5, "malformed_json"),
        ("missing", 2, "missing_image"),
        ("long", 4, "too_long"),
        ("broken", 3, "unreadable_image"),
    ]
    assert all(x["file"] == str(path) and x["reason"] for x in lines)
    assert sum("skipping bad sample" in r.message for r in caplog.records) == 4
    # Known-bad samples are not reported again.
    base[1]
    assert policy.num_skipped == 4 and len(report.read_text().splitlines()) == 4
    assert summarize_report(report, policy.total) == policy.summary() == (
        "skipped 4 of 5 samples (80.0%): malformed_json 1 (20.0%), missing_image 1 (20.0%), "
        "too_long 1 (20.0%), unreadable_image 1 (20.0%)"
    )


def test_skip_mode_stops_above_max_skip_fraction(tmp_path, h, tok, cfg):
    recs = [h.conv(("q", "a"), id=str(k)) for k in range(10)] + [h.conv(("q", ""), id="empty")]
    path = h.write_jsonl(tmp_path / "d.jsonl", recs)
    base = ConversationDataset(path, tok, cfg, strict=False)
    SkipBadSamples(base, max_skip_fraction=0.1)  # 1 of 11 is within 10%
    with pytest.raises(DataError) as info:
        SkipBadSamples(ConversationDataset(path, tok, cfg, strict=False), max_skip_fraction=0.05)
    assert info.value.kind == "too_many_skipped"
    assert "skipped 1 of 11 samples (9.1%): empty_answer 1 (9.1%), more than data.max_skip_fraction = 0.05" in str(info.value)


def test_over_long_samples_are_never_cut(tmp_path, h, tok, cfg):
    h.make_image(tmp_path / "a.png")
    rec = h.conv(("<img>a.png</img>question", "answer"), id="img")
    path = h.write_jsonl(tmp_path / "d.jsonl", [rec])
    full = len("questionanswer") + 1 + TPI + 2
    ds = ConversationDataset(path, tok, cfg, max_length=full)
    assert ds[0]["input_ids"].shape[0] == full
    for max_length in (full - 1, 10):  # a cut would fall in the answer or inside the image span
        ds = ConversationDataset(path, tok, cfg, max_length=max_length)
        with pytest.raises(DataError, match="never cut") as info:
            ds[0]
        assert info.value.kind == "too_long"


def test_truncate_turns_drops_only_trailing_text_exchanges(tmp_path, h, tok, cfg):
    h.make_image(tmp_path / "a.png")
    rec = h.conv(("<img>a.png</img>q1", "a1"), ("q2", "a2"), ("q3", "a3"), id="multi")
    img_last = h.conv(("q1", "a1"), ("<img>a.png</img>q2, a longer one", "a2"), id="img_last")
    path = h.write_jsonl(tmp_path / "d.jsonl", [rec, img_last])
    first = TPI + 2 + len("q1a1") + 1
    ds = ConversationDataset(path, tok, cfg, max_length=first + 5 + 2, truncate_turns=True)
    item = ds[0]
    assert item["input_ids"].shape[0] == first + 5  # exchanges 1 and 2 kept, 3 dropped
    assert tok.decode([t for t in item["labels"].tolist() if t != -100]) == "a1a2"
    assert item["num_images"] == 1 and ds.num_truncated == 1
    # A trailing exchange with an image is never dropped: the sample stays an error.
    with pytest.raises(DataError, match="cannot make it fit"):
        ds[1]
    # Without the flag, the same sample is an error.
    strict = ConversationDataset(path, tok, cfg, max_length=first + 5 + 2)
    with pytest.raises(DataError):
        strict[0]


def test_image_ids_must_match_the_model(data, tok, cfg):
    bad = dataclasses.replace(cfg, image_pad_id=99)
    with pytest.raises(ValueError, match="image_pad_id"):
        ConversationDataset(data, tok, bad)


def test_monkey_template_refuses_system_turns(tmp_path, h, tok, cfg):
    rec = h.conv(("q", "a"))
    rec["conversations"].insert(0, {"from": "system", "value": "s"})
    path = h.write_jsonl(tmp_path / "d.jsonl", [rec])
    with pytest.raises(DataError) as info:
        ConversationDataset(path, tok, cfg)[0]
    assert (info.value.kind, info.value.field) == ("template", "conversations[0].from")
    item = ConversationDataset(path, tok, cfg, template="chatml")[0]
    assert tok.decode(item["input_ids"].tolist()).startswith("system\ns")


def test_dataloader_workers_decode(data, tok, cfg):
    from monkeytune.data.collate import Collator

    ds = ConversationDataset(data, tok, cfg, max_length=256)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=Collator(tok.pad_id))
    (batch,) = list(loader)
    assert batch["pixel_values"].shape == (15, 3, 28, 28)
    assert batch["ids"] == ["one", "two", "text"]


def test_iteration_ends_after_the_last_sample(data, tok, cfg):
    ds = ConversationDataset([data], tok, cfg, max_length=4096)
    items = list(ds)  # the sequence protocol stops at IndexError
    assert len(items) == len(ds)
    assert ds[-1]["index"] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_view_cache_decodes_each_image_once_and_changes_nothing(data, tok, cfg, tmp_path):
    plain = ConversationDataset(data, tok, cfg, max_length=256)
    cached = ConversationDataset(data, tok, cfg, max_length=256, view_cache_bytes=2**20)
    first = [cached[i] for i in range(3)]
    # a.png is shared by samples 0 and 1: two images processed, one drawn again from memory.
    assert len(cached.views.cache) == 2 and cached.views.cache.hits == 1
    (tmp_path / "img" / "a.png").unlink()
    (tmp_path / "img" / "b.jpg").unlink()
    with pytest.raises(DataError):
        plain[0]
    for i, item in enumerate(first):
        again = cached[i]  # no file left to decode: these views come from the cache
        assert torch.equal(again["pixel_values"], item["pixel_values"])
        assert torch.equal(again["view_slots"], item["view_slots"])
        assert torch.equal(again["input_ids"], item["input_ids"])


def test_view_cache_keeps_the_first_images_within_its_budget(data, tok, cfg):
    one_image = 5 * 3 * 28 * 28 * 4 + 5 * 8  # float32 views and int64 slots
    ds = ConversationDataset(data, tok, cfg, max_length=256, view_cache_bytes=one_image)
    ds[0], ds[1]
    assert len(ds.views.cache) == 1 and ds.views.cache.nbytes == one_image
    with pytest.raises(ValueError, match="max_bytes"):
        ConversationDataset(data, tok, cfg, max_length=256, view_cache_bytes=-1)
