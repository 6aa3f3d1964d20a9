"""``data.streaming``: blocks dealt to ranks and workers, an exact resume after a kill mid-epoch,
bad records named or skipped, JSON Lines and parquet alike."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from monkeytune.cli import main
from monkeytune.data import stream
from monkeytune.data.blocks import deal, list_blocks, read_block, sources
from monkeytune.data.errors import DataError
from monkeytune.train.checkpoint import CheckpointManager, read_state
from monkeytune.train.loop import train
from monkeytune.train.metrics import read_metrics

from .conftest import Interrupt, stop_at

# 48 records, 10 a step: the first epoch ends inside step 5; the checkpoint of step 3 is in the
# middle of it.
ONE = dict(train={"max_steps": 7, "micro_batch_size": 5, "grad_accum": 2}, checkpoint={"every": 3})
# Two workers of 23 and 25 records, 5 a step taken in turn: the checkpoint of step 5 is mid-epoch
# for both, with worker 1 next; worker 0 rolls into its second epoch in step 9.
TWO = dict(train={"max_steps": 11, "micro_batch_size": 5, "grad_accum": 1}, checkpoint={"every": 5})
# Packed rows of about three samples, two rows a step: the cursor of step 3 points at the sample that
# did not fit the last row.
PACKED = dict(train={"max_steps": 6, "micro_batch_size": 2, "grad_accum": 1}, checkpoint={"every": 3})


def sections(workers, plan=ONE, **data):
    return dict(plan, data={"streaming": True, "num_workers": workers, **data})


def kill_mid_epoch(make_config, run, workers, plan, **data):
    """The run killed two steps after a checkpoint, mid-epoch; that checkpoint's state."""
    cfg = make_config(run, **sections(workers, plan, **data))
    every = plan["checkpoint"]["every"]
    with pytest.raises(Interrupt):
        train(cfg, on_step=stop_at(every + 2))
    state = read_state(CheckpointManager(cfg.checkpoint.output_dir + "/checkpoints").latest())
    assert state["step"] == every and len(state["stream"][0]["cursors"]) == max(1, workers)
    return cfg, state


def assert_same_run(ref, resumed):
    ref_rows, cut_rows = read_metrics(ref.run_dir / "metrics.jsonl"), read_metrics(resumed.run_dir / "metrics.jsonl")
    assert [r["step"] for r in cut_rows] == list(range(1, ref.steps + 1))
    assert [r["loss"] for r in cut_rows] == [r["loss"] for r in ref_rows]
    ref_params = dict(ref.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n


@pytest.mark.parametrize("plan, packing", [(ONE, False), (PACKED, True)], ids=["batches", "packed"])
def test_a_streamed_run_killed_mid_epoch_resumes_exactly(make_config, monkeypatch, plan, packing):
    read = []

    def counted(src, block):
        read.append(block)
        return read_block(src, block)

    monkeypatch.setattr(stream, "read_block", counted)
    ref = train(make_config("ref", **sections(0, plan, packing=packing)))
    ref_reads = list(read)
    cfg, state = kill_mid_epoch(make_config, "cut", 0, plan, packing=packing)
    read.clear()
    resumed = train(cfg, resume="latest")
    assert_same_run(ref, resumed)
    # The resumed run starts in the saved cursor's block: it reads the end of what the
    # uninterrupted run read, nothing of the epoch before it.
    epoch, k = state["stream"][0]["cursors"][0][:2]
    assert (epoch, k) != (0, 0) and len(read) < len(ref_reads) and read == ref_reads[len(ref_reads) - len(read):]


def test_a_streamed_run_with_two_workers_resumes_exactly(make_config):
    ref = train(make_config("ref2", **sections(2, TWO)))
    cfg, state = kill_mid_epoch(make_config, "cut2", 2, TWO)
    saved = state["stream"][0]
    assert saved["next"] == 1 and all(c[0] == 0 and c[3] > 0 for c in saved["cursors"])  # mid-epoch
    assert_same_run(ref, train(cfg, resume="latest"))
    assert ref.steps == 11 and read_state(ref.last_checkpoint)["stream"][0]["cursors"][0][0] == 1


def jsonl_with_odd_lines(path):
    """Records of very different lengths, blank lines, a byte-order mark; the plain reference:
    ``(byte offset of each record's line, record)``."""
    lines = [json.dumps({"id": i, "text": "x" * (97 * i % 5000)}) for i in range(120)]
    for k in (5, 6, 40, 77):
        lines.insert(k, "  " if k % 2 else "")
    data = b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n"
    path.write_bytes(data)
    expected, pos = [], 3
    for line in data[3:].split(b"\n"):
        if line.strip():
            expected.append((pos, json.loads(line)))
        pos += len(line) + 1
    return expected


def test_every_record_is_read_once_per_epoch_across_ranks_and_workers(tmp_path, monkeypatch):
    from monkeytune.data import blocks as blocks_module

    monkeypatch.setattr(blocks_module, "BLOCK_BYTES", 2048)  # some lines span whole blocks
    expected = jsonl_with_odd_lines(tmp_path / "a.jsonl")
    ranks, workers = 2, 3
    srcs = sources([str(tmp_path / "a.jsonl")])
    blocks = list_blocks(srcs, ranks * workers)
    assert len(blocks) >= 4 * ranks * workers and any(not read_block(srcs[0], b) for b in blocks)
    got, dealt = [], []
    for rank in range(ranks):
        for worker in range(workers):
            mine = deal(len(blocks), ranks * workers, rank * workers + worker)
            assert mine == [j for j in range(len(blocks)) if j % (ranks * workers) == rank * workers + worker]
            dealt += mine
            got += [rec for j in mine for rec in read_block(srcs[0], blocks[j])]
    assert sorted(dealt) == list(range(len(blocks)))
    assert sorted(got, key=lambda r: r[0]) == expected


def test_a_json_list_is_refused_in_one_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[{}]")
    with pytest.raises(DataError, match=r"list\.json: .*cannot be streamed.*monkeytune data convert") as e:
        sources([str(path)])
    assert "\n" not in str(e.value)


def test_streaming_refuses_what_it_cannot_do(make_config):
    from monkeytune.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.streaming needs train\.max_steps"):
        make_config("x", data={"streaming": True})
    with pytest.raises(ConfigError, match=r"train\.objective window_answer .* data\.streaming false"):
        make_config("x", data={"streaming": True}, train={"max_steps": 2, "objective": "window_answer"},
                    policy={"preset": "vision"})
    with pytest.raises(ConfigError, match=r"data\.columns and hf: dataset names are not streamed yet"):
        make_config("x", data={"streaming": True, "columns": {"messages": "dialog"}}, train={"max_steps": 2})


@pytest.fixture
def with_bad_record(synthetic, tmp_path):
    """The synthetic records with a blank line 10 and, on line 31 (record 29), an unknown role."""
    train_file, _ = synthetic
    lines = train_file.read_text().splitlines()
    bad = json.loads(lines[29])
    bad["conversations"][0]["from"] = "robot"
    lines[29] = json.dumps(bad)
    lines.insert(9, "")
    path = train_file.parent / f"{tmp_path.name}.jsonl"  # beside the images it names
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_bad_record_stops_the_run_in_one_line(make_config, with_bad_record, tmp_path, capsys):
    cfg = make_config("bad", **sections(2, train=str(with_bad_record)))
    cfg.save(tmp_path / "run.yaml")
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("monkeytune train: ") and "Traceback" not in "\n".join(err)
    assert f"{with_bad_record}:31 (record 29): conversations[0].from: unknown role 'robot'" in err[-1]


def test_a_bad_record_is_skipped_counted_and_reported(make_config, with_bad_record, caplog):
    cfg = make_config("skip", **sections(0, train=str(with_bad_record), on_bad_sample="skip"))
    result = train(cfg)
    assert result.steps == 7
    report = [json.loads(line) for line in (result.run_dir / "bad_samples.jsonl").read_text().splitlines()]
    assert {(r["line"], r["index"], r["kind"], r["field"]) for r in report} == {(31, 29, "bad_roles",
                                                                                  "conversations[0].from")}
    assert "skipped 1 of 71 records this process read" in caplog.text


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_with_embedded_images_streams_the_items_the_map_style_dataset_gives(make_config, tmp_path):
    import datasets

    from monkeytune.data.dataset import ConversationDataset
    from monkeytune.train.setup import build_stream, resolve_run_model

    rows = [{"id": f"r{i}", "image": {"bytes": png((30 * i, 200 - 20 * i, 90)), "path": None},
             "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                               {"from": "gpt", "value": f" colour {i}"}]} for i in range(8)]
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    path = tmp_path / "train.parquet"
    table.to_parquet(str(path), batch_size=3)  # row groups of 3, 3 and 2
    cfg = make_config("pq", data={"train": str(path), "streaming": True, "shuffle": False},
                      train={"max_steps": 2, "micro_batch_size": 2})
    resolved = resolve_run_model(cfg)
    dataset, _, _ = build_stream(cfg, resolved.tokenizer, resolved.config, tmp_path, 0, 1, 0)
    assert [(b.group, b.start, b.end) for b in dataset.blocks] == [(0, 0, 2), (0, 2, 3), (1, 3, 5), (1, 5, 6),
                                                                   (2, 6, 8)]
    records = dataset._items(0, [0, 0, 0, 0, 0])
    streamed = [next(records)[2] for _ in range(8)]
    reference = ConversationDataset(str(path), resolved.tokenizer, resolved.config, max_length=128)
    for i, got in enumerate(streamed):
        want = reference[i]
        assert got["id"] == want["id"] == f"r{i}"
        for key in ("input_ids", "labels", "pixel_values", "view_slots"):
            assert torch.equal(got[key], want[key]), key
    result = train(cfg)
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
