"""One script to run on a GPU machine: does monkey-7b fine-tuning fit, how fast is it, does it learn.

On a GPU: ``monkey-7b`` with random weights, frozen weights in bf16 and trained ones fp32 under
bf16 autocast, gradient checkpointing, 896x896 images (4 windows + global view, 1280 visual
tokens) and 2048-token samples. On a CPU the ``mid`` preset in fp32 runs the same code, to check
the script itself. For each policy (``monkey-fix-llm``, ``monkey``) it prints:

* samples/s and tokens/s of a whole step (forward, backward, AdamW update), median of the timed steps;
* MFU: the step's model FLOPs (matmuls of the decoder layers, ViT blocks and LM head; see
  :func:`step_flops`) over the device's matmul peak measured here (bf16 on a GPU, fp32 on a CPU);
* the peak memory next to ``monkeytune.memory``'s estimate for the same step;
* whether the loss falls over steps on one repeated batch.

``flash_attention_2`` is used for the LLM when the ``flash_attn`` package is installed (on a GPU),
SDPA otherwise. With flash attention the ``B`` samples of a step are packed padding-free: one
row of ``B x tokens`` tokens whose ``position_ids`` restart at 0 per sample, with the
``cu_seq_lens`` / ``max_length`` varlen arguments (:mod:`monkeytune.data.collate`), so samples
never attend to each other; ``--packing on`` does the same under SDPA (which then builds the
block-diagonal mask from the position ids). Usage: ``python bench/gpu_check.py [--steps N]
[--batch B] [--packing auto|on|off]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import _peak, _reset_peak, _train_step, make_samples, micro_batches  # noqa: E402

POLICIES = ("monkey-fix-llm", "monkey")


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul (the best of a few runs)."""
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def step_flops(model, cfg, batch: dict) -> float:
    """Model FLOPs of one step: matmuls only, recomputation from checkpointing not counted.

    Each parameter of a decoder layer or ViT block costs 2 FLOPs per token forward, 2 more for
    the gradient of its input (backward runs through every layer under both policies) and 2
    more when it trains (its own gradient). The LM head runs on supervised positions only;
    embeddings are lookups. Attention scores are not counted.
    """
    tokens = int(batch["seq_lens"].sum())
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    patches = int(batch["pixel_values"].shape[0]) * (cfg.image.window_size // cfg.vision.patch_size) ** 2

    def cost(prefix: str, n_tokens: int) -> float:
        params = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        total = sum(p.numel() for p in params)
        trained = sum(p.numel() for p in params if p.requires_grad)
        return (4.0 * total + 2.0 * trained) * n_tokens

    head = model.llm.get_output_embeddings().weight
    head_cost = (4.0 + (2.0 if head.requires_grad else 0.0)) * head.numel() * supervised
    return cost("llm.model.layers.", tokens) + cost("vision.blocks.", patches) + head_cost


def check_policy(policy: str, args, device: str) -> dict:
    from monkeytune.config import get_config
    from monkeytune.memory import estimate_memory, summarize
    from monkeytune.model import build_model
    from monkeytune.model.monkey import enable_llm_checkpointing
    from monkeytune.policy import TrainPlan, apply_plan, plan_report
    from monkeytune.train.setup import hold_frozen_in_compute_dtype

    gpu = device == "cuda"
    preset, precision = ("monkey-7b", "bf16") if gpu else ("mid", "fp32")
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = get_config(preset)
    text = max(16, args.tokens - cfg.tokens_per_image - 2)
    attention = "flash_attention_2" if gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    packing = args.packing == "on" or (args.packing == "auto" and attention == "flash_attention_2")
    samples = make_samples(cfg, args.batch, seed=3, text=(text, text))
    rows = max(len(it["input_ids"]) for it in samples) * args.batch  # every sample in one row
    batch = micro_batches(samples, "padding_free" if packing else "dynamic", rows, args.batch)[0]
    tokens = int(batch["seq_lens"].sum())
    base = _reset_peak(device)  # before the model: the peak then counts weights, states and activations
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg).train()
    plan = TrainPlan(policy)
    apply_plan(model, plan)

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    hold_frozen_in_compute_dtype(model, trained, precision)
    if attention != "sdpa":
        model.llm.set_attn_implementation(attention)
    enable_llm_checkpointing(model.llm)
    model.vision.gradient_checkpointing = True
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4 if gpu else 1e-3)

    losses = [_train_step(model, opt, batch, device, dtype)]  # warm-up: kernels, optimizer states
    _reset_peak(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(_train_step(model, opt, batch, device, dtype))
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = _peak(device, base)
    summary = summarize(plan_report(model, plan).decisions, cfg)
    est = estimate_memory(summary, cfg, precision, "ddp", 1, batch_size=args.batch, seq_len=tokens // args.batch)
    flops = step_flops(model, cfg, batch)
    result = {
        "policy": policy, "preset": preset, "precision": precision, "attention": attention, "packing": packing,
        "row_shape": list(batch["input_ids"].shape),
        "batch": args.batch, "tokens": tokens, "step_s": round(seconds, 3),
        "samples_per_s": round(args.batch / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "tflops_per_s": round(flops / seconds / 1e12, 3),
        "peak_bytes": peak, "estimate_bytes": est.total_ckpt, "losses": [round(x, 4) for x in losses],
        "loss_falls": losses[-1] < losses[0],
    }
    del model, opt
    if gpu:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per sample, visual tokens included")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="padding-free packing of the batch's samples (auto: with flash_attention_2)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # A fixed mmap threshold (M_MMAP_THRESHOLD): freed tensors go back to the system at once,
        # so the resident-set peak follows live memory as a GPU allocator's peak does.
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    peak_flops = matmul_peak(device, torch.bfloat16 if device == "cuda" else torch.float32)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}: measured matmul peak {peak_flops / 1e12:.3g} TFLOP/s "
          f"({'bf16' if device == 'cuda' else 'fp32'})")
    rows = []
    for policy in POLICIES:
        r = check_policy(policy, args, device)
        r["mfu"] = round(r["tflops_per_s"] * 1e12 / peak_flops, 4)
        rows.append(r)
        print(f"{policy:<15} {r['preset']} {r['precision']} {r['attention']}"
              f"{' packed ' + 'x'.join(map(str, r['row_shape'])) if r['packing'] else ''}: {r['samples_per_s']} samples/s, "
              f"{r['tokens_per_s']} tokens/s, MFU {100 * r['mfu']:.1f}%, peak {r['peak_bytes'] / 2**30:.2f} GiB "
              f"(estimate {r['estimate_bytes'] / 2**30:.2f} GiB), loss {r['losses'][0]} -> {r['losses'][-1]} "
              f"({'falls' if r['loss_falls'] else 'does NOT fall'})", flush=True)
    print(json.dumps({"device": name, "matmul_peak_tflops": round(peak_flops / 1e12, 2), "rows": rows}))


if __name__ == "__main__":
    main()
