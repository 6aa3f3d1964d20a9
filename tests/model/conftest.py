"""Official-layout checkpoints built in the test, and a plain-torch restatement of the official forward.

The checkpoints have the official tensor names and shapes (tiny sizes, random weights). The
reference restates the official forward pass (Qwen attention with rotary, dynamic NTK and log-n,
RMSNorm, w1/w2 SwiGLU, the windowed ViT with per-window adapters chosen by index, the
resampler) on the official-named tensors. Test modules reach the helpers through the ``off``
fixture (they cannot import conftest under --import-mode=importlib).
"""

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

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


# ----------------------------------------------------------------------------- reference decoder
def ref_rms(x, w, eps=1e-6):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def ref_logits(sd, cfg, embeds, alpha, inference=True, mask=None):
    """The official QWenModel + lm_head on ``embeds`` ``[B, T, H]`` with one NTK alpha.

    As the official code computes it in any dtype: positions are cache indices (left padding
    counted), the rotary runs in float32 and is rounded back, log-n scales the query by index,
    RMSNorm runs in float32. ``mask`` ``[B, T]`` marks real tokens (1) and left padding (0);
    the attention probabilities are taken in float32 here.
    """
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    b, t_len, seq_length = embeds.shape[0], embeds.shape[1], cfg["seq_length"]
    hd, dtype = h // nh, embeds.dtype
    base = cfg["rotary_emb_base"] * alpha ** (hd / (hd - 2))
    inv = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.outer(torch.arange(t_len).float(), inv)
    emb = torch.cat((emb, emb), -1)[None, :, None, :]
    cos, sin = emb.cos(), emb.sin()

    def rotate(t):
        tf = t.float()
        t1, t2 = tf.chunk(2, dim=-1)
        return (tf * cos + torch.cat((-t2, t1), -1) * sin).to(dtype)

    logn = torch.tensor([math.log(i, seq_length) if i > seq_length else 1 for i in range(1, t_len + 1)])
    logn = logn.to(dtype)[None, :, None, None]
    neg = torch.finfo(torch.float32).min
    additive = torch.full((t_len, t_len), neg).triu(1)[None, None]
    if mask is not None:
        additive = additive + torch.where(mask.bool(), 0.0, neg)[:, None, None, :]
    x = embeds
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        mixed = ref_rms(x, sd[p + "ln_1.weight"]) @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(b, t_len, nh, hd) for t in mixed.split(h, dim=2))
        q, k = rotate(q), rotate(k)
        if cfg["use_logn_attn"] and inference:
            q = q * logn
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(hd) + additive
        ctx = (scores.softmax(-1).to(dtype) @ v).transpose(1, 2).reshape(b, t_len, h)
        x = x + ctx @ sd[p + "attn.c_proj.weight"].T
        y = ref_rms(x, sd[p + "ln_2.weight"])
        x = x + (y @ sd[p + "mlp.w1.weight"].T * F.silu(y @ sd[p + "mlp.w2.weight"].T)) @ sd[p + "mlp.c_proj.weight"].T
    return ref_rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


def ref_embeds(sd, cfg, ids, views):
    """Token embeddings ``[1, T, H]``; an image span is replaced by [windows (adapter k), global] features."""
    x = sd["transformer.wte.weight"][ids][None].clone()
    if IMG_START not in ids:
        return x
    n_win = views.shape[0] - 1
    feats = [ref_visual(sd, cfg, views[k : k + 1], k if cfg["model_type"] == "monkey" else None) for k in range(n_win)]
    feats.append(ref_visual(sd, cfg, views[n_win:], None))
    feats = torch.cat(feats, dim=1)[0].to(x.dtype)
    a, b = ids.index(IMG_START), ids.index(IMG_START + 1)
    x[0, a + 1 : b] = feats
    return x


def ntk_alpha(length, seq_length):
    """The official dynamic-NTK factor, restated here rather than taken from the code under test."""
    return float(max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1))


def ref_greedy(sd, cfg, rows, steps, pad_id=0):
    """Greedy decoding of a left-padded batch as the cached official model does it.

    Args:
        rows: ``(ids, views)`` per row (``views`` None for a text-only row).
        steps: New tokens per row.

    Returns:
        ``[B, steps]`` token ids. One NTK alpha, chosen by the padded prompt length, holds for
        every step (the cache keeps it).
    """
    width = max(len(ids) for ids, _ in rows)
    embeds, mask = [], []
    for ids, views in rows:
        pad = width - len(ids)
        embeds.append(ref_embeds(sd, cfg, [pad_id] * pad + ids, views))
        mask.append([0] * pad + [1] * len(ids))
    x, mask = torch.cat(embeds), torch.tensor(mask)
    alpha = ntk_alpha(width, cfg["seq_length"])
    out = []
    for _ in range(steps):
        nxt = ref_logits(sd, cfg, x, alpha, mask=mask)[:, -1].argmax(-1)
        out.append(nxt)
        x = torch.cat([x, sd["transformer.wte.weight"][nxt][:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
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


@pytest.fixture
def off():
    """The builders and reference functions above."""
    names = ("MERGES NUM_RANKS IMG_START official_config official_state write_official ref_visual ref_logits "
             "ref_embeds ref_greedy prompt_with_image random_views").split()
    return types.SimpleNamespace(**{n: globals()[n] for n in names})
