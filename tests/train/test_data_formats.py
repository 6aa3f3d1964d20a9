"""Training reads every data format with its images, and the skip policy's summary and bound."""

from __future__ import annotations

import json
import logging

import pytest

from monkeytune.cli import main
from monkeytune.data.reading import load_samples
from monkeytune.model.monkey import MonkeyForCausalLM
from monkeytune.train import train


def _as_llava(src, dst, images_dir) -> None:
    """The synthetic Monkey records rewritten as LLaVA records (image field, <image> placeholder)."""
    out = []
    for s in load_samples(src):
        convs = [{"from": "human" if t.role == "user" else "gpt",
                  "value": "".join(p if isinstance(p, str) else "<image>" for p in t.parts)} for t in s.turns]
        rec = {"id": s.id, "conversations": convs}
        if s.images:
            rec["image"] = [ref.source.replace(str(images_dir) + "/", "") for ref in s.images]
        out.append(rec)
    dst.write_text("\n".join(json.dumps(r) for r in out) + "\n")


def _count_views(monkeypatch) -> list[int]:
    seen: list[int] = []
    encode = MonkeyForCausalLM.encode_images

    def spy(self, pixel_values, view_slots):
        seen.append(int(pixel_values.shape[0]))
        return encode(self, pixel_values, view_slots)

    monkeypatch.setattr(MonkeyForCausalLM, "encode_images", spy)
    return seen


def test_llava_data_trains_with_the_same_views_as_monkey_data(make_config, synthetic, tmp_path, monkeypatch):
    train_file, _ = synthetic
    llava = tmp_path / "llava.jsonl"
    _as_llava(train_file, llava, train_file.parent / "images")
    seen = _count_views(monkeypatch)
    base = {"shuffle": False}
    train(make_config("monkey", data=base, train={"max_steps": 3, "epochs": 0}))
    monkey_views, seen[:] = list(seen), []
    train(make_config("llava", data={**base, "train": str(llava), "image_root": str(train_file.parent / "images")},
                      train={"max_steps": 3, "epochs": 0}))
    assert seen == monkey_views and sum(seen) > 0  # 5 views per image, batch by batch


def test_skip_mode_stops_above_the_bound_and_summarises(make_config, synthetic, tmp_path, capsys, caplog):
    train_file, _ = synthetic
    lines = train_file.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    # 3 of 48 samples lose their image (6.25% > 5%): the run stops before it starts.
    broken = [ln.replace("images/0000", "missing/0000") if k in (0, 1, 2) else ln for k, ln in enumerate(lines)]
    bad.write_text("\n".join(broken) + "\n")
    for img in (train_file.parent / "images").iterdir():
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / img.name).symlink_to(img)
    cfg = make_config("skip", data={"train": str(bad), "on_bad_sample": "skip"}, train={"max_steps": 1, "epochs": 0})
    path = tmp_path / "run.yaml"
    cfg.save(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    n_bad = sum("missing/" in ln for ln in broken)
    assert f"skipped {n_bad} of 48 samples" in err and "more than data.max_skip_fraction = 0.05" in err
    assert "Traceback" not in err
    # Within a raised bound the run trains and ends with the summary.
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(path), "--data.max_skip_fraction", "0.1",
                     "--checkpoint.output_dir", str(tmp_path / "skip2")]) == 0
    assert f"bad samples: skipped {n_bad} of 48 samples" in caplog.text
    assert len((tmp_path / "skip2" / "bad_samples.jsonl").read_text().splitlines()) == n_bad


@pytest.mark.parametrize("value", ["-0.1", "2"])
def test_max_skip_fraction_is_validated(make_config, tmp_path, capsys, value):
    path = tmp_path / "run.yaml"
    make_config("v").save(path)
    assert main(["train", str(path), "--data.max_skip_fraction", value, "--print-config"]) == 2
    assert "data.max_skip_fraction must be in [0, 1]" in capsys.readouterr().err


def test_error_mode_names_a_bad_sample_before_the_first_step(make_config, synthetic, tmp_path, capsys):
    train_file, _ = synthetic
    lines = train_file.read_text().splitlines()
    lines[5] = lines[5].replace("images/", "nowhere/")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    (tmp_path / "images").symlink_to(train_file.parent / "images")
    path = tmp_path / "run.yaml"
    make_config("err", data={"train": str(bad)}, train={"max_steps": 1, "epochs": 0}).save(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:6 (record 5): conversations[0].value: image file not found" in err
    assert "Traceback" not in err and not (tmp_path / "err" / "metrics.jsonl").exists()


@pytest.mark.parametrize("kind", ["parquet", "arrow", "save_to_disk"])
def test_a_table_with_embedded_images_trains_like_its_jsonl(kind, make_config, synthetic, tmp_path):
    # The LLaVA records in a table whose image column holds the PNG bytes (datasets.Image), and
    # the same records as JSON Lines naming the files: identical batches, so identical losses,
    # and a resume from the table's checkpoint continues exactly.
    import datasets

    train_file, _ = synthetic
    llava = tmp_path / "llava.jsonl"
    images = train_file.parent / "images"
    _as_llava(train_file, llava, images)
    rows = [json.loads(line) for line in llava.read_text().splitlines()]
    for r in rows:
        r["images"] = [{"bytes": (images / name).read_bytes(), "path": None} for name in r.pop("image", [])]
    ds = datasets.Dataset.from_list(rows)
    features = ds.features.copy()
    features["images"] = datasets.Sequence(datasets.Image())
    ds = ds.cast(features)
    path = tmp_path / {"parquet": "train.parquet", "arrow": "train.arrow", "save_to_disk": "saved"}[kind]
    if kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "arrow":  # an arrow IPC file, as pyarrow writes it
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
    else:
        ds.save_to_disk(str(path))
    steps = {"max_steps": 3, "epochs": 0}
    reference = train(make_config("jsonl", data={"train": str(llava), "image_root": str(images)}, train=steps))
    table = train(make_config("table", data={"train": str(path)}, train=steps, checkpoint={"every": 2}))
    assert table.losses == reference.losses and len(table.losses) == 3
    resumed = train(make_config("table", data={"train": str(path)}, train=steps, checkpoint={"every": 2}),
                    resume="latest")
    assert resumed.losses == table.losses[2:]


def test_a_second_run_starts_from_the_saved_index_and_trains_the_same(make_config, synthetic, tmp_path, caplog):
    # Packed, so the plan comes from the saved lengths; a copy of the data keeps this test's
    # index apart from the session's other runs.
    train_file, _ = synthetic
    data = tmp_path / "train.jsonl"
    data.write_text(train_file.read_text())
    (tmp_path / "images").symlink_to(train_file.parent / "images")
    sections = dict(data={"train": str(data), "packing": True}, train={"max_steps": 2, "epochs": 0})
    with caplog.at_level(logging.INFO, logger="monkeytune.data.dataset"):
        first = train(make_config("first", **sections))
        assert "data index saved" in caplog.text and "data index loaded" not in caplog.text
        caplog.clear()
        second = train(make_config("second", **sections))
        assert "data index loaded" in caplog.text
    assert second.losses == first.losses
