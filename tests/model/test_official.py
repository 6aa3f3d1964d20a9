"""Official Monkey / Qwen-VL folders: loading, name map, export round trips and numerical fidelity.

The checkpoints here are built in the test with the official tensor names and shapes (tiny sizes,
random weights). The fidelity tests compare the converted model with an independent plain-torch
restatement of the official forward pass (Qwen attention with rotary, RMSNorm, w1/w2 SwiGLU,
the windowed ViT with per-window adapters chosen by index, the resampler) applied to the
official-named tensors.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from monkeytune.model.io import CheckpointError, load_model, read_tensors, save_model
from monkeytune.model.official import export_official
from monkeytune.model.qwen_compat import ntk_alpha
from monkeytune.tokenizer.qwen import NUM_EXTRA, write_tiktoken_ranks

MERGES = [b"an", b"in", b"th", b"he", b"the", b"at", b"ca", b"cat"]
NUM_RANKS = 256 + len(MERGES)
IMG_START = NUM_RANKS + 3 + NUM_EXTRA + 6  # <img> after endoftext, im_start, im_end, extras, 6 box tags


def official_config(model_type="monkey", seq_length=2048):
    cfg = {
        "architectures": ["MonkeyLMHeadModel" if model_type == "monkey" else "QWenLMHeadModel"],
        "model_type": model_type, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "kv_channels": 64, "intermediate_size": 688, "vocab_size": 640, "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "max_position_embeddings": 8192, "seq_length": seq_length,
        "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False,
        "bf16": False, "fp16": False, "fp32": True, "onnx_safe": None, "use_flash_attn": False,
        "visual": {"heads": 2, "image_size": 896 if model_type == "monkey" else 448, "image_start_id": IMG_START,
                   "layers": 2, "mlp_ratio": 2.0, "output_dim": 256, "patch_size": 14, "width": 64, "n_queries": 16},
    }
    if model_type == "monkey":
        cfg["visual"]["lora_repeat_num"] = 4
    return cfg


def official_state(cfg, seed=0):
    """Random tensors under the official names and shapes (as modeling_qwen.py / visual.py declare them)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["vocab_size"]
    sd = {"transformer.wte.weight": r(vocab, h, std=0.5), "transformer.ln_f.weight": r(h, std=0.1, mean=1),
          "lm_head.weight": r(vocab, h, std=0.1), "transformer.rotary_emb.inv_freq": torch.ones(32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": r(h, std=0.1, mean=1), p + "attn.c_attn.weight": r(3 * h, h),
                   p + "attn.c_attn.bias": r(3 * h), p + "attn.c_proj.weight": r(h, h),
                   p + "ln_2.weight": r(h, std=0.1, mean=1), p + "mlp.w1.weight": r(inter, h),
                   p + "mlp.w2.weight": r(inter, h), p + "mlp.c_proj.weight": r(h, inter),
                   p + "attn.masked_bias": torch.tensor(-1e4)})
    v = cfg["visual"]
    w, d, q, m = v["width"], v["output_dim"], v.get("n_queries", 256), int(v["width"] * v["mlp_ratio"])
    pv = "transformer.visual."
    sd.update({pv + "conv1.weight": r(w, 3, v["patch_size"], v["patch_size"]), pv + "positional_embedding": r(256, w),
               pv + "ln_pre.weight": r(w, std=0.1, mean=1), pv + "ln_pre.bias": r(w),
               pv + "attn_pool.query": r(q, d), pv + "attn_pool.pos_embed": r(q, d, std=0.5),
               pv + "attn_pool.kv_proj.weight": r(d, w), pv + "attn_pool.attn.in_proj_weight": r(3 * d, d),
               pv + "attn_pool.attn.in_proj_bias": r(3 * d), pv + "attn_pool.attn.out_proj.weight": r(d, d),
               pv + "attn_pool.attn.out_proj.bias": r(d), pv + "ln_post.weight": r(d, std=0.1, mean=1),
               pv + "ln_post.bias": r(d), pv + "proj": r(d, d, std=d**-0.5)})
    for ln in ("ln_q", "ln_kv"):
        sd.update({f"{pv}attn_pool.{ln}.weight": r(d, std=0.1, mean=1), f"{pv}attn_pool.{ln}.bias": r(d)})
    for i in range(v["layers"]):
        p = f"{pv}transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            sd.update({f"{p}{ln}.weight": r(w, std=0.1, mean=1), f"{p}{ln}.bias": r(w)})
        for name, out_f, in_f in (("attn.in_proj", 3 * w, w), ("attn.out_proj", w, w), ("mlp.c_fc", m, w), ("mlp.c_proj", w, m)):
            sd.update({f"{p}{name}.weight": r(out_f, in_f), f"{p}{name}.bias": r(out_f)})
        for k in range(v.get("lora_repeat_num", 0) if cfg["model_type"] == "monkey" else 0):
            for name, out_f, rank in (("attn.in_proj_lora", 3 * w, 16), ("attn.out_proj_lora", w, 16), ("mlp_lora", w, 32)):
                sd.update({f"{p}{name}.{k}.lora_a.weight": r(rank, w), f"{p}{name}.{k}.lora_b.weight": r(out_f, rank),
                           f"{p}{name}.{k}.lora_scale": r(1, std=0.2, mean=1)})
    return sd


def write_official(folder, cfg, sd, fmt="bin", dtype=torch.float32, shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in sd.items()}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tiktoken_ranks(folder / "qwen.tiktoken", [bytes([b]) for b in range(256)] + MERGES)
    names = list(sd)
    parts = [names[i::shards] for i in range(shards)]
    ext = "bin" if fmt == "bin" else "safetensors"
    stem = "pytorch_model" if fmt == "bin" else "model"
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        chunk = {k: sd[k].contiguous() for k in part}
        torch.save(chunk, folder / fname) if fmt == "bin" else save_file(chunk, str(folder / fname))
        weight_map.update({k: fname for k in part})
    if shards > 1:
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ----------------------------------------------------------------------------- reference forward
def ref_abs_pos(table, n):
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(n))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


def ref_lora(sd, prefix, x):
    return (x @ sd[prefix + "lora_a.weight"].T @ sd[prefix + "lora_b.weight"].T) * sd[prefix + "lora_scale"]


def ref_visual(sd, cfg, x, idx):
    """The official VisionTransformer.forward for one batch of views, adapters by window index."""
    v, pv = cfg["visual"], "transformer.visual."
    heads, w = v["heads"], v["width"]
    hd = w // heads
    ln = lambda t, p: F.layer_norm(t, (t.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], 1e-6)  # noqa: E731
    lin = lambda t, p: t @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    x = F.conv2d(x, sd[pv + "conv1.weight"], stride=v["patch_size"])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = ln(x + ref_abs_pos(sd[pv + "positional_embedding"], x.shape[1]), pv + "ln_pre")
    n, length, _ = x.shape
    for i in range(v["layers"]):
        p = f"{pv}transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        mixed = lin(h, p + "attn.in_proj")
        if idx is not None:
            mixed = mixed + ref_lora(sd, f"{p}attn.in_proj_lora.{idx}.", h)
        q, k, val = mixed.view(n, length, heads, 3 * hd).split(hd, dim=-1)
        q, k, val = (t.transpose(1, 2) for t in (q, k, val))
        probs = ((q / math.sqrt(hd)) @ k.transpose(-1, -2)).softmax(-1)
        ctx = (probs @ val).transpose(1, 2).reshape(n, length, w)
        out = lin(ctx, p + "attn.out_proj")
        if idx is not None:
            out = out + ref_lora(sd, f"{p}attn.out_proj_lora.{idx}.", ctx)
        x = x + out
        residual = x
        x = x + lin(F.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
        if idx is not None:
            x = x + ref_lora(sd, f"{p}mlp_lora.{idx}.", residual)
    a = pv + "attn_pool."
    d, nh = v["output_dim"], v["output_dim"] // 128
    kv = ln(x @ sd[a + "kv_proj.weight"].T, a + "ln_kv")
    query = ln(sd[a + "query"], a + "ln_q") + sd[a + "pos_embed"]
    wq, wk, wv = sd[a + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[a + "attn.in_proj_bias"].chunk(3)
    qq = (query @ wq.T + bq).view(-1, nh, d // nh).transpose(0, 1)[None]
    kk = ((kv + ref_abs_pos(sd[a + "pos_embed"], length)) @ wk.T + bk).view(n, length, nh, d // nh).transpose(1, 2)
    vv = (kv @ wv.T + bv).view(n, length, nh, d // nh).transpose(1, 2)
    att = ((qq / math.sqrt(d // nh)) @ kk.transpose(-1, -2)).softmax(-1) @ vv
    out = att.transpose(1, 2).reshape(n, -1, d) @ sd[a + "attn.out_proj.weight"].T + sd[a + "attn.out_proj.bias"]
    return ln(out, pv + "ln_post") @ sd[pv + "proj"]


def ref_rms(x, w, eps=1e-6):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def ref_logits(sd, cfg, embeds, alpha, inference=True):
    """The official QWenModel + lm_head on ``embeds`` [1, T, H] with a given NTK alpha."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, t_len, seq_length = h // nh, embeds.shape[1], cfg["seq_length"]
    base = cfg["rotary_emb_base"] * alpha ** (hd / (hd - 2))
    inv = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.outer(torch.arange(t_len).float(), inv)
    emb = torch.cat((emb, emb), -1)[None, :, None, :]
    cos, sin = emb.cos(), emb.sin()

    def rotate(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), -1) * sin

    logn = torch.tensor([math.log(i, seq_length) if i > seq_length else 1 for i in range(1, t_len + 1)])[None, :, None, None]
    mask = torch.full((t_len, t_len), torch.finfo(torch.float32).min).triu(1)
    x = embeds
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        mixed = ref_rms(x, sd[p + "ln_1.weight"]) @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(1, t_len, nh, hd) for t in mixed.split(h, dim=2))
        q, k = rotate(q), rotate(k)
        if cfg["use_logn_attn"] and inference:
            q = q * logn
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(hd) + mask).softmax(-1)
        ctx = (probs @ v).transpose(1, 2).reshape(1, t_len, h)
        x = x + ctx @ sd[p + "attn.c_proj.weight"].T
        y = ref_rms(x, sd[p + "ln_2.weight"])
        x = x + (y @ sd[p + "mlp.w1.weight"].T * F.silu(y @ sd[p + "mlp.w2.weight"].T)) @ sd[p + "mlp.c_proj.weight"].T
    return ref_rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


def ref_embeds(sd, cfg, ids, views):
    """Token embeddings with the image span replaced by [windows (adapter k), global] features."""
    x = sd["transformer.wte.weight"][ids][None].clone()
    n_win = views.shape[0] - 1
    feats = [ref_visual(sd, cfg, views[k : k + 1], k if cfg["model_type"] == "monkey" else None) for k in range(n_win)]
    feats.append(ref_visual(sd, cfg, views[n_win:], None))
    feats = torch.cat(feats, dim=1)[0]
    a, b = ids.index(IMG_START), ids.index(IMG_START + 1)
    x[0, a + 1 : b] = feats
    return x


def ref_greedy(sd, cfg, ids, views, steps):
    """Greedy decoding as the cached official model does it: alpha fixed by the prompt length."""
    alpha = ntk_alpha(len(ids), cfg["seq_length"])
    x, out = ref_embeds(sd, cfg, ids, views), []
    for _ in range(steps):
        nxt = int(ref_logits(sd, cfg, x, alpha)[0, -1].argmax())
        out.append(nxt)
        x = torch.cat([x, sd["transformer.wte.weight"][nxt][None, None]], dim=1)
    return out


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def monkey_ckpt(tmp_path_factory):
    # seq_length 23: the 89-token image prompt gets NTK alpha 7, and the official cached decoding
    # keeps it even after the sequence passes 92 tokens, where a fresh prompt would get 15.
    cfg = official_config("monkey", seq_length=23)
    sd = official_state(cfg)
    folder = write_official(tmp_path_factory.mktemp("monkey"), cfg, sd, fmt="bin")
    return folder, cfg, sd


def prompt_with_image(cfg, n_text_before=3, n_text_after=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = cfg["visual"].get("n_queries", 256) * (5 if cfg["model_type"] == "monkey" else 1)
    before = torch.randint(0, NUM_RANKS, (n_text_before,), generator=g).tolist()
    after = torch.randint(0, NUM_RANKS, (n_text_after,), generator=g).tolist()
    return before + [IMG_START] + [IMG_START + 2] * tokens + [IMG_START + 1] + after


def random_views(n, seed=0):
    return torch.randn(n, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- loading / export
@pytest.mark.parametrize(
    "fmt,dtype,shards", [("bin", torch.float32, 1), ("safetensors", torch.bfloat16, 3), ("bin", torch.float16, 2)]
)
def test_official_round_trip_is_bitwise(tmp_path, fmt, dtype, shards):
    cfg = official_config("monkey")
    cfg.update(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, fp32=dtype == torch.float32)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    src = write_official(tmp_path / "src", cfg, official_state(cfg, seed=1), fmt=fmt, dtype=dtype, shards=shards)
    model, tok = load_model(src)
    assert tok.image_start_id == model.config.image_start_id == IMG_START
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


def test_qwen_vl_layout_has_one_view_and_no_adapters(tmp_path):
    cfg = official_config("qwen")
    model, _ = load_model(write_official(tmp_path / "q", cfg, official_state(cfg), fmt="safetensors"))
    assert model.config.image.grid == [0, 0] and model.config.vision.lora_slots == 0
    assert model.config.tokens_per_image == 16
    export_official(model, tmp_path / "out")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["model_type"] == "qwen" and "lora_repeat_num" not in out_cfg["visual"]
    ids = prompt_with_image(cfg)
    views = random_views(1)
    sd = official_state(cfg)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), pixel_values=views, view_slots=torch.tensor([-1])).logits
    ref = ref_logits(sd, cfg, ref_embeds(sd, cfg, ids, views), ntk_alpha(len(ids), cfg["seq_length"]))
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


def test_missing_and_unexpected_official_keys_are_named(tmp_path):
    cfg = official_config("monkey")
    sd = official_state(cfg)
    del sd["transformer.h.1.mlp.w2.weight"], sd["transformer.visual.transformer.resblocks.0.mlp_lora.3.lora_scale"]
    sd["transformer.visual.extra_thing"] = torch.zeros(2)
    write_official(tmp_path, cfg, sd)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "transformer.h.1.mlp.w2.weight" in msg and "resblocks.0.mlp_lora.3.lora_scale" in msg
    assert "unexpected keys: transformer.visual.extra_thing" in msg


def test_bad_official_config_is_explained(tmp_path):
    cfg = official_config("monkey")
    cfg["visual"]["image_size"] = 900
    write_official(tmp_path, cfg, official_state(official_config("monkey")))
    with pytest.raises(CheckpointError, match="image_size 900 is not a multiple"):
        load_model(tmp_path)
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing field 'hidden_size'"):
        load_model(tmp_path)


class RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_that_runs_code_is_refused(tmp_path):
    cfg = official_config("monkey")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save({"transformer.wte.weight": torch.zeros(2), "trap": RunsCode()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- numerical fidelity
def test_visual_features_match_official(monkey_ckpt):
    folder, cfg, sd = monkey_ckpt
    model, _ = load_model(folder)
    views = random_views(5)
    with torch.no_grad():
        ours = model.encode_images(views, torch.tensor([0, 1, 2, 3, -1]))
    ref = torch.cat([ref_visual(sd, cfg, views[k : k + 1], k if k < 4 else None) for k in range(5)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_logits_and_greedy_generation_match_official(monkey_ckpt):
    """seq_length is 23 here, so this 89-token prompt runs the dynamic-NTK and log-n paths."""
    folder, cfg, sd = monkey_ckpt
    model, _ = load_model(folder)
    ids, views = prompt_with_image(cfg), random_views(5, seed=3)
    slots = torch.tensor([0, 1, 2, 3, -1])
    alpha = ntk_alpha(len(ids), cfg["seq_length"])
    assert len(ids) == 89 and alpha == 7 and ntk_alpha(len(ids) + 6, cfg["seq_length"]) == 15
    with torch.no_grad():
        ours = model(torch.tensor([ids]), pixel_values=views, view_slots=slots).logits
    ref = ref_logits(sd, cfg, ref_embeds(sd, cfg, ids, views), alpha)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    new = model.generate(torch.tensor([ids]), pixel_values=views, view_slots=slots, max_new_tokens=6, do_sample=False)
    assert new[0].tolist() == ref_greedy(sd, cfg, ids, views, 6)


def test_short_text_prompt_matches_and_training_mode_turns_scaling_off(monkey_ckpt):
    folder, cfg, sd = monkey_ckpt
    model, _ = load_model(folder)
    ids = torch.randint(0, NUM_RANKS, (1, 12), generator=torch.Generator().manual_seed(4))
    emb = sd["transformer.wte.weight"][ids]
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(ours, ref_logits(sd, cfg, emb, 1.0), atol=1e-4, rtol=0)
        long_ids = torch.randint(0, NUM_RANKS, (1, 40), generator=torch.Generator().manual_seed(5))
        long_emb = sd["transformer.wte.weight"][long_ids]
        model.llm.train()
        trained = model(long_ids).logits
        model.llm.eval()
        inferred = model(long_ids).logits
    torch.testing.assert_close(trained, ref_logits(sd, cfg, long_emb, 1.0, inference=False), atol=1e-4, rtol=0)
    torch.testing.assert_close(inferred, ref_logits(sd, cfg, long_emb, ntk_alpha(40, 23)), atol=1e-4, rtol=0)
    assert (trained - inferred).abs().max() > 1e-2


def test_compat_survives_monkeytune_save(tmp_path, monkey_ckpt):
    folder, cfg, sd = monkey_ckpt
    model, tok = load_model(folder)
    save_model(model, tmp_path, tokenizer=tok)
    again, _ = load_model(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["metadata"]["qwen_compat"]["seq_length"] == 23
    ids = torch.randint(0, NUM_RANKS, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_ntk_alpha_follows_official_rule():
    assert [ntk_alpha(n, 2048) for n in (1, 1024, 2048, 2049, 4096, 4097, 8192, 9000)] == [1, 1, 1, 3, 3, 7, 7, 15]
