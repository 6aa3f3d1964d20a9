"""``hf:NAME`` data entries read through ``datasets.load_dataset``, offline, from a test-made cache:
the same items as the records in JSON Lines, in this process and in a DataLoader worker that opens
the dataset again by name and options; one-line errors naming the dataset; the fingerprint."""

from __future__ import annotations

import io
import json
import pickle

import datasets
import pytest
import torch
from PIL import Image

from monkeytune.data import DataError, hub, load_samples, reading, tables
from monkeytune.data.dataset import ConversationDataset

from .conftest import assert_same_items

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210)]


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network, and a cache of this test's own."""
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # for worker processes started from here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # This process read them when it imported datasets.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return str(tmp_path / "hf-cache")


@pytest.fixture
def data(tmp_path):
    """Three sharegpt rows with embedded PNGs as parquet, and the same records as JSON Lines."""
    rows, lines = [], []
    for i, colour in enumerate(COLOURS):
        messages = [{"role": "user", "content": "<image>What colour?" if i != 1 else "Hi?"},
                    {"role": "assistant", "content": f"answer {i}"}]
        images = [{"bytes": png(colour), "path": None}] if i != 1 else []
        rows.append({"id": f"r{i}", "messages": messages, "images": images})
        (tmp_path / f"img{i}.png").write_bytes(png(colour))
        lines.append(json.dumps({"id": f"r{i}", "messages": messages, "images": [f"img{i}.png"] if i != 1 else []}))
    ds = datasets.Dataset.from_list(rows)
    features = ds.features.copy()
    features["images"] = datasets.Sequence(datasets.Image())
    ds.cast(features).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def forget_open_tables(monkeypatch):
    """This process as a fresh worker sees it: no table open, no options registered."""
    for module, name in ((tables, "_OPEN"), (tables, "_CHUNKS"), (tables, "_PLANS"), (hub, "_OPTIONS")):
        monkeypatch.setattr(module, name, {})


def items(ds):
    return [ds[i] for i in range(len(ds))]


def test_a_dataset_name_gives_the_jsonl_items_here_and_in_a_worker(data, offline, tok, cfg, monkeypatch):
    options = {"data_files": str(data / "rows.parquet"), "cache_dir": offline}
    ds = ConversationDataset("hf:parquet", tok, cfg, max_length=512, load_options=options)
    reference = items(ConversationDataset(data / "rows.jsonl", tok, cfg, max_length=512))
    assert_same_items(items(ds), reference)
    source = ds.samples[0].images[0].source
    assert source.startswith("table:hf:parquet@") and source.endswith("#0/images/0")
    # A worker (spawned: the dataset pickled; forked: what was open in the parent) opens the
    # dataset again by its name and options before it reads an image of it.
    copy = pickle.loads(pickle.dumps(ds))
    forget_open_tables(monkeypatch)
    assert_same_items(items(copy), reference)
    forget_open_tables(monkeypatch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert_same_items(list(loader), reference)
    assert hub.is_dataset_name("hf:parquet") and reading.is_table("hf:parquet")


def test_dataset_name_errors_are_one_line_naming_the_dataset(data, offline):
    parquet = str(data / "rows.parquet")
    cases = [
        ({"data_files": str(data / "absent.parquet"), "cache_dir": offline}, "hf:parquet: cannot load the dataset: "),
        ({"data_files": parquet, "cache_dir": offline, "colour": 1}, "unexpected keyword argument 'colour'"),
        ({"data_files": parquet, "cache_dir": offline, "split": None}, "it holds several splits (train); choose "),
        ({"data_files": parquet, "streaming": True}, "streaming datasets are not supported yet"),
    ]
    for options, message in cases:
        with pytest.raises(DataError) as info:
            load_samples("hf:parquet", load_options=options)
        assert info.value.kind == "data_file" and message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError) as info:
        load_samples("hf:nobody/absent", load_options={"cache_dir": offline})
    text = str(info.value)
    assert text.startswith("hf:nobody/absent: cannot load the dataset: ") and "offline" in text and "\n" not in text


def test_the_fingerprint_holds_the_dataset_cache_files(data, offline, tmp_path):
    from monkeytune.train.config import ConfigError, TrainConfig, validate
    from monkeytune.train.fingerprint import run_fingerprint

    cfg = TrainConfig()
    cfg.model.preset = "tiny"
    cfg.data.train = ["hf:parquet", str(data / "rows.jsonl")]
    cfg.data.load_options = {"data_files": str(data / "rows.parquet"), "cache_dir": offline}
    fingerprint = run_fingerprint(cfg, None)["data"]
    (name, file), = fingerprint["hf:parquet"].items()
    assert name.endswith(".arrow") and file["size"] > 0 and len(file["hash"]) == 32
    assert str(data / "rows.jsonl") in fingerprint
    cfg.data.train = [str(data / "rows.jsonl")]
    with pytest.raises(ConfigError, match="data.load_options is set but no data.train entry is a dataset name"):
        validate(cfg)
