"""Optimizer param groups: lr per component, weight-decay exclusions, frozen params under AdamW."""

from __future__ import annotations

import pytest
import torch

from monkeytune.policy import PlanError, TrainPlan, apply_plan, build_param_groups, component_of

LRS = {"adapters": 1e-4, "resampler": 2e-4, "llm": 1e-5}



def test_groups_by_component_and_decay(tiny):
    apply_plan(tiny, TrainPlan("monkey"))
    groups = build_param_groups(tiny, LRS, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == [
        "vision_adapters", "vision_adapters.no_decay", "resampler", "resampler.no_decay",
        "llm_layers", "llm_layers.no_decay", "embeddings", "lm_head", "final_norm.no_decay"]
    assert by_name["vision_adapters"]["lr"] == by_name["vision_adapters"]["base_lr"] == 1e-4
    assert by_name["resampler"]["lr"] == 2e-4 and by_name["llm_layers"]["lr"] == 1e-5
    params = dict(tiny.named_parameters())
    where = {id(p): g for g in groups for p in g["params"]}
    # Norms, biases, adapter gains and 1-D tensors get no decay; matrices do.
    for name in ("vision.blocks.0.lora_qkv.lora_scale", "resampler.ln_post.weight", "resampler.attn.q_proj.bias",
                 "llm.model.layers.1.input_layernorm.weight", "llm.model.layers.0.self_attn.q_proj.bias"):
        assert where[id(params[name])]["weight_decay"] == 0.0, name
    for name in ("vision.blocks.0.lora_qkv.lora_a", "resampler.query", "llm.model.layers.0.mlp.up_proj.weight",
                 "llm.lm_head.weight"):
        assert where[id(params[name])]["weight_decay"] == 0.1, name
    # Every trainable parameter is in exactly one group; frozen ones in none.
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in tiny.parameters() if p.requires_grad)
    assert all(g["component"] == component_of(next(n for n, p in tiny.named_parameters() if p is g["params"][0]))
               for g in groups)


def test_lr_precedence_and_errors(tiny):
    apply_plan(tiny, TrainPlan("full"))
    groups = build_param_groups(tiny, {"llm": 1e-5, "lm_head": 3e-5, "default": 1e-3})
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["lm_head"] == 3e-5 and lr["llm_layers"] == 1e-5 and lr["vision_tower"] == 1e-3
    with pytest.raises(PlanError, match=r"no learning rate for \['vision_tower'\]"):
        build_param_groups(tiny, LRS)
    with pytest.raises(PlanError, match="unknown keys"):
        build_param_groups(tiny, {"default": 1e-4, "visoin": 1e-4})


def test_adamw_does_not_move_frozen_params_in_its_groups(tiny, make_batch):
    apply_plan(tiny, TrainPlan("monkey-fix-llm"))
    groups = build_param_groups(tiny, {"default": 1e-2}, weight_decay=0.5, include_frozen=True)
    assert sum(len(g["params"]) for g in groups) == len(list(tiny.parameters()))
    opt = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    for _ in range(2):
        tiny(**make_batch(tiny)).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in tiny.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} should have moved"
        else:
            # grad None -> AdamW skips the parameter, weight decay included.
            assert torch.equal(p, before[n]), f"{n} is frozen but moved"
            assert p not in opt.state
