"""monkeytune model folders: save/load round trips, sharding, trainable-only folders, adapters."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from monkeytune.config import get_config
from monkeytune.model import build_model
from monkeytune.model.io import (
    ModelFolderError,
    load_adapters,
    load_model,
    save_adapters,
    save_model,
    weight_files,
)
from monkeytune.tokenizer.simple import SimpleTokenizer


def small_config(**llm):
    cfg = get_config("tiny")
    cfg.vision = dataclasses.replace(cfg.vision, layers=1, n_queries=16)
    cfg.image = dataclasses.replace(cfg.image, window_size=56)
    cfg.llm = dataclasses.replace(cfg.llm, num_layers=1, **llm)
    return cfg


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.tokens_per_image
    ids = torch.tensor([[5, 6, cfg.image_start_id, *[cfg.image_pad_id] * n, cfg.image_end_id, 7, 8, 9]])
    pv = torch.randn(cfg.image.num_views, 3, 56, 56, generator=g)
    slots = torch.tensor(list(range(cfg.image.num_windows)) + [-1])
    return dict(input_ids=ids, pixel_values=pv, view_slots=slots)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(small_config()).eval()
    randomize_adapters(m)
    return m


def test_round_trip_gives_identical_outputs_and_tokenizer(model, tmp_path):
    tok = SimpleTokenizer.train(["a cat sat on the mat", "what is this? Answer: a dog"], vocab_size=300)
    save_model(model, tmp_path, tokenizer=tok, metadata={"chat_format": "chatml"})
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["format"] == "monkeytune" and info["complete"] and info["metadata"]["chat_format"] == "chatml"
    loaded, tok2 = load_model(tmp_path)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert not loaded.training and loaded.metadata["chat_format"] == "chatml"
    batch = inputs(model.config)
    assert torch.equal(logits(model, batch), logits(loaded, batch))
    assert tok2.encode("a cat sat") == tok.encode("a cat sat")
    for name, t in model.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name


def test_sharded_save_writes_index_and_loads(model, tmp_path):
    save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = weight_files(tmp_path)
    assert len(files) > 2 and set(index["weight_map"]) == set(model.state_dict())
    loaded, tok = load_model(tmp_path, dtype=torch.bfloat16)
    assert tok is None
    assert loaded.vision.pos_embed.dtype == torch.bfloat16
    # Saving again unsharded removes the old shards.
    save_model(model, tmp_path)
    assert [p.name for p in weight_files(tmp_path)] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_tied_embeddings_are_stored_once(tmp_path):
    torch.manual_seed(1)
    m = build_model(small_config(tie_word_embeddings=True)).eval()
    assert m.llm.lm_head.weight.data_ptr() == m.llm.model.embed_tokens.weight.data_ptr()
    save_model(m, tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["tied_weights"] == {"llm.lm_head.weight": "llm.model.embed_tokens.weight"}
    loaded, _ = load_model(tmp_path)
    assert loaded.llm.lm_head.weight.data_ptr() == loaded.llm.model.embed_tokens.weight.data_ptr()
    batch = inputs(m.config)
    assert torch.equal(logits(m, batch), logits(loaded, batch))


def test_trainable_only_folder_loads_over_its_base(model, tmp_path):
    base = tmp_path / "base"
    save_model(model, base)
    tuned, _ = load_model(base)
    for name, p in tuned.named_parameters():
        p.requires_grad_("lora" in name)
    randomize_adapters(tuned, seed=5)
    part = tmp_path / "part"
    save_model(tuned, part, trainable_only=True, base_model=base)
    info = json.loads((part / "config.json").read_text())
    assert not info["complete"]
    assert [p.name for p in weight_files(part)] == ["model.safetensors"]
    loaded, _ = load_model(part)
    batch = inputs(model.config)
    assert torch.equal(logits(tuned, batch), logits(loaded, batch))
    assert not torch.equal(logits(model, batch), logits(loaded, batch))
    # Without a recorded base the folder explains what it needs.
    info.pop("base_model")
    (part / "config.json").write_text(json.dumps(info))
    with pytest.raises(ModelFolderError, match="only trainable weights"):
        load_model(part)


def test_adapters_round_trip_and_errors(model, tmp_path):
    other = build_model(small_config()).eval()
    names = [n for n, _ in model.named_parameters() if "lora" in n]
    path = save_adapters(model, tmp_path / "adapters.safetensors", names=names)
    loaded = load_adapters(other, path)
    assert loaded == sorted(names)
    for n in names:
        assert torch.equal(dict(other.named_parameters())[n], dict(model.named_parameters())[n])
    save_file({"vision.nope": torch.zeros(2), "vision.pos_embed": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFolderError, match=r"vision\.nope.*shape mismatches: vision\.pos_embed"):
        load_adapters(other, tmp_path / "bad.safetensors")


def test_missing_and_unexpected_keys_are_named(model, tmp_path):
    save_model(model, tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "resampler.query"}
    sd["llm.extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=r"missing keys: resampler\.query.*unexpected keys: llm\.extra\.weight"):
        load_model(tmp_path)


def test_bad_folders_are_explained(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "monkeytune",\n "model": ')
    with pytest.raises(ModelFolderError, match="line 2"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFolderError, match="unknown checkpoint layout"):
        load_model(tmp_path)
