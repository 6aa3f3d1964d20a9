"""Training-memory estimate: model-state accounting per strategy and the activation formula."""

from __future__ import annotations

import pytest
import torch

from monkeytune.config import get_config
from monkeytune.memory import GIB, ParamSummary, activation_bytes, estimate_all, model_state_bytes, summarize
from monkeytune.model import build_model
from monkeytune.policy import TrainPlan, plan_report

S = ParamSummary(total=1000, trainable=400, root_unit=100, largest_block=50, vision_from=0,
                 resampler_grad=True, llm_from=0, llm_lora=False)


def test_model_states_per_precision_and_strategy():
    # DDP mixed precision: the 600 frozen weights held in bf16, the 400 trained ones fp32 masters
    # with fp32 grads, m and v.
    assert model_state_bytes(S, "bf16", "ddp", 4) == (2 * 600 + 4 * 400, 1600, 3200)
    assert model_state_bytes(S, "fp32", "ddp", 4) == (4000, 1600, 3200)
    # DeepSpeed: half-precision module, fp32 master copy with m and v in the optimizer.
    assert model_state_bytes(S, "bf16", "zero1", 4) == (2000, 800, 1200)
    assert model_state_bytes(S, "bf16", "zero2", 4) == (2000, 200, 1200)
    # zero3: sharded half weights plus the gathered root unit and two blocks.
    assert model_state_bytes(S, "bf16", "zero3", 4) == (500 + 2 * (100 + 2 * 50), 200, 1200)
    # fsdp: the DDP row / N (frozen bf16, trained fp32), plus the gathered half units.
    assert model_state_bytes(S, "bf16", "fsdp", 4) == ((2 * 600 + 4 * 400) // 4 + 2 * (100 + 2 * 50), 400, 800)
    assert model_state_bytes(S, "fp32", "fsdp", 4) == model_state_bytes(S, "fp32", "zero3", 4)
    # One GPU: sharding changes nothing but needs no gather buffer.
    assert model_state_bytes(S, "bf16", "zero3", 1) == model_state_bytes(S, "bf16", "zero1", 1) == (2000, 800, 4800)
    with pytest.raises(ValueError, match="strategy"):
        model_state_bytes(S, "bf16", "zero4", 2)
    with pytest.raises(ValueError, match="precision"):
        model_state_bytes(S, "int8", "ddp", 2)


def test_activation_formula_on_tiny_numbers():
    cfg = get_config("tiny")
    # LLM only (nothing upstream trains): 2 layers x (6h + 2kv + 4f) elements per token, bf16.
    s = ParamSummary(1, 1, 0, 0, vision_from=None, resampler_grad=False, llm_from=0, llm_lora=False)
    parts = activation_bytes(s, cfg, batch_size=2, seq_len=100, precision="bf16")
    h, f, tokens = 128, 344, 200
    assert parts["vision"] == 0 and parts["resampler"] == 0
    assert parts["llm"] == tokens * 2 * (6 * h + 2 * h + 4 * f) * 2
    assert parts["loss"] == min(tokens, 128) * 1024 * 12 + tokens * 2 * h * 2
    ck = activation_bytes(s, cfg, batch_size=2, seq_len=100, precision="bf16", checkpointing=True)
    assert ck["llm"] == tokens * 2 * h * 2 + tokens * (6 * h + 2 * h + 4 * f) * 2
    # Vision counted from the first trainable block: 5 views x 256 patches per image.
    s = ParamSummary(1, 1, 0, 0, vision_from=1, resampler_grad=True, llm_from=0, llm_lora=False)
    w, m = 96, 384
    parts = activation_bytes(s, cfg, batch_size=1, seq_len=10, precision="fp32")
    assert parts["vision"] == 5 * 256 * 2 * (10 * w + 2 * m + 2 * 8 + 16) * 4
    assert parts["resampler"] == 5 * 256 * 5 * 128 * 4


def test_summary_follows_the_plan(tiny):
    cfg = get_config("tiny")
    full = summarize(plan_report(tiny, TrainPlan("monkey")).decisions, cfg)
    assert full.vision_from == 0 and full.resampler_grad and full.llm_from == 0
    blocks = [*tiny.vision.blocks, *tiny.llm.model.layers]
    assert full.largest_block == max(sum(p.numel() for p in b.parameters()) for b in blocks)
    late = summarize(plan_report(tiny, TrainPlan.from_config(
        {"preset": "full", "rules": ["freeze: *", "train: llm.model.layers.1.*"]})).decisions, cfg)
    assert late.vision_from is None and not late.resampler_grad and late.llm_from == 1
    assert late.trainable == sum(p.numel() for p in tiny.llm.model.layers[1].parameters())


def test_monkey_7b_estimates_are_ordered_and_plausible():
    cfg = get_config("monkey-7b")
    with torch.device("meta"):
        model = build_model(cfg)
    s = summarize(plan_report(model, TrainPlan("monkey")).decisions, cfg)
    est = {(e.precision, e.strategy): e for e in estimate_all(s, cfg, gpus=8, batch_size=1, seq_len=2048)}
    ddp = est[("bf16", "ddp")]
    # Frozen weights in bf16, trained ones fp32 plus 12 B each (fp32 grads, m, v).
    frozen = s.total - s.trainable
    assert ddp.states == 2 * frozen + 16 * s.trainable and 120.6 < ddp.states / GIB < 120.7
    zero1 = est[("bf16", "zero1")]
    # bf16 weights and grads, fp32 master, m and v sharded over 8 GPUs.
    assert zero1.states == 2 * s.total + 2 * s.trainable + -(-12 * s.trainable // 8)
    totals = [est[("bf16", k)].total for k in ("ddp", "zero1", "zero2", "zero3")]
    assert totals == sorted(totals, reverse=True)
    assert all(e.activations_ckpt < e.activations for e in est.values())
    assert est[("fp32", "ddp")].states == ddp.states + 2 * frozen
    assert est[("bf16", "ddp")].activations < est[("fp32", "ddp")].activations


def test_8bit_adamw_moments():
    from monkeytune.memory import ADAM8BIT_BYTES

    # 400 trained, 100 of them in tensors too small for 8-bit states (fp32 moments).
    s = ParamSummary(total=1000, trainable=400, root_unit=100, largest_block=50, vision_from=0,
                     resampler_grad=True, llm_from=0, llm_lora=False, trainable_small=100)
    assert ADAM8BIT_BYTES == 2 + 8 / 256
    for name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        assert model_state_bytes(s, "bf16", "ddp", 1, name) == (2 * 600 + 4 * 400, 1600, round(300 * ADAM8BIT_BYTES) + 800)
    with pytest.raises(ValueError, match="adamw_bnb_8bit train single-process or under DDP only, not under fsdp"):
        model_state_bytes(s, "bf16", "fsdp", 2, "adamw_bnb_8bit")
    assert [e.strategy for e in estimate_all(s, get_config("tiny"), optim="adamw_bnb_8bit")] == ["ddp"] * 3


def test_nf4_weights_match_bitsandbytes_storage():
    """NF4_BYTES is what a real bitsandbytes Linear4bit stores per weight (CPU backend)."""
    bnb = pytest.importorskip("bitsandbytes")
    from monkeytune.memory import NF4_BYTES

    layer = bnb.nn.Linear4bit(256, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(1024, 256), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantises
    q = layer.weight.quant_state
    assert q.blocksize == 64 and q.nested  # monkeytune quantises with these defaults
    stored = sum(t.numel() * t.element_size() for t in (layer.weight.data, q.absmax, q.state2.absmax))
    assert stored / (1024 * 256) == pytest.approx(NF4_BYTES, rel=1e-6)


def test_qlora_summary_counts_the_lora_targets_as_4bit():
    from monkeytune.memory import NF4_BYTES
    from monkeytune.policy import DEFAULT_LLM_LORA

    cfg = get_config("tiny")
    with torch.device("meta"):
        model = build_model(cfg)
        report = plan_report(model, TrainPlan("llm-qlora"))  # on meta: LoRA added, nothing quantised
    s = summarize(report.decisions, cfg, DEFAULT_LLM_LORA["target_modules"])
    h, f, layers = cfg.llm.hidden_size, cfg.llm.intermediate_size, cfg.llm.num_layers
    w, m = cfg.vision.width, cfg.vision.mlp_width
    # The LLM's LoRA targets and the ViT blocks' qkv, attention output, MLP fc and proj weights.
    assert s.quantized == layers * (4 * h * h + 3 * h * f) + cfg.vision.layers * (4 * w * w + 2 * w * m)
    largest = max(h * f, w * m)
    assert s.largest_quantized == largest
    plain = summarize(report.decisions, cfg)
    w4, _, _ = model_state_bytes(s, "bf16", "ddp", 1)
    w16, _, _ = model_state_bytes(plain, "bf16", "ddp", 1)
    assert w16 - w4 == 2 * s.quantized - round(NF4_BYTES * s.quantized) - 2 * largest
    with pytest.raises(ValueError, match="4-bit weights train single-process or under DDP only, not under zero2"):
        model_state_bytes(s, "bf16", "zero2", 2)


def test_qlora_summary_matches_a_really_quantised_model():
    """What the meta-device estimate counts as 4-bit is what bitsandbytes holds after llm-qlora (CPU backend)."""
    bnb = pytest.importorskip("bitsandbytes")
    from monkeytune.memory import NF4_BYTES
    from monkeytune.policy import DEFAULT_LLM_LORA, apply_plan

    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_plan(model, TrainPlan("llm-qlora"))
    four = {n: p for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    assert any(n.startswith("vision.blocks.") for n in four) and any(n.startswith("llm.") for n in four)
    sizes = [p.quant_state.shape.numel() for p in four.values()]
    stored = sum(p.numel() * p.element_size() + p.quant_state.absmax.numel() * p.quant_state.absmax.element_size()
                 + p.quant_state.state2.absmax.numel() * 4 for p in four.values())
    with torch.device("meta"):
        s = summarize(plan_report(build_model(cfg), TrainPlan("llm-qlora")).decisions, cfg,
                      DEFAULT_LLM_LORA["target_modules"])
    assert s.quantized == sum(sizes) and s.largest_quantized == max(sizes)
    assert stored == pytest.approx(NF4_BYTES * s.quantized, rel=0.01)  # per-tensor block rounding only


def test_monkey_7b_one_gpu_targets():
    """The 1-GPU figures of issue 14 (bf16, gradient checkpointing, 2048 tokens, one image)."""
    from monkeytune.policy import DEFAULT_LLM_LORA
    from monkeytune.memory import estimate_memory

    cfg = get_config("monkey-7b")
    with torch.device("meta"):
        fix = summarize(plan_report(build_model(cfg), TrainPlan("monkey-fix-llm")).decisions, cfg)
        qlora = summarize(plan_report(build_model(cfg), TrainPlan("llm-qlora")).decisions, cfg,
                          DEFAULT_LLM_LORA["target_modules"])
    gib = {(name, o): estimate_memory(s, cfg, "bf16", "ddp", 1, optim=o).total_ckpt / GIB
           for name, s in (("fix", fix), ("qlora", qlora)) for o in ("adamw_torch", "adamw_bnb_8bit")}
    assert 21.9 < gib["fix", "adamw_torch"] < 22.1
    assert 21.0 < gib["fix", "adamw_bnb_8bit"] < 21.4  # only ~143M parameters train: 1.06 -> 0.27 GiB of moments
    # The 4-bit LLM and ViT linear layers: 11.31 / 10.29 GiB, under the 12 GiB.
    assert 11.1 < gib["qlora", "adamw_torch"] < 11.5
    assert 10.1 < gib["qlora", "adamw_bnb_8bit"] < 10.5
