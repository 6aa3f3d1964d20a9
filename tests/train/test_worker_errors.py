"""A bad sample met inside a DataLoader worker reaches the user as its one-line data error."""

from __future__ import annotations

import json
import shutil

from monkeytune.cli import main


def test_a_corrupt_image_in_a_worker_is_named_in_one_line(make_config, synthetic, tmp_path, capsys):
    train_file, _ = synthetic
    data = tmp_path / "data"
    shutil.copytree(train_file.parent / "images", data / "images")
    lines = train_file.read_text().splitlines()
    first = json.loads(lines[0])
    image = first["conversations"][0]["value"].split("<img>")[1].split("</img>")[0]
    # Cut the image file short: its header still reads, decoding fails when the sample is loaded.
    (data / image).write_bytes((data / image).read_bytes()[:60])
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = make_config("workers", data={"train": str(data / "train.jsonl"), "max_length": 128, "num_workers": 2},
                      train={"epochs": 1, "micro_batch_size": 4})
    cfg.save(tmp_path / "run.yaml")
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("monkeytune train: ") and f"{data / 'train.jsonl'}:1" in err[-1]
    assert "Traceback" not in "\n".join(err) and "worker" not in err[-1]
