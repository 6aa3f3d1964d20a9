"""Presets on the real tiny model: exact trainable names and counts, reports, peft names."""

from __future__ import annotations

import json

import pytest
import torch

from monkeytune.config import get_config
from monkeytune.model import build_model
from monkeytune.policy import (
    PlanError,
    TrainPlan,
    apply_plan,
    canonical_name,
    component_of,
    plan_report,
    trainable_names,
)

# tiny: ViT width 96, 3 blocks, 4 slots, ranks 8 (attn) / 16 (MLP); resampler 64 queries of
# width 128; LLM hidden 128, 2 layers, MLP 344, vocab 1024, untied head.
BLOCKS, LAYERS = range(3), range(2)
ADAPTERS = {f"vision.blocks.{i}.{a}.{t}" for i in BLOCKS for a in ("lora_qkv", "lora_proj", "lora_mlp")
            for t in ("lora_a", "lora_b", "lora_scale")}
RESAMPLER = {"resampler.query", "resampler.proj", "resampler.kv_proj.weight"} | {
    f"resampler.{n}.{t}" for n in ("ln_q", "ln_kv", "ln_post") for t in ("weight", "bias")} | {
    f"resampler.attn.{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for t in ("weight", "bias")}
LLM_LAYERS = {f"llm.model.layers.{i}.{n}" for i in LAYERS for n in (
    *(f"self_attn.{p}_proj.weight" for p in "qkvo"), *(f"self_attn.{p}_proj.bias" for p in "qkv"),
    *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "input_layernorm.weight", "post_attention_layernorm.weight")}
LLM_REST = {"llm.model.embed_tokens.weight", "llm.model.norm.weight", "llm.lm_head.weight"}
# Per block: K * (r*in + out*r + 1) for qkv (96 -> 288, r 8), proj (96 -> 96, r 8), mlp (96 -> 96, r 16).
ADAPTER_COUNT = 3 * 4 * ((8 * 96 + 288 * 8 + 1) + (8 * 96 + 96 * 8 + 1) + (16 * 96 + 96 * 16 + 1))
# query 64x128, proj 128x128, kv_proj 96->128, three LayerNorms of 128, four 128x128 projections with bias.
RESAMPLER_COUNT = 64 * 128 + 128 * 128 + 96 * 128 + 3 * 256 + 4 * (128 * 128 + 128)
LLM_COUNT = 2 * (4 * 128 * 128 + 3 * 128 + 3 * 128 * 344 + 2 * 128) + 2 * 1024 * 128 + 128


def test_monkey_preset(tiny):
    apply_plan(tiny, TrainPlan("monkey"))
    assert set(trainable_names(tiny)) == ADAPTERS | RESAMPLER | LLM_LAYERS | LLM_REST
    report = plan_report(tiny, TrainPlan("monkey"))
    assert report.trainable == ADAPTER_COUNT + RESAMPLER_COUNT + LLM_COUNT
    assert report.row("vision_tower").trainable == 0 and report.row("vision_tower").params > 0


def test_monkey_fix_llm_preset(tiny):
    apply_plan(tiny, TrainPlan("monkey-fix-llm"))
    assert set(trainable_names(tiny)) == ADAPTERS | RESAMPLER
    assert plan_report(tiny, TrainPlan("monkey-fix-llm")).trainable == ADAPTER_COUNT + RESAMPLER_COUNT == 195_876


def test_lora_only_and_full_presets(tiny):
    apply_plan(tiny, TrainPlan("lora-only"))
    assert set(trainable_names(tiny)) == ADAPTERS
    assert sum(p.numel() for p in tiny.parameters() if p.requires_grad) == ADAPTER_COUNT
    apply_plan(tiny, TrainPlan("full"))
    assert set(trainable_names(tiny)) == {n for n, _ in tiny.named_parameters()}


def test_llm_lora_preset_names_and_training(tiny, make_batch):
    plan = TrainPlan.from_config({"preset": "llm-lora", "lora": {"r": 4, "alpha": 8}})
    apply_plan(tiny, plan)
    apply_plan(tiny, plan)  # idempotent: LoRA is added once
    lora = {f"llm.base_model.model.model.layers.{i}.{m}.{ab}.default.weight" for i in LAYERS
            for m in (*(f"self_attn.{p}_proj" for p in "qkvo"), *(f"mlp.{p}_proj" for p in ("gate", "up", "down")))
            for ab in ("lora_A", "lora_B")}
    assert set(trainable_names(tiny)) == ADAPTERS | RESAMPLER | lora
    # Base weights under peft's prefixes classify and canonicalise like the bare model's.
    base = "llm.base_model.model.model.layers.1.mlp.up_proj.base_layer.weight"
    assert canonical_name(base) == "llm.model.layers.1.mlp.up_proj.weight" and component_of(base) == "llm_layers"
    assert component_of("llm.base_model.model.lm_head.weight") == "lm_head"
    report = plan_report(tiny, plan)
    # rank 4: A [4, in] + B [out, 4] per projection; q,k,v,o are 128x128, gate/up 128->344, down 344->128.
    lora_count = 2 * (4 * (4 * 128 + 128 * 4) + 2 * (4 * 128 + 344 * 4) + (4 * 344 + 128 * 4))
    assert report.row("llm_lora").params == report.row("llm_lora").trainable == lora_count
    assert report.row("llm_layers").trainable == 0 and report.row("llm_layers").params == LLM_COUNT - 2 * 1024 * 128 - 128
    # The wrapped model still trains: LoRA B starts at zero, so A gets a gradient from step 2 on.
    opt = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=1e-2)
    frozen_before = {n: p.detach().clone() for n, p in tiny.named_parameters() if not p.requires_grad}
    lora_b = tiny.llm.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight
    for _ in range(2):
        tiny(**make_batch(tiny)).loss.backward()
        assert all(p.grad is None for p in tiny.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
    assert lora_b.abs().sum() > 0
    assert all(torch.equal(p, frozen_before[n]) for n, p in tiny.named_parameters() if n in frozen_before)


def test_rules_written_for_the_bare_model_apply_under_peft(tiny):
    plan = TrainPlan.from_config({"preset": "llm-lora", "lora": {"r": 2},
                                  "rules": ["freeze: llm.model.layers.0.*", "train: llm.model.norm.weight"]})
    apply_plan(tiny, plan)
    names = trainable_names(tiny)
    assert not any(".layers.0." in n for n in names if n.startswith("llm."))
    assert any(".layers.1." in n and "lora_A" in n for n in names)
    assert "llm.base_model.model.model.norm.weight" in names


def test_report_text_json_and_verbose(tiny):
    plan = TrainPlan.from_config({"preset": "monkey-fix-llm", "rules": ["train: llm.model.norm.weight"]})
    report = plan_report(tiny, plan)
    text = report.to_text()
    for label in ("vision tower", "per-window adapters", "resampler", "LLM layers", "embeddings", "LM head", "final norm"):
        assert label in text
    assert f"{ADAPTER_COUNT + RESAMPLER_COUNT + 128:,}" in text
    verbose = report.to_text(verbose=True)
    assert "llm.model.norm.weight" in verbose and "policy.rules[0]: train: llm.model.norm.weight" in verbose
    data = json.loads(json.dumps(report.to_dict(verbose=True)))
    rows = {r["component"]: r for r in data["components"]}
    assert rows["final_norm"] == {"component": "final_norm", "label": "final norm", "params": 128, "trainable": 128,
                                  "percent": 100.0}
    assert rows["vision_adapters"]["trainable"] == ADAPTER_COUNT
    assert data["total"]["trainable"] == ADAPTER_COUNT + RESAMPLER_COUNT + 128
    params = {p["name"]: p for p in data["parameters"]}
    assert params["resampler.query"]["decided_by"] == "preset default" and params["resampler.query"]["shape"] == [64, 128]
    # Reporting does not touch requires_grad.
    assert all(p.requires_grad for p in tiny.parameters())


def test_report_on_meta_monkey_7b():
    with torch.device("meta"):
        model = build_model(get_config("monkey-7b"))
    report = plan_report(model, TrainPlan("monkey-fix-llm"))
    assert report.row("llm_layers").trainable == 0
    assert report.row("embeddings").params == 151936 * 4096
    assert report.trainable == report.row("vision_adapters").params + report.row("resampler").params
