"""llm-qlora trains on a CPU through bitsandbytes' CPU backend: real 4-bit layers, real steps."""

from __future__ import annotations

import sys

import pytest
import torch

from monkeytune.policy import PlanError, TrainPlan, apply_plan
from monkeytune.train.loop import train
from monkeytune.train.setup import load_model_and_tokenizer

bnb = pytest.importorskip("bitsandbytes")


def four_bit(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}


VIT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@pytest.mark.parametrize("precision,checkpointing", [("fp32", []), ("bf16", ["llm", "vit"])])
def test_qlora_steps_move_lora_and_leave_the_4bit_base(make_config, precision, checkpointing):
    cfg = make_config(f"qlora-{precision}", policy={"preset": "llm-qlora", "lora": {"r": 4}},
                      train={"max_steps": 3, "precision": precision, "gradient_checkpointing": checkpointing},
                      optim={"lr": 1e-2})
    # The same seed builds and quantises the same start the run begins from.
    start, _ = load_model_and_tokenizer(cfg)
    apply_plan(start, TrainPlan.from_config({"preset": "llm-qlora", "lora": {"r": 4}}))
    base = four_bit(start)
    # q/k/v/o and gate/up/down of both LLM layers, qkv/proj/fc/proj of the one ViT block.
    assert len(base) == 2 * 7 + 4
    assert {f"vision.blocks.0.{p}.weight" for p in VIT_LINEARS} <= set(base)
    assert all(t.dtype == torch.uint8 for t in base.values())
    block = start.vision.blocks[0]
    for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.blocksize == 64
        assert layer.weight.quant_state.nested and layer.compute_dtype == torch.bfloat16
    # What stays full precision: the patch embedding, norms, positions, resampler, adapters.
    assert start.vision.patch_embed.weight.is_floating_point() and start.vision.pos_embed.is_floating_point()
    assert all(p.is_floating_point() for n, p in start.named_parameters() if n.startswith("resampler."))
    lora = {n: p.detach().clone() for n, p in start.named_parameters()
            if ("lora_" in n and n.startswith("llm.")) or (".lora_" in n and n.startswith("vision."))}
    assert sum(n.startswith("vision.") for n in lora) == 3 * 3  # lora_a, lora_b, lora_scale of three adapters

    result = train(cfg)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    after = dict(result.model.named_parameters())
    for n, t in base.items():
        assert isinstance(after[n], bnb.nn.Params4bit) and not after[n].requires_grad
        assert torch.equal(after[n], t), n
    moved = [n for n, t in lora.items() if not torch.equal(after[n].detach().to(t.dtype), t)]
    assert sorted(moved) == sorted(lora)  # every LLM LoRA matrix and every per-window adapter tensor trained


def test_qlora_leaves_vit_layers_that_train_unquantised():
    """A ViT projection a rule, or a later unfreezing stage, trains stays nn.Linear; the estimate agrees."""
    from monkeytune.config import get_config
    from monkeytune.memory import summarize
    from monkeytune.model import build_model
    from monkeytune.policy import DEFAULT_LLM_LORA, UnfreezeSchedule, plan_report

    cfg = get_config("tiny")
    plan = TrainPlan("llm-qlora").with_rules(["train: vision.blocks.0.mlp.fc.weight"], where="test")
    schedule = UnfreezeSchedule.from_config(plan, [{"at": 5, "train": ["vision.blocks.2.attn.*"]}])
    torch.manual_seed(0)
    model = build_model(cfg)
    schedule.validate(model)  # what training does first: the one quantisation, every stage known
    apply_plan(model, plan)
    blocks = model.vision.blocks
    kept = [blocks[0].mlp.fc, blocks[2].attn.qkv, blocks[2].attn.proj]
    assert all(type(layer) is torch.nn.Linear for layer in kept)
    assert blocks[0].mlp.fc.weight.requires_grad and not blocks[2].attn.qkv.weight.requires_grad
    four = [n for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit) and n.startswith("vision.")]
    assert len(four) == 3 * 4 - 3
    apply_plan(model, schedule.stage_at(5).plan)  # the stage trains what was kept full precision
    assert blocks[2].attn.qkv.weight.requires_grad and isinstance(blocks[2].mlp.fc, bnb.nn.Linear4bit)
    # The estimate (meta device, base plan) counts the rule-trained layer as full precision too.
    with torch.device("meta"):
        s = summarize(plan_report(build_model(cfg), plan).decisions, cfg, DEFAULT_LLM_LORA["target_modules"])
    w, m = cfg.vision.width, cfg.vision.mlp_width
    vit = cfg.vision.layers * (4 * w * w + 2 * w * m) - w * m
    h, f = cfg.llm.hidden_size, cfg.llm.intermediate_size
    assert s.quantized == cfg.llm.num_layers * (4 * h * h + 3 * h * f) + vit


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch):
    from monkeytune.config import get_config
    from monkeytune.model import build_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an installation without it looks like
    torch.manual_seed(0)
    with pytest.raises(PlanError, match="llm-qlora needs 4-bit bitsandbytes kernels: the bitsandbytes package is "
                       "not installed .* Use preset llm-lora"):
        apply_plan(build_model(get_config("tiny")), TrainPlan("llm-qlora"))
