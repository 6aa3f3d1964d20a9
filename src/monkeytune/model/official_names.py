"""Tensor-name map between official Monkey / Qwen-VL checkpoints and :class:`MonkeyForCausalLM`.

Official (left) and monkeytune (right) names, ``i`` a layer, ``k`` a window adapter::

    transformer.wte.weight                     llm.model.embed_tokens.weight
    transformer.h.i.ln_1.weight                llm.model.layers.i.input_layernorm.weight
    transformer.h.i.attn.c_attn.{weight,bias}  llm.model.layers.i.self_attn.{q,k,v}_proj (rows split in 3)
    transformer.h.i.attn.c_proj.weight         llm.model.layers.i.self_attn.o_proj.weight
    transformer.h.i.ln_2.weight                llm.model.layers.i.post_attention_layernorm.weight
    transformer.h.i.mlp.w2.weight              llm.model.layers.i.mlp.gate_proj.weight  (w1(x) * silu(w2(x)))
    transformer.h.i.mlp.w1.weight              llm.model.layers.i.mlp.up_proj.weight
    transformer.h.i.mlp.c_proj.weight          llm.model.layers.i.mlp.down_proj.weight
    transformer.ln_f.weight                    llm.model.norm.weight
    lm_head.weight                             llm.lm_head.weight
    transformer.visual.conv1.weight            vision.patch_embed.weight
    transformer.visual.positional_embedding    vision.pos_embed
    transformer.visual.ln_pre.*                vision.ln_pre.*
    ...transformer.resblocks.i.ln_1/ln_2.*     vision.blocks.i.ln_1/ln_2.*
    ...resblocks.i.attn.in_proj.*              vision.blocks.i.attn.qkv.*
    ...resblocks.i.attn.out_proj.*             vision.blocks.i.attn.proj.*
    ...resblocks.i.mlp.c_fc.* / mlp.c_proj.*   vision.blocks.i.mlp.fc.* / mlp.proj.*
    ...resblocks.i.attn.in_proj_lora.k.*       vision.blocks.i.lora_qkv.* [k]   (lora_a, lora_b, lora_scale)
    ...resblocks.i.attn.out_proj_lora.k.*      vision.blocks.i.lora_proj.* [k]
    ...resblocks.i.mlp_lora.k.*                vision.blocks.i.lora_mlp.* [k]
    transformer.visual.attn_pool.{query,pos_embed,kv_proj.weight,ln_q.*,ln_kv.*}
                                               resampler.{same}
    transformer.visual.attn_pool.attn.in_proj_{weight,bias}
                                               resampler.attn.{q,k,v}_proj.{weight,bias} (rows split in 3)
    transformer.visual.attn_pool.attn.out_proj.*   resampler.attn.out_proj.*
    transformer.visual.ln_post.*, .proj        resampler.ln_post.*, resampler.proj

Every conversion is a split, a concatenation, a stack or an unstack of whole rows, so converting
back and forth is bitwise lossless.
"""

from __future__ import annotations

import re

import torch

from monkeytune.config import ModelConfig

# Keys the official loader itself ignores (a recomputed rotary table, a constant mask bias).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)attn\.masked_bias$")
V = "transformer.visual."
LORA_LISTS = (("attn.in_proj_lora", "lora_qkv"), ("attn.out_proj_lora", "lora_proj"), ("mlp_lora", "lora_mlp"))


class NameMapError(ValueError):
    """Keys missing from / unexpected in an official state dict; both lists are in the message."""

    def __init__(self, missing: list[str], unexpected: list[str], where: str):
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)

        def show(names: list[str]) -> str:
            return ", ".join(names[:12]) + (f" ... (+{len(names) - 12} more)" if len(names) > 12 else "")

        parts = []
        if self.missing:
            parts.append(f"missing keys: {show(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys: {show(self.unexpected)}")
        super().__init__(f"{where}: " + "; ".join(parts))


def one_to_one(cfg: ModelConfig) -> list[tuple[str, str]]:
    """``(official, monkeytune)`` pairs of tensors that map unchanged."""
    pairs = [
        ("transformer.wte.weight", "llm.model.embed_tokens.weight"),
        ("transformer.ln_f.weight", "llm.model.norm.weight"),
        ("lm_head.weight", "llm.lm_head.weight"),
        (V + "conv1.weight", "vision.patch_embed.weight"),
        (V + "positional_embedding", "vision.pos_embed"),
        (V + "ln_post.weight", "resampler.ln_post.weight"),
        (V + "ln_post.bias", "resampler.ln_post.bias"),
        (V + "proj", "resampler.proj"),
        (V + "attn_pool.query", "resampler.query"),
        (V + "attn_pool.pos_embed", "resampler.pos_embed"),
        (V + "attn_pool.attn.out_proj.weight", "resampler.attn.out_proj.weight"),
        (V + "attn_pool.attn.out_proj.bias", "resampler.attn.out_proj.bias"),
    ]
    for ln in ("ln_pre", "attn_pool.ln_q", "attn_pool.ln_kv"):
        ours = ln.replace("attn_pool.", "resampler.") if "attn_pool" in ln else f"vision.{ln}"
        pairs += [(f"{V}{ln}.weight", f"{ours}.weight"), (f"{V}{ln}.bias", f"{ours}.bias")]
    if cfg.vision.width != cfg.vision.output_dim:
        pairs.append((V + "attn_pool.kv_proj.weight", "resampler.kv_proj.weight"))
    for i in range(cfg.llm.num_layers):
        o, m = f"transformer.h.{i}.", f"llm.model.layers.{i}."
        pairs += [
            (o + "ln_1.weight", m + "input_layernorm.weight"),
            (o + "attn.c_proj.weight", m + "self_attn.o_proj.weight"),
            (o + "ln_2.weight", m + "post_attention_layernorm.weight"),
            (o + "mlp.w2.weight", m + "mlp.gate_proj.weight"),
            (o + "mlp.w1.weight", m + "mlp.up_proj.weight"),
            (o + "mlp.c_proj.weight", m + "mlp.down_proj.weight"),
        ]
    for i in range(cfg.vision.layers):
        o, m = f"{V}transformer.resblocks.{i}.", f"vision.blocks.{i}."
        for a, b in (("ln_1", "ln_1"), ("ln_2", "ln_2"), ("attn.in_proj", "attn.qkv"), ("attn.out_proj", "attn.proj"),
                     ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            pairs += [(f"{o}{a}.weight", f"{m}{b}.weight"), (f"{o}{a}.bias", f"{m}{b}.bias")]
    return pairs


def fused_triples(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """``(official fused q/k/v tensor, [q, k, v] monkeytune tensors)``: rows split in three equal parts."""
    out = []
    for i in range(cfg.llm.num_layers):
        o, m = f"transformer.h.{i}.attn.c_attn.", f"llm.model.layers.{i}.self_attn."
        for s in ("weight", "bias"):
            out.append((o + s, [f"{m}{p}_proj.{s}" for p in "qkv"]))
    for s in ("weight", "bias"):
        out.append((f"{V}attn_pool.attn.in_proj_{s}", [f"resampler.attn.{p}_proj.{s}" for p in "qkv"]))
    return out


def lora_groups(cfg: ModelConfig) -> list[tuple[list[str], str]]:
    """``([official per-slot tensors], stacked monkeytune tensor)`` for every window adapter."""
    out: list[tuple[list[str], str]] = []
    if cfg.vision.lora_slots == 0:
        return out
    for i in range(cfg.vision.layers):
        o, m = f"{V}transformer.resblocks.{i}.", f"vision.blocks.{i}."
        for off, ours in LORA_LISTS:
            for leaf_o, leaf_m in (("lora_a.weight", "lora_a"), ("lora_b.weight", "lora_b"), ("lora_scale", "lora_scale")):
                names = [f"{o}{off}.{k}.{leaf_o}" for k in range(cfg.vision.lora_slots)]
                out.append((names, f"{m}{ours}.{leaf_m}"))
    return out


def from_official(src: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Official-named tensors -> monkeytune names.

    Raises:
        NameMapError: listing official keys that are missing and keys that are not expected
            (after dropping the ones the official loader ignores).
        ValueError: a fused tensor whose rows do not split in three.
    """
    rest = {k: v for k, v in src.items() if not IGNORED.search(k)}
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []

    def take(name: str) -> torch.Tensor | None:
        if name in rest:
            return rest.pop(name)
        missing.append(name)
        return None

    for off, ours in one_to_one(cfg):
        t = take(off)
        if t is not None:
            out[ours] = t
    for off, parts in fused_triples(cfg):
        t = take(off)
        if t is None:
            continue
        if t.shape[0] % 3:
            raise ValueError(f"{where}: {off} has {t.shape[0]} rows, not a multiple of 3 (fused q/k/v)")
        out.update(zip(parts, t.split(t.shape[0] // 3, dim=0)))
    for names, ours in lora_groups(cfg):
        tensors = [take(n) for n in names]
        if any(t is None for t in tensors):
            continue
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"{where}: the adapters {names[0]} .. {names[-1]} have different shapes {sorted(shapes)}")
        out[ours] = torch.cat(tensors) if ours.endswith("lora_scale") else torch.stack(tensors)
    if missing or rest:
        raise NameMapError(missing, list(rest), where)
    return out


def to_official(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """monkeytune-named tensors -> official names (the inverse of :func:`from_official`).

    Raises:
        KeyError: naming monkeytune tensors the state dict lacks.
    """
    missing = [k for k in _needed(cfg) if k not in state]
    if missing:
        raise KeyError(f"the model state lacks tensors needed for export: {', '.join(sorted(missing)[:12])}")
    out: dict[str, torch.Tensor] = {}
    for off, ours in one_to_one(cfg):
        out[off] = state[ours]
    for off, parts in fused_triples(cfg):
        out[off] = torch.cat([state[p] for p in parts], dim=0)
    for names, ours in lora_groups(cfg):
        stacked = state[ours]
        for k, name in enumerate(names):
            out[name] = stacked[k : k + 1] if ours.endswith("lora_scale") else stacked[k]
    return out


def _needed(cfg: ModelConfig) -> list[str]:
    names = [m for _, m in one_to_one(cfg)]
    names += [p for _, parts in fused_triples(cfg) for p in parts]
    names += [m for _, m in lora_groups(cfg)]
    return names
