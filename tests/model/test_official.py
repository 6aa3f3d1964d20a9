"""Official Monkey / Qwen-VL folders: loading, name map, export round trips and numerical fidelity.

The checkpoints and the plain-torch restatement of the official forward pass come from this
folder's conftest (``off``). Generation is checked in ``test_official_generation.py``.
"""

import json
import os

import pytest
import torch

from monkeytune.model.io import ModelFolderError, load_model, read_tensors, save_model
from monkeytune.model.official import export_official
from monkeytune.model.qwen_compat import ntk_alpha


# ----------------------------------------------------------------------------- loading / export
@pytest.mark.parametrize(
    "fmt,dtype,shards", [("bin", torch.float32, 1), ("safetensors", torch.bfloat16, 3), ("bin", torch.float16, 2)]
)
def test_official_round_trip_is_bitwise(off, tmp_path, fmt, dtype, shards):
    cfg = off.official_config("monkey")
    cfg.update(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, fp32=dtype == torch.float32)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    src = off.write_official(tmp_path / "src", cfg, off.official_state(cfg, seed=1), fmt=fmt, dtype=dtype, shards=shards)
    model, tok = load_model(src)
    assert tok.image_start_id == model.config.image_start_id == off.IMG_START
    assert model.config.image.grid == [2, 2] and model.config.vision.lora_slots == 4
    assert model.config.llm.intermediate_size == 344 and model.config.tokens_per_image == 80
    assert model.vision.pos_embed.dtype == dtype
    save_model(model, tmp_path / "mt", tokenizer=tok)
    again, tok2 = load_model(tmp_path / "mt")
    export_official(again, tmp_path / "out", tokenizer=tok2, safe_serialization=fmt == "safetensors")
    original = {k: v for k, v in read_tensors(src).items() if "inv_freq" not in k and "masked_bias" not in k}
    exported = read_tensors(tmp_path / "out")
    assert set(original) == set(exported)
    for k, t in original.items():
        assert exported[k].dtype == t.dtype and torch.equal(exported[k], t), k
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == cfg
    assert (tmp_path / "out" / "qwen.tiktoken").read_bytes() == (src / "qwen.tiktoken").read_bytes()


def test_qwen_vl_layout_has_one_view_and_no_adapters(off, tmp_path):
    cfg = off.official_config("qwen")
    model, _ = load_model(off.write_official(tmp_path / "q", cfg, off.official_state(cfg), fmt="safetensors"))
    assert model.config.image.grid == [0, 0] and model.config.vision.lora_slots == 0
    assert model.config.tokens_per_image == 16
    export_official(model, tmp_path / "out")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["model_type"] == "qwen" and "lora_repeat_num" not in out_cfg["visual"]
    ids = off.prompt_with_image(cfg)
    views = off.random_views(1)
    sd = off.official_state(cfg)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), pixel_values=views, view_slots=torch.tensor([-1])).logits
    ref = off.ref_logits(sd, cfg, off.ref_embeds(sd, cfg, ids, views), ntk_alpha(len(ids), cfg["seq_length"]))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_fresh_model_exports_a_complete_official_config(tmp_path, monkey_ckpt):
    model, _ = load_model(monkey_ckpt[0])
    model.metadata = {}
    export_official(model, tmp_path / "out", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["bf16"] and not cfg["fp32"] and cfg["intermediate_size"] == 688 and cfg["kv_channels"] == 64
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_monkey.MonkeyLMHeadModel"
    assert cfg["visual"]["lora_repeat_num"] == 4 and cfg["visual"]["image_size"] == 896
    assert read_tensors(tmp_path / "out")["lm_head.weight"].dtype == torch.bfloat16


def test_missing_and_unexpected_official_keys_are_named(off, tmp_path):
    cfg = off.official_config("monkey")
    sd = off.official_state(cfg)
    del sd["transformer.h.1.mlp.w2.weight"], sd["transformer.visual.transformer.resblocks.0.mlp_lora.3.lora_scale"]
    sd["transformer.visual.extra_thing"] = torch.zeros(2)
    off.write_official(tmp_path, cfg, sd)
    with pytest.raises(ModelFolderError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "transformer.h.1.mlp.w2.weight" in msg and "resblocks.0.mlp_lora.3.lora_scale" in msg
    assert "unexpected keys: transformer.visual.extra_thing" in msg


def test_bad_official_config_is_explained(off, tmp_path):
    cfg = off.official_config("monkey")
    cfg["visual"]["image_size"] = 900
    off.write_official(tmp_path, cfg, off.official_state(off.official_config("monkey")))
    with pytest.raises(ModelFolderError, match="image_size 900 is not a multiple"):
        load_model(tmp_path)
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="missing field 'hidden_size'"):
        load_model(tmp_path)


class RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_that_runs_code_is_refused(off, tmp_path):
    cfg = off.official_config("monkey")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({"transformer.wte.weight": torch.zeros(2), "trap": RunsCode()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="refusing to load"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- numerical fidelity
def test_visual_features_match_official(off, monkey_ckpt):
    folder, cfg, sd = monkey_ckpt
    model, _ = load_model(folder)
    views = off.random_views(5)
    with torch.no_grad():
        ours = model.encode_images(views, torch.tensor([0, 1, 2, 3, -1]))
    ref = torch.cat([off.ref_visual(sd, cfg, views[k : k + 1], k if k < 4 else None) for k in range(5)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_short_text_prompt_matches_and_training_mode_turns_scaling_off(off, monkey_ckpt):
    folder, cfg, sd = monkey_ckpt
    model, _ = load_model(folder)
    ids = torch.randint(0, off.NUM_RANKS, (1, 12), generator=torch.Generator().manual_seed(4))
    emb = sd["transformer.wte.weight"][ids]
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(ours, off.ref_logits(sd, cfg, emb, 1.0), atol=1e-4, rtol=0)
        long_ids = torch.randint(0, off.NUM_RANKS, (1, 40), generator=torch.Generator().manual_seed(5))
        long_emb = sd["transformer.wte.weight"][long_ids]
        model.llm.train()
        trained = model(long_ids).logits
        model.llm.eval()
        inferred = model(long_ids).logits
    torch.testing.assert_close(trained, off.ref_logits(sd, cfg, long_emb, 1.0, inference=False), atol=1e-4, rtol=0)
    torch.testing.assert_close(inferred, off.ref_logits(sd, cfg, long_emb, ntk_alpha(40, 23)), atol=1e-4, rtol=0)
    assert (trained - inferred).abs().max() > 1e-2


def test_compat_survives_monkeytune_save(off, tmp_path, monkey_ckpt):
    folder, cfg, sd = monkey_ckpt
    model, tok = load_model(folder)
    save_model(model, tmp_path, tokenizer=tok)
    again, _ = load_model(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["metadata"]["qwen_compat"]["seq_length"] == 23
    ids = torch.randint(0, off.NUM_RANKS, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_ntk_alpha_follows_official_rule():
    assert [ntk_alpha(n, 2048) for n in (1, 1024, 2048, 2049, 4096, 4097, 8192, 9000)] == [1, 1, 1, 3, 3, 7, 7, 15]
