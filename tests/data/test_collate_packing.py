import random

import pytest
import torch

from monkeytune.data.collate import (
    Collator,
    PackedDataset,
    first_fit_pack,
    model_inputs,
    pack_items,
    packed_attention_mask,
)
from monkeytune.data.dataset import ConversationDataset

X = -100


def item(ids, labels, n_views=0, sid="s"):
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "pixel_values": torch.full((n_views, 3, 4, 4), float(len(ids))),
        "view_slots": torch.arange(n_views),
        "num_images": n_views // 5,
        "id": sid,
    }


def test_dynamic_padding_positions_and_counts():
    a = item([5, 6, 7], [X, 6, 7], n_views=5, sid="a")
    b = item([8, 9, 10, 11, 12], [X, X, 10, 11, 12], n_views=0, sid="b")
    batch = Collator(pad_id=0)([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[X, 6, 7, X, X], [X, X, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["seq_lens"].tolist() == [[3], [5]]
    assert batch["num_images"] == 1 and batch["num_samples"] == 2
    # Nothing reads flash-attention boundaries or a supervised count: batches do not carry them.
    assert not {"cu_seqlens", "max_seqlen", "num_supervised_tokens"} & set(batch)
    assert batch["pixel_values"].shape == (5, 3, 4, 4) and batch["ids"] == ["a", "b"]
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "view_slots"}

    eight = Collator(pad_id=0, pad_to_multiple_of=8)([a, b])
    assert eight["input_ids"].shape == (2, 8) and eight["attention_mask"].sum() == 8
    fixed = Collator(pad_id=0, pad_to_length=16)([a])
    assert fixed["input_ids"].shape == (1, 16) and fixed["labels"][0, 3:].eq(X).all()
    with pytest.raises(ValueError, match="pad_to_length"):
        Collator(pad_id=0, pad_to_length=4)([b])


def naive_first_fit(lengths, capacity, order):
    rows, free = [], []
    for i in order:
        if lengths[i] is None:
            continue
        for r, f in enumerate(free):
            if f >= lengths[i]:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def test_first_fit_matches_the_definition():
    rng = random.Random(0)
    for trial in range(50):
        n = rng.randint(1, 60)
        lengths = [rng.choice([None, *range(1, 40)]) if rng.random() < 0.1 else rng.randint(1, 40) for _ in range(n)]
        order = list(range(n))
        rng.shuffle(order)
        rows = first_fit_pack(lengths, 40, order)
        assert rows == naive_first_fit(lengths, 40, order)
        assert sorted(i for r in rows for i in r) == sorted(i for i in range(n) if lengths[i] is not None)
        assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    with pytest.raises(ValueError, match="capacity"):
        first_fit_pack([5, 50], 40)


def test_packed_rows_position_ids_and_seq_lens():
    a = item([5, 6, 7], [X, 6, 7], n_views=5, sid="a")
    b = item([8, 9], [X, 9], n_views=0, sid="b")
    c = item([1, 2, 3, 4], [X, X, 3, 4], n_views=10, sid="c")
    row1, row2 = pack_items([a, b]), pack_items([c])
    batch = Collator(pad_id=0)([row1, row2])
    assert "attention_mask" not in batch  # packed: the model masks from position_ids
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["seq_lens"].tolist() == [[3, 2], [4, 0]]
    assert batch["num_samples"] == 3 and batch["ids"] == ["a", "b", "c"]
    assert batch["num_images"] == 3
    # Views stay in row order, each row's in sample order.
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [3.0] * 5 + [4.0] * 10

    mask = packed_attention_mask(batch["seq_lens"], 5)
    assert mask.shape == (2, 1, 5, 5)
    expected_row0 = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask[0, 0], expected_row0)
    assert torch.equal(mask[1, 0, 4], torch.tensor([0, 0, 0, 0, 1], dtype=torch.bool))  # pad sees itself


@pytest.fixture
def dataset(tmp_path, h, tok, cfg):
    h.make_image(tmp_path / "a.png", (30, 30))
    h.make_image(tmp_path / "b.png", (50, 20), (0, 0, 255))
    recs = [
        h.conv(("<img>a.png</img>What colour?", "Red."), id="0"),
        h.conv(("Say hi", "hi"), ("again", "hi hi"), id="1"),
        h.conv(("<img>b.png</img>And this?", "Blue, quite blue."), id="2"),
        h.conv(("<img>a.png</img>One", "1"), ("<img>b.png</img>Two", "2"), id="3"),
        h.conv(("Long text " * 4, "ok"), id="4"),
    ]
    path = h.write_jsonl(tmp_path / "d.jsonl", recs)
    return ConversationDataset(path, tok, cfg, max_length=96)


def test_packed_tokens_equal_unpacked_concatenated(dataset):
    packed = PackedDataset(dataset, seed=3)
    seen = []
    for j in range(len(packed)):
        row = packed[j]
        members = packed.rows[j]
        singles = [dataset[i] for i in members]
        for key in ("input_ids", "labels", "pixel_values", "view_slots"):
            assert torch.equal(row[key], torch.cat([s[key] for s in singles]))
        assert row["seq_lens"] == [s["input_ids"].shape[0] for s in singles]
        assert row["position_ids"].tolist() == [p for s in singles for p in range(s["input_ids"].shape[0])]
        assert sum(row["seq_lens"]) <= 96
        seen += members
    assert sorted(seen) == list(range(len(dataset)))
    assert len(packed) < len(dataset) and 0 < packed.fill_ratio <= 1


def test_packed_loss_equals_sum_of_unpacked_losses(dataset, tok, cfg):
    from monkeytune.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    packed = PackedDataset(dataset, shuffle=False, decreasing=True)
    rows = [packed[j] for j in range(len(packed))]
    batch = Collator(tok.pad_id)(rows)
    assert batch["num_samples"] == len(dataset)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        # The same samples one per row, right-padded, attention-masked.
        plain = Collator(tok.pad_id)([dataset[i] for i in range(len(dataset))])
        ref = model(**model_inputs(plain))
    assert int(out.num_tokens) == int(ref.num_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    assert out.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-4)


def test_packing_leaves_out_bad_samples(tmp_path, h, tok, cfg):
    from monkeytune.data.skipping import SkipBadSamples

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    recs = [
        h.conv(("q", "a"), id="ok"),
        h.conv(("x" * 200, "a"), id="long"),
        h.conv(("<img>broken.png</img>q", "a"), id="broken"),
        h.conv(("<img>gone.png</img>q", "a"), id="gone"),
    ]
    path = h.write_jsonl(tmp_path / "d.jsonl", recs)
    base = ConversationDataset(path, tok, cfg, max_length=64, strict=False)
    policy = SkipBadSamples(base, tmp_path / "r.jsonl", max_skip_fraction=1.0)
    assert policy.num_skipped == 2  # too long and missing: found by the scan, before any row is planned
    packed = PackedDataset(base, shuffle=False)
    assert packed.rows == [[0, 2]]
    assert packed[0]["ids"] == ["ok"]  # the undecodable image shows when loading
    assert policy.num_skipped == 3 and policy.summary() == (
        "skipped 3 of 4 samples (75.0%): too_long 1 (25.0%), missing_image 1 (25.0%), unreadable_image 1 (25.0%)"
    )


def test_packing_tokenizes_each_sample_once_for_the_plan_and_once_per_load(tmp_path, h, tok, cfg):
    """The plan renders each sample once and keeps only its length; loading a row renders its
    samples again (nothing of a sample's text is kept between uses, so memory stays flat)."""

    class Counting(type(tok)):
        calls = 0

        def encode(self, text):
            Counting.calls += 1
            return super().encode(text)

    h.make_image(tmp_path / "a.png")
    recs = [h.conv(("<img>a.png</img>What?", "Red."), ("More?", "No.")), h.conv(("Hi", "Hello"))] * 3
    path = h.write_jsonl(tmp_path / "d.jsonl", recs)
    counting = Counting()
    ds = ConversationDataset(path, counting, cfg, max_length=200)
    packed = PackedDataset(ds, shuffle=False)
    after_plan = Counting.calls
    assert after_plan == 3 * (4 + 2)  # one call per text piece, once
    rows = [packed[j] for j in range(len(packed))]
    assert Counting.calls == 2 * after_plan
    # The compact rendering expands to exactly what a fresh rendering gives.
    fresh = ConversationDataset(path, tok, cfg, max_length=200)
    for row, members in zip(rows, packed.rows):
        singles = [fresh.render(i).encoded for i in members]
        assert row["input_ids"].tolist() == [t for e in singles for t in e.input_ids]
        assert row["labels"].tolist() == [t for e in singles for t in e.labels]
