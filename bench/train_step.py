"""Training-step benchmark: padding strategies side by side, and whole steps of two model sizes.

1. Padding. The same samples (one image of 1280 visual tokens each, as Monkey's 4 windows + global
   view x 256 queries, plus 20-600 text tokens) are trained on with
   * ``max_length``: every row padded to ``--max-length`` (what the official code does),
   * ``dynamic``: rows padded to the longest sample of their micro-batch,
   * ``packing``: samples packed first-fit into rows of ``--max-length`` (block-diagonal attention).
   Each strategy gets micro-batches of ``--rows`` rows and runs forward + backward on each (the
   optimizer update costs the same per step whatever the padding, so it is left out here).
   Reported: real (non-padding) tokens per second, processed (padded) tokens per second,
   micro-batches and peak memory.
2. Whole step. Forward, backward and AdamW update of one micro-batch under the ``monkey`` policy
   (ViT base frozen) for the ``tiny`` preset and the ``mid`` preset.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the rise of the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set before the measured
work. Every measurement runs in a fresh subprocess so peaks do not mix.

Usage: ``python bench/train_step.py [--quick] [--samples N] [--max-length T] [--rows R]``.
The last line printed is a JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device: str) -> int:
    """Reset the peak-memory counter; returns the baseline to subtract."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def _peak(device: str, base: int) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _status("VmHWM") - base


def make_samples(cfg, n: int, seed: int = 0, text=(20, 600)) -> list[dict]:
    """Dataset-like items: one image per sample and a random text length; the answer is supervised."""
    g = torch.Generator().manual_seed(seed)
    s, v = cfg.image.window_size, cfg.image.num_views
    slots = torch.tensor(list(range(cfg.image.num_windows)) + ([-1] if cfg.image.global_view else []))
    items = []
    for i in range(n):
        t = int(torch.randint(text[0], text[1] + 1, (1,), generator=g))
        answer = max(4, t // 4)
        prompt = t - answer
        ids = torch.randint(100, min(cfg.llm.vocab_size, 30000), (prompt + answer,), generator=g)
        img = torch.cat([torch.tensor([cfg.image_start_id]), torch.full((cfg.tokens_per_image,), cfg.image_pad_id),
                         torch.tensor([cfg.image_end_id])])
        input_ids = torch.cat([ids[:2], img, ids[2:]])
        labels = torch.full_like(input_ids, -100)
        labels[-answer:] = input_ids[-answer:]
        items.append({
            "input_ids": input_ids, "labels": labels, "num_images": 1, "id": i, "index": i,
            "pixel_values": torch.randn(v, 3, s, s, generator=g), "view_slots": slots.clone(),
        })
    return items


def micro_batches(items: list[dict], strategy: str, max_length: int, rows: int) -> list[dict]:
    from monkeytune.data import Collator, first_fit_pack, pack_items

    if strategy in ("packing", "padding_free"):
        plan = first_fit_pack([len(it["input_ids"]) for it in items], max_length)
        units = [pack_items([items[i] for i in row]) for row in plan]
        # padding_free: the micro-batch's rows in one unpadded row with cu_seqlens (flash_attention_2).
        collate = Collator(pad_id=0, padding_free=strategy == "padding_free")
    else:
        units = items
        collate = Collator(pad_id=0, pad_to_length=max_length if strategy == "max_length" else None)
    return [collate(units[i : i + rows]) for i in range(0, len(units), rows)]


def _model(preset: str, device: str, checkpointing: bool):
    from monkeytune.model import build_model
    from monkeytune.policy import TrainPlan, apply_plan

    torch.manual_seed(0)
    model = build_model(preset).to(device).train()
    apply_plan(model, TrainPlan("monkey"))
    if checkpointing:
        from monkeytune.model.monkey import enable_llm_checkpointing

        enable_llm_checkpointing(model.llm)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt


def _train_step(model, opt, batch: dict, device: str, dtype, update: bool = True) -> float:
    from monkeytune.data import model_inputs

    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        out = model(**inputs)
    (out.loss_sum / out.num_tokens.clamp(min=1)).backward()
    if update:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach().item()


def child_padding(args) -> dict:
    from monkeytune.config import get_config

    device, dtype = args.device, _dtype(args)
    items = make_samples(get_config(args.preset), args.samples)
    batches = micro_batches(items, args.strategy, args.max_length, args.rows)
    model, opt = _model(args.preset, device, args.checkpointing)
    _train_step(model, opt, batches[0], device, dtype)  # warm-up (allocator, kernels, optimizer state)
    base = _reset_peak(device)
    start = time.perf_counter()
    for b in batches:
        _train_step(model, opt, b, device, dtype, update=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    real = sum(int(b["seq_lens"].sum()) for b in batches)
    processed = sum(b["input_ids"].numel() for b in batches)
    return {
        "micro_batches": len(batches), "seconds": round(seconds, 3), "real_tokens": real, "processed_tokens": processed,
        "real_tokens_per_s": round(real / seconds, 1), "processed_tokens_per_s": round(processed / seconds, 1),
        "padding_fraction": round(1 - real / processed, 4), "peak_bytes": _peak(device, base),
    }


def child_step(args) -> dict:
    from monkeytune.config import get_config

    device, dtype = args.device, _dtype(args)
    cfg = get_config(args.preset)
    items = make_samples(cfg, args.rows, seed=1, text=(100, 300))
    batch = micro_batches(items, "dynamic", 0, args.rows)[0]
    model, opt = _model(args.preset, device, args.checkpointing)
    _train_step(model, opt, batch, device, dtype)
    base = _reset_peak(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _train_step(model, opt, batch, device, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    real = int(batch["seq_lens"].sum())
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "batch_rows": args.rows, "tokens": real, "step_seconds": round(seconds, 3),
        "tokens_per_s": round(real / seconds, 1), "peak_bytes": _peak(device, base),
    }


def _dtype(args):
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]


def run_child(extra: list[str], common: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *extra, *common]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {extra} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    p.add_argument("--samples", type=int, default=8, help="samples trained on per padding strategy")
    p.add_argument("--max-length", type=int, default=4096, help="row length for max_length padding and packing")
    p.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--repeats", type=int, default=3, help="timed whole steps per model (median reported)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--checkpointing", action="store_true", help="LLM gradient checkpointing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per measurement (0: torch's default)")
    p.add_argument("--child", choices=("padding", "step"), help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="mid", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.child:
        if args.threads:
            torch.set_num_threads(args.threads)
        out = child_padding(args) if args.child == "padding" else child_step(args)
        print(json.dumps(out))
        return
    if args.quick:
        args.samples, args.repeats = 4, 1
    common = ["--device", args.device, "--precision", args.precision, "--max-length", str(args.max_length),
              "--rows", str(args.rows), "--samples", str(args.samples), "--repeats", str(args.repeats),
              "--threads", str(args.threads)]
    if args.checkpointing:
        common.append("--checkpointing")
    threads = args.threads or torch.get_num_threads()
    print(f"device {args.device} ({threads} threads), {args.precision}; {args.samples} samples of 1280 image + 20-600 text tokens, "
          f"mid preset, micro-batches of {args.rows} rows, rows of {args.max_length} tokens", flush=True)
    padding = {}
    for strategy in ("max_length", "dynamic", "packing"):
        r = run_child(["padding", "--strategy", strategy, "--preset", "mid"], common)
        padding[strategy] = r
        print(f"  {strategy:<10} {r['micro_batches']:3d} micro-batches  {r['real_tokens_per_s']:9.1f} real tok/s  "
              f"{r['processed_tokens_per_s']:9.1f} processed tok/s  padding {100 * r['padding_fraction']:5.1f}%  "
              f"peak {_mb(r['peak_bytes'])}", flush=True)
    step = {}
    for preset in ("tiny", "mid"):
        r = run_child(["step", "--preset", preset], common)
        step[preset] = r
        print(f"  whole step {preset:<5} {r['params'] / 1e6:7.1f}M params ({r['trainable'] / 1e6:.1f}M trainable)  "
              f"{r['tokens']} tokens  {r['step_seconds']:.3f} s  {r['tokens_per_s']:9.1f} tok/s  "
              f"peak {_mb(r['peak_bytes'])}", flush=True)
    summary = {
        "device": args.device, "threads": threads, "precision": args.precision, "max_length": args.max_length, "rows": args.rows,
        "padding": padding, "step": step,
        "speedup_dynamic_vs_max_length": round(padding["dynamic"]["real_tokens_per_s"]
                                               / padding["max_length"]["real_tokens_per_s"], 2),
        "speedup_packing_vs_max_length": round(padding["packing"]["real_tokens_per_s"]
                                               / padding["max_length"]["real_tokens_per_s"], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
