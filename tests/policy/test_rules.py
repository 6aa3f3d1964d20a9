"""Rule syntax, matching and precedence."""

from __future__ import annotations

import re

import pytest

from monkeytune.policy import PlanError, TrainPlan, apply_plan, glob_to_regex, parse_rule, resolve_plan, trainable_names
from monkeytune.policy.rules import close_names, summarize_names


def _match(pattern: str, name: str) -> bool:
    return re.fullmatch(glob_to_regex(pattern), name) is not None


def test_glob_ranges_alternatives_and_classes():
    assert _match("llm.model.layers.{24-31}.*", "llm.model.layers.24.mlp.up_proj.weight")
    assert _match("llm.model.layers.{24-31}.*", "llm.model.layers.31.self_attn.q_proj.weight")
    assert not _match("llm.model.layers.{24-31}.*", "llm.model.layers.3.mlp.up_proj.weight")
    assert not _match("llm.model.layers.{24-31}.*", "llm.model.layers.240.mlp.up_proj.weight")
    assert _match("*.self_attn.{q,k}_proj.*", "llm.model.layers.0.self_attn.k_proj.bias")
    assert not _match("*.self_attn.{q,k}_proj.*", "llm.model.layers.0.self_attn.v_proj.bias")
    assert _match("vision.blocks.[!0].ln_?.weight", "vision.blocks.2.ln_1.weight")
    assert not _match("vision.blocks.[!0].ln_?.weight", "vision.blocks.0.ln_1.weight")
    # Dots are literal, '*' crosses dots (fnmatch semantics).
    assert not _match("vision.ln_pre.weight", "visionXln_pre.weight")
    assert _match("vision.*.lora_a", "vision.blocks.0.lora_qkv.lora_a")


@pytest.mark.parametrize("bad", ["train llm.*", "unfreeze: llm.*", {"train": "a", "freeze": "b"}, {"trian": "x"},
                                 {"train": 3}, "train: llm.{a-b}.x", "train: llm.{31-24}.*", "train: re:(", 7])
def test_bad_rules_are_rejected_with_location(bad):
    with pytest.raises(PlanError, match=r"policy\.rules\[0\]"):
        TrainPlan.from_config({"preset": "monkey", "rules": [bad]})


def test_rule_forms_are_equivalent():
    a = parse_rule("train: vision.* & *lora* & !*lora_mlp*")
    b = parse_rule({"train": ["vision.*", "*lora*", "!*lora_mlp*"]})
    c = parse_rule({"action": "train", "pattern": ["vision.*", "*lora*", "!*lora_mlp*"]})
    assert a.patterns == b.patterns == c.patterns and a.action == b.action == c.action == "train"
    assert parse_rule(a.to_data()).patterns == a.patterns


def test_last_matching_rule_wins_and_unmatched_keep_default(tiny):
    plan = TrainPlan.from_config({
        "preset": "monkey-fix-llm",
        "rules": [
            "train: llm.model.layers.*",
            "freeze: llm.model.layers.0.*",
            "train: llm.model.layers.0.mlp.up_proj.weight",
        ],
    })
    decisions = {d.name: d for d in apply_plan(tiny, plan)}
    names = set(trainable_names(tiny))
    assert "llm.model.layers.1.mlp.down_proj.weight" in names
    assert "llm.model.layers.0.mlp.down_proj.weight" not in names
    assert "llm.model.layers.0.mlp.up_proj.weight" in names
    assert decisions["llm.model.layers.0.mlp.up_proj.weight"].decided_by == (
        "policy.rules[2]: train: llm.model.layers.0.mlp.up_proj.weight")
    assert decisions["llm.model.layers.0.self_attn.q_proj.weight"].decided_by.startswith("policy.rules[1]")
    assert decisions["resampler.query"].decided_by == "preset default" and decisions["resampler.query"].trainable
    assert decisions["llm.model.embed_tokens.weight"].decided_by == "preset default"
    assert not decisions["llm.model.embed_tokens.weight"].trainable
    # requires_grad follows the decisions exactly.
    assert {n for n, p in tiny.named_parameters() if p.requires_grad} == {n for n, d in decisions.items() if d.trainable}


def test_combined_conditions_and_component_filter(tiny):
    # LoRA inside the vision tower only, except the MLP adapters.
    apply_plan(tiny, TrainPlan.from_config({"preset": "full", "rules": [
        "freeze: *", {"train": ["vision.*", "*lora*", "!*lora_mlp*"]}]}))
    names = trainable_names(tiny)
    assert names and all(n.startswith("vision.blocks.") and ("lora_qkv" in n or "lora_proj" in n) for n in names)
    assert len(names) == 3 * 2 * 3  # blocks x adapters x (lora_a, lora_b, lora_scale)
    # A component condition restricts a broad pattern.
    apply_plan(tiny, TrainPlan.from_config({"preset": "monkey-fix-llm", "rules": [
        {"freeze": "*.bias", "component": "resampler"}, {"train": "*norm*", "component": "llm"}]}))
    names = set(trainable_names(tiny))
    assert "resampler.attn.q_proj.bias" not in names and "resampler.attn.q_proj.weight" in names
    assert "llm.model.norm.weight" in names and "llm.model.layers.1.input_layernorm.weight" in names
    assert "vision.blocks.0.lora_qkv.lora_scale" in names  # vision not touched by the llm condition


def test_regex_rules_match_whole_names(tiny):
    apply_plan(tiny, TrainPlan.from_config({"preset": "monkey-fix-llm", "rules": [r"train: re:llm\.model\.layers\.(1)\..*"]}))
    llm = [n for n in trainable_names(tiny) if n.startswith("llm.")]
    assert llm and all(n.startswith("llm.model.layers.1.") for n in llm)
    with pytest.raises(PlanError, match="matches no parameter"):
        # fullmatch: a fragment alone matches nothing.
        resolve_plan(tiny, TrainPlan.from_config({"preset": "monkey", "rules": [r"train: re:layers\.1"]}))


def test_unmatched_rule_error_lists_close_names(tiny):
    plan = TrainPlan.from_config({"preset": "monkey", "rules": [
        "train: llm.model.layers.{24-31}.*", "freeze: vision.blocks.*.lora_qvk*", "train: resampler.*"]})
    with pytest.raises(PlanError) as err:
        apply_plan(tiny, plan)
    msg = str(err.value)
    assert "policy.rules[0]" in msg and "policy.rules[1]" in msg and "policy.rules[2]" not in msg
    assert "llm.model.layers.{0-1}." in msg  # the layers that do exist
    assert "vision.blocks.{0-2}.lora_qkv.lora_a" in msg
    # Nothing was changed by the failed apply.
    assert all(p.requires_grad for p in tiny.parameters())


def test_plan_leaving_nothing_trainable_is_an_error(tiny):
    with pytest.raises(PlanError, match="leaves no parameter trainable"):
        apply_plan(tiny, TrainPlan.from_config({"preset": "lora-only", "rules": ["freeze: *lora*"]}))


def test_unknown_preset_and_keys():
    with pytest.raises(PlanError, match="unknown policy preset 'monky'"):
        TrainPlan.from_config("monky")
    with pytest.raises(PlanError, match="unknown keys"):
        TrainPlan.from_config({"preset": "monkey", "rulez": []})


def test_summarize_and_close_names():
    names = [f"llm.model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 2, 5)] + ["llm.lm_head.weight"]
    assert summarize_names(names) == ["llm.model.layers.{0,1,2,5}.mlp.up_proj.weight", "llm.lm_head.weight"]
    assert close_names("llm.model.layer.*.mlp.up_proj.*", names)[0] == "llm.model.layers.{0,1,2,5}.mlp.up_proj.weight"


def test_plan_round_trips_through_plain_data(tmp_path):
    plan = TrainPlan.from_config({"preset": "llm-lora", "rules": ["train: llm.model.layers.{0-1}.*lora*"],
                                  "lora": {"r": 4}})
    again = TrainPlan.from_config(plan.to_dict())
    assert again.preset == plan.preset and again.lora == {"r": 4}
    assert [r.text for r in again.rules] == [r.text for r in plan.rules]
    f = tmp_path / "train.yaml"
    f.write_text("policy:\n  preset: monkey-fix-llm\n  rules:\n    - 'train: llm.model.norm.*'\n    - {freeze: x, bogus: 1}\n")
    with pytest.raises(PlanError, match=r"train\.yaml: policy\.rules\[1\]: unknown rule keys \['bogus'\]"):
        TrainPlan.from_file(f)
