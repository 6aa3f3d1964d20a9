"""bench/gpu_check.py's unit parts: the fit decision, FLOP counting, datasheet peaks, error rows."""

import gc
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402

from monkeytune.config import get_config  # noqa: E402

GIB = 1024**3


def test_monkey_policy_does_not_fit_80_gib_by_the_estimate():
    cfg = get_config("monkey-7b")
    est, _ = gpu_check.policy_estimate(cfg, "monkey", "bf16", 1, 2048)
    fits, why = gpu_check.fit_decision(est.total_ckpt, 80 * GIB)
    assert not fits and est.total_ckpt > 80 * GIB
    assert why == f"estimate {est.total_ckpt / GIB:.1f} GiB > device total 80.0 GiB"
    est, _ = gpu_check.policy_estimate(cfg, "monkey-fix-llm", "bf16", 1, 2048)
    assert gpu_check.fit_decision(est.total_ckpt, 80 * GIB)[0]


def test_fit_decision_boundary():
    assert gpu_check.fit_decision(10, 10) == (True, f"estimate {10 / GIB:.1f} GiB <= device total {10 / GIB:.1f} GiB")
    assert not gpu_check.fit_decision(11, 10)[0]


def test_attention_flops_convention():
    # Causal: half of 4 L^2 width per sequence and layer forward; backward layers add twice that.
    lengths, width = [3, 5], 8
    forward = (4 * 9 * 8 + 4 * 25 * 8) / 2
    assert gpu_check.attention_flops(lengths, width, layers=2, backward_layers=1, causal=True) == forward * (2 + 2)
    assert gpu_check.attention_flops(lengths, width, 2, 0, causal=False) == 2 * forward * 2
    # Packed samples never attend to each other: two of 4 tokens cost less than one of 8.
    assert gpu_check.attention_flops([4, 4], 8, 1, 0, True) == gpu_check.attention_flops([8], 8, 1, 0, True) / 2
    with pytest.raises(ValueError):
        gpu_check.attention_flops([4], 8, 1, 2, True)


def test_step_flops_match_a_plain_count():
    from monkeytune.memory import summarize
    from monkeytune.model import build_model
    from monkeytune.policy import TrainPlan, apply_plan, plan_report

    cfg = get_config("tiny")
    torch.manual_seed(0)
    tiny = build_model(cfg)
    apply_plan(tiny, TrainPlan("monkey"))
    summary = summarize(plan_report(tiny, TrainPlan("monkey")).decisions, cfg)
    assert summary.llm_from == 0 and summary.vision_from == 0
    samples = gpu_check.make_samples(cfg, 2, seed=0, text=(30, 50))
    batch = gpu_check.micro_batches(samples, "packing", 10_000, 1)[0]  # both samples in one row
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["seq_lens"].tolist() == [lengths]
    parts = gpu_check.step_flops(tiny, cfg, batch, summary)

    def params(prefix):
        ps = [p for n, p in tiny.named_parameters() if n.startswith(prefix)]
        return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)

    tokens = sum(lengths)
    total, trained = params("llm.model.layers.")
    assert parts["llm_linear"] == (4 * total + 2 * trained) * tokens
    h, layers = cfg.llm.hidden_size, cfg.llm.num_layers
    assert parts["llm_attention"] == 3 * layers * sum(2 * n * n * h for n in lengths)
    patches = (cfg.image.window_size // cfg.vision.patch_size) ** 2
    views = 2 * cfg.image.num_views
    total, trained = params("vision.blocks.")
    assert parts["vit_linear"] == (4 * total + 2 * trained) * views * patches
    assert parts["vit_attention"] == 3 * cfg.vision.layers * views * 4 * patches**2 * cfg.vision.width
    head = tiny.llm.get_output_embeddings().weight
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert parts["lm_head"] == (4 + (2 if head.requires_grad else 0)) * head.numel() * supervised
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_datasheet_peaks():
    peak = gpu_check.datasheet_peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989 and peak("NVIDIA H100 PCIe") == 756
    assert peak("NVIDIA H200") == 989 and peak("NVIDIA A100-SXM4-80GB") == 312 and peak("NVIDIA L40S") == 362
    assert peak("NVIDIA H100 NVL") is None and peak("Tesla T4") is None


def test_out_of_memory_frees_the_case_and_other_errors_become_rows():
    class Model(torch.nn.Module):
        pass

    refs = []

    def oom(held):
        held["model"] = Model()
        refs.append(weakref.ref(held["model"]))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    row = gpu_check.guarded({"fit": "estimate 70.0 GiB <= device total 79.1 GiB"}, "cpu", oom)
    gc.collect()
    assert refs[0]() is None  # the model was let go
    assert row["status"] == "out of memory"
    assert row["reason"] == ("torch.cuda.OutOfMemoryError (estimate 70.0 GiB <= device total 79.1 GiB): "
                             "CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken(held):
        raise ValueError("bad")

    assert gpu_check.guarded({}, "cpu", broken) == {"status": "error", "reason": "ValueError: bad"}


def test_side_cases_on_a_cpu_say_why_they_do_not_run():
    args = SimpleNamespace(batch=1, tokens=400, steps=1, packing="auto", ddp_timeout=10)
    setup = gpu_check._setup(args, "cpu")
    row = gpu_check.check_compat(args, "cpu", setup, 10 * GIB)
    assert row["status"] == "skipped" and "CUDA" in row["reason"]
    row = gpu_check.check_ddp(args, "cpu", setup, 10 * GIB)
    assert row["status"] == "not run" and row["reason"] == "no GPU (CPU run)"


def test_compat_case_trains_on_the_tiny_preset():
    """The compat case's code path (official-layout model, the compat layer over SDPA) on a CPU."""
    args = SimpleNamespace(batch=1, tokens=400, steps=1, packing="off", ddp_timeout=10)
    setup = {**gpu_check._setup(args, "cpu"), "preset": "tiny"}
    row = gpu_check.check_policy(args, "cpu", "monkey-fix-llm", setup, 64 * GIB, case="compat", compat=True)
    assert row["status"] == "ok", row.get("reason")
    assert row["attention"] == "monkeytune_qwen_sdpa" and row["compat"]
    assert len(row["losses"]) == 2 and all(torch.isfinite(torch.tensor(row["losses"])))
    assert row["estimate_bytes"] > 0 and row["peak_reserved_bytes"] is None
