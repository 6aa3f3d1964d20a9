"""Progressive unfreezing on the real tiny model with real optimizer steps."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from monkeytune.config import get_config
from monkeytune.model import build_model
from monkeytune.policy import (
    PlanError,
    TrainPlan,
    UnfreezeSchedule,
    apply_plan,
    apply_stage,
    build_param_groups,
    trainable_names,
)

STAGES = [
    {"start_step": 2, "rules": ["train: llm.model.layers.1.*"], "lr_multipliers": {"llm": 0.5, "llm_layers": 0.25}},
    {"start_step": 4, "rules": ["freeze: resampler.*", "train: llm.model.norm.weight"]},
]


def _small_tiny():
    """The tiny preset's modules and names (3 ViT blocks with adapters, 2 LLM layers) on 56-pixel
    views with 16 queries, so that the many real optimizer steps below stay fast."""
    cfg = get_config("tiny")
    cfg.image = dataclasses.replace(cfg.image, window_size=56)
    cfg.vision = dataclasses.replace(cfg.vision, n_queries=16)
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.fixture
def tiny():
    return _small_tiny()


def _schedule() -> UnfreezeSchedule:
    return UnfreezeSchedule.from_config(TrainPlan("monkey-fix-llm"), STAGES)


def test_stage_is_a_pure_function_of_step():
    s = _schedule()
    assert [s.stage_at(k).index for k in range(7)] == [-1, -1, 0, 0, 1, 1, 1]
    assert s.stage_at(0).plan.rules == () and s.stage_at(1).lr_multipliers == {}
    # Rules accumulate; multipliers are per stage, an explicit component beats its alias.
    assert [r.text for r in s.stage_at(5).plan.rules] == [
        "train: llm.model.layers.1.*", "freeze: resampler.*", "train: llm.model.norm.weight"]
    m = s.stage_at(3).lr_multipliers
    assert m["llm_layers"] == 0.25 and m["embeddings"] == 0.5 and "resampler" not in m
    assert s.stage_at(4).lr_multipliers == {}
    assert s.stage_at(3) == s.stage_at(3)


@pytest.mark.parametrize("bad, match", [
    ([{"start_step": "2"}], r"unfreeze\[0\]\.start_step must be an integer"),
    ([{"start_step": 1, "rules": ["train: x"]}, {"start_step": 1}], "same step"),
    ([{"start_step": 1, "lr_multipliers": {"llmm": 2}}], "unknown component 'llmm'"),
    ([{"start_step": 1, "unfreeze": []}], "unknown keys"),
    ([{"start_step": 1, "at": 1}], "not both"),
    ([{"at": 1, "train": [3]}], r"unfreeze\[0\]\.train must be a pattern"),
])
def test_bad_schedules(bad, match):
    with pytest.raises(PlanError, match=match):
        UnfreezeSchedule.from_config(TrainPlan("monkey"), bad)


def test_stage_shorthand():
    a = UnfreezeSchedule.from_config(TrainPlan("monkey"), [
        {"at": 3, "rules": ["freeze: llm.*"], "train": ["llm.model.norm.*", "llm.lm_head.*"], "freeze": "*.bias"}])
    assert a.stages[0].start_step == 3
    assert [r.text for r in a.stage_at(3).plan.rules] == [
        "freeze: llm.*", "train: llm.model.norm.*", "train: llm.lm_head.*", "freeze: *.bias"]
    assert a.stages[0].rules[1].where == "unfreeze[0].train[0]"


def test_validate_reports_stage_rules_matching_nothing(tiny):
    s = UnfreezeSchedule.from_config(TrainPlan("monkey-fix-llm"), [{"start_step": 3, "rules": ["train: llm.model.layers.7.*"]}])
    with pytest.raises(PlanError, match=r"unfreeze\[0\]\.rules\[0\].*llm\.model\.layers\.\{0-1\}"):
        s.validate(tiny)


def _setup(model):
    apply_plan(model, TrainPlan("monkey-fix-llm"))
    groups = build_param_groups(model, {"adapters": 1e-2, "resampler": 1e-2, "llm": 1e-2}, 0.1, include_frozen=True)
    opt = torch.optim.AdamW(groups)
    # Linear warmup over 4 steps: the stage multiplier must compose with the scheduler's factor.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 4))
    return opt, sched


def _train(model, opt, sched, schedule, steps, batch_fn):
    for step in steps:
        apply_stage(model, opt, schedule.stage_at(step), sched)
        torch.manual_seed(step)  # adapter dropout draws the same masks in every run
        model(**batch_fn(model, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def test_stages_change_which_weights_move(tiny, make_batch):
    schedule = _schedule()
    opt, sched = _setup(tiny)
    params = dict(tiny.named_parameters())
    watch = ["llm.model.layers.1.mlp.up_proj.weight", "llm.model.layers.0.mlp.up_proj.weight",
             "resampler.query", "llm.model.norm.weight", "vision.blocks.0.attn.qkv.weight"]
    snap = lambda: {n: params[n].detach().clone() for n in watch}  # noqa: E731
    history = [snap()]
    for step in range(6):
        _train(tiny, opt, sched, schedule, [step], make_batch)
        history.append(snap())
    moved = lambda n, k: not torch.equal(history[k][n], history[k + 1][n])  # noqa: E731  (during step k)
    layer1, layer0, query, norm, vit = watch
    assert [moved(layer1, k) for k in range(6)] == [False, False, True, True, True, True]
    assert [moved(query, k) for k in range(6)] == [True, True, True, True, False, False]
    assert [moved(norm, k) for k in range(6)] == [False, False, False, False, True, True]
    assert not any(moved(layer0, k) or moved(vit, k) for k in range(6))
    # Freezing dropped the resampler's gradients, so nothing (weight decay included) touches it.
    assert params["resampler.query"].grad is None
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["llm_layers"]["lr"] == pytest.approx(1e-2)  # stage 1: multipliers back to 1, warmup done
    apply_stage(tiny, opt, schedule.stage_at(3), sched)
    assert groups["llm_layers"]["lr"] == pytest.approx(1e-2 * 0.25)
    assert groups["embeddings"]["lr"] == pytest.approx(1e-2 * 0.5) and groups["resampler"]["lr"] == pytest.approx(1e-2)


def test_resume_in_the_middle_of_a_stage(make_batch):
    base = _small_tiny()
    schedule = _schedule()
    # Uninterrupted run of 4 steps.
    a = copy.deepcopy(base)
    opt_a, sched_a = _setup(a)
    _train(a, opt_a, sched_a, schedule, range(4), make_batch)
    # 3 steps, checkpoint, fresh objects, resume at step 3 (inside stage 0).
    b = copy.deepcopy(base)
    opt_b, sched_b = _setup(b)
    _train(b, opt_b, sched_b, schedule, range(3), make_batch)
    ckpt = copy.deepcopy({"model": b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()})
    c = copy.deepcopy(base)
    opt_c, sched_c = _setup(c)
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    _train(c, opt_c, sched_c, schedule, [3], make_batch)
    assert trainable_names(c) == trainable_names(a)
    for (n, pa), (_, pc) in zip(a.named_parameters(), c.named_parameters()):
        torch.testing.assert_close(pa, pc, rtol=0, atol=0, msg=n)
    assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_c.param_groups]


def test_optimizer_must_hold_parameters_a_stage_unfreezes(tiny):
    apply_plan(tiny, TrainPlan("monkey-fix-llm"))
    opt = torch.optim.AdamW(build_param_groups(tiny, {"default": 1e-3}))  # trainable only
    with pytest.raises(PlanError, match=r"include_frozen=True"):
        apply_stage(tiny, opt, _schedule().stage_at(2))
