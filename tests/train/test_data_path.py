"""The way a record takes from its JSON line to the loss: the project files its data passes through.

The objects are built as training builds them (:func:`monkeytune.train.setup.build_data`, whose
start-up pass reads every record once through the same files), then every function call is traced
while a DataLoader worker's work is done on one record: its line read back and parsed, rendered,
given its views, batched, and fed to the loss. The model's own parts (its package, the vision
tower and image processor, the tokenizer and the model config) are the destination, not the data
path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import monkeytune
from monkeytune.train.setup import build_data, load_model_and_tokenizer
from monkeytune.train.step import TrainingModule, sample_weights, supervised_count

PACKAGE = Path(monkeytune.__file__).parent
MODEL_SIDE = ("model/", "vision/", "tokenizer/", "config.py")
DATA_PATH = {"data/reading.py", "data/messages.py", "data/templates.py", "data/dataset.py", "data/views.py",
             "data/collate.py", "train/step.py"}


def _traced(fn):
    """``fn()``, and the package files whose code ran meanwhile (relative paths)."""
    files: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(str(PACKAGE)):
                files.add(Path(path).relative_to(PACKAGE).as_posix())

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, files


@pytest.mark.parametrize("mode", ["default", "packing", "skip"])
def test_a_jsonl_record_reaches_the_loss_through_seven_files(make_config, tmp_path, mode):
    data = {"cache": False, "packing": mode == "packing", "on_bad_sample": "skip" if mode == "skip" else "error"}
    cfg = make_config(data=data)
    model, tok = load_model_and_tokenizer(cfg)
    module = TrainingModule(model)

    dataset, collator, _ = build_data(cfg, tok, model.config, tmp_path, rank=0, world_size=1)
    records = getattr(dataset, "base", dataset).samples
    index = next(i for i in range(len(records)) if records[i].images)  # a record with an image
    if mode == "packing":
        index = next(row for row, samples in enumerate(dataset.rows) if index in samples)

    def one_record_to_the_loss():
        batch = collator([dataset[index]])
        weights, _ = sample_weights(batch["labels"], batch.get("position_ids"))
        return batch, supervised_count(batch["labels"]), module(batch, weights)

    (batch, targets, loss), files = _traced(one_record_to_the_loss)
    assert batch["pixel_values"].shape[0] > 0 and targets > 0 and loss.isfinite()
    path = {f for f in files if not f.startswith(MODEL_SIDE)}
    assert path == DATA_PATH, f"extra {sorted(path - DATA_PATH)}, missing {sorted(DATA_PATH - path)}"
