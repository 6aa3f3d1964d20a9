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
        # apply_plan alone (no run precision) keeps QLoRA's default bf16 compute for fp32 weights.
        assert layer.weight.quant_state.nested and layer.compute_dtype == torch.bfloat16
    # What stays full precision: the patch embedding, norms, positions, resampler, adapters.
    assert start.vision.patch_embed.weight.is_floating_point() and start.vision.pos_embed.is_floating_point()
    assert all(p.is_floating_point() for n, p in start.named_parameters() if n.startswith("resampler."))
    lora = {n: p.detach().clone() for n, p in start.named_parameters()
            if ("lora_" in n and n.startswith("llm.")) or (".lora_" in n and n.startswith("vision."))}
    assert sum(n.startswith("vision.") for n in lora) == 3 * 3  # lora_a, lora_b, lora_scale of three adapters

    result = train(cfg)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    # The run's 4-bit layers computed in train.precision's dtype (fp32 runs in fp32, not bf16).
    layers = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    assert len(layers) == len(base) and {m.compute_dtype for m in layers} == {want}
    after = dict(result.model.named_parameters())
    for n, t in base.items():
        assert isinstance(after[n], bnb.nn.Params4bit) and not after[n].requires_grad
        assert torch.equal(after[n], t), n
    moved = [n for n, t in lora.items() if not torch.equal(after[n].detach().to(t.dtype), t)]
    assert sorted(moved) == sorted(lora)  # every LLM LoRA matrix and every per-window adapter tensor trained


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_qlora_4bit_layers_compute_in_the_run_precision(make_config, precision, dtype):
    """The weights load in fp32 under every precision; the 4-bit LLM and ViT layers compute in the precision's dtype."""
    from monkeytune.train.setup import build_schedule

    cfg = make_config(f"qdtype-{precision}", policy={"preset": "llm-qlora", "lora": {"r": 4}},
                      train={"precision": precision})
    model, _ = load_model_and_tokenizer(cfg)
    assert next(model.vision.blocks[0].attn.qkv.parameters()).dtype == torch.float32
    build_schedule(cfg, model)  # what a run does to prepare the model (LoRA, 4-bit layers)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * 7 + 4 and sum(n.startswith("vision.") for n in layers) == 4
    assert {m.compute_dtype for m in layers.values()} == {dtype}
    # A run passes the precision it really computes in (fp16 without a GPU loss scaler is fp32).
    model, _ = load_model_and_tokenizer(cfg)
    build_schedule(cfg, model, "fp32")
    assert {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.float32}


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


class Interrupt(Exception):
    pass


def test_qlora_resume_is_exact(make_config):
    """Checkpoints hold the trained tensors only; a resume re-quantises the same 4-bit LLM and ViT bases."""
    from monkeytune.train.metrics import read_metrics
    from safetensors.torch import load_file

    sections = dict(policy={"preset": "llm-qlora", "lora": {"r": 4}}, train={"max_steps": 4},
                    checkpoint={"every": 2, "keep_last": 1}, optim={"lr": 1e-2})
    ref = train(make_config("qref", **sections))
    cfg = make_config("qcut", **sections)

    def stop(row):
        if row["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, on_step=stop)
    saved = load_file(f"{cfg.checkpoint.output_dir}/checkpoints/step-00000002/weights.safetensors")
    assert saved and all(t.is_floating_point() for t in saved.values())
    assert set(saved) == {n for n, p in ref.model.named_parameters() if p.requires_grad}
    assert not set(saved) & set(four_bit(ref.model))
    resumed = train(cfg, resume="latest")
    assert resumed.steps == 4 and len(resumed.losses) == 2
    assert [r["loss"] for r in read_metrics(resumed.run_dir / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(ref.run_dir / "metrics.jsonl")]
    ref_params = dict(ref.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n


def _quantised_tiny(seed: int = 0):
    """A tiny model under llm-qlora (real 4-bit layers) whose LoRA and adapters are non-trivial."""
    from monkeytune.config import get_config
    from monkeytune.model import build_model

    cfg = get_config("tiny")
    cfg.vision.lora_dropout = 0.0  # outputs are compared in training mode (see _outputs)
    torch.manual_seed(seed)
    model = build_model(cfg)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, TrainPlan("llm-qlora", lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("lora_b"):
                p.normal_(std=0.05)  # both start at zero; make the adapters matter
    return model, dense


def _stored_tensors(folder):
    from safetensors.torch import load_file

    return {f"{path.relative_to(folder)}:{k}": t for path in sorted(folder.rglob("*.safetensors"))
            for k, t in load_file(str(path)).items()}


def _outputs(model, ids, pixels):
    """LLM logits of ``ids`` and ViT features of ``pixels`` (four windows and a global view).

    Run in training mode (the models here have no dropout): in eval mode on a CPU, bitsandbytes
    repacks 4-bit weights for its inference kernel, which needs output widths divisible by 32.
    """
    with torch.no_grad():
        model.train()
        return model(ids).logits.float(), model.vision(pixels, torch.tensor([0, 1, 2, 3, -1])).float()


@pytest.mark.parametrize("mode", ["full", "adapters"])
def test_qlora_final_folder_holds_dense_weights_that_load(tmp_path, mode):
    """The final save of an llm-qlora model: dense, loadable weights (no packed NF4), trained tensors as trained."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    from monkeytune.model.io import load_model, save_model
    from monkeytune.train.final import save_final

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model, dense = _quantised_tiny()
    pixels = torch.randn(5, 3, 224, 224)
    expected, features = _outputs(model, ids, pixels)  # the 4-bit model as trained
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("vision.blocks.") and n.endswith("lora_b") for n in trained)
    base_dir = None
    if mode == "adapters":  # the adapters load on the unquantised model they were trained from
        from monkeytune.model import build_model

        base = build_model(model.config)
        base.load_state_dict(dense)
        base_dir = save_model(base, tmp_path / "base")
    out = save_final(model, None, tmp_path / "final", mode, merge_llm_lora=mode == "full", base_model=base_dir)

    stored = _stored_tensors(out)
    assert stored and all(t.is_floating_point() for t in stored.values()), \
        [k for k, t in stored.items() if not t.is_floating_point()][:5]
    assert not [k for k in stored if "absmax" in k or "quant" in k]
    loaded, _ = load_model(out)
    if mode == "full":
        # Dequantized bases plus the merged LLM LoRA give the 4-bit model's outputs (which computed in bf16).
        logits, feats = _outputs(loaded, ids, pixels)
        torch.testing.assert_close(logits, expected, rtol=0.02, atol=0.02)
        torch.testing.assert_close(feats, features, rtol=0.02, atol=0.02)
        vit = loaded.vision.blocks[0].attn.qkv.weight
        assert vit.dtype == torch.float32 and not torch.equal(vit, dense["vision.blocks.0.attn.qkv.weight"])
    else:
        names = {k.split(":", 1)[1] for k in stored if k.startswith("model")}
        assert names == {n for n in trained if not n.startswith("llm.")}  # trainable weights only
        params = dict(loaded.named_parameters())
        for name in names:
            torch.testing.assert_close(params[name], trained[name], rtol=0, atol=0)
        loaded.llm = PeftModel.from_pretrained(loaded.llm, str(out / "llm_lora"))
        assert all(torch.isfinite(t).all() for t in _outputs(loaded, ids, pixels))
    # The peft folder loads on the written base LLM (dequantized) with plain peft.
    peft_llm = AutoPeftModelForCausalLM.from_pretrained(str(out / "llm_lora")).eval()
    assert torch.isfinite(peft_llm(ids).logits).all()


def test_dequantize_gives_the_weights_a_4bit_layer_computes_with():
    """Also after an eval-mode CPU forward, where bitsandbytes repacks the weight for its inference kernel."""
    from monkeytune.policy.quantize import _replace_linears, dequantize_4bit

    torch.manual_seed(0)
    root = torch.nn.Sequential(torch.nn.Linear(64, 96))
    original = root[0].weight.detach().clone()
    _replace_linears(root, lambda name: True, torch.bfloat16, torch.device("cpu"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = root.train()(x).float()
        root.eval()(x)  # repacks where the CPU has AVX512-BF16
        assert dequantize_4bit(root) == 1
        layer = root[0]
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
        assert not layer.weight.requires_grad
        torch.testing.assert_close(root(x), expected, rtol=0.02, atol=0.02)
    assert 0 < (layer.weight - original).abs().max() < original.abs().max() / 4  # NF4 rounding, not garbage


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch):
    from monkeytune.config import get_config
    from monkeytune.model import build_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an installation without it looks like
    torch.manual_seed(0)
    with pytest.raises(PlanError, match="llm-qlora needs 4-bit bitsandbytes kernels: the bitsandbytes package is "
                       "not installed .* Use preset llm-lora"):
        apply_plan(build_model(get_config("tiny")), TrainPlan("llm-qlora"))
