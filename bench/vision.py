"""Benchmarks for the core model, measured side by side in one run.

1. Vision: forward+backward of all views of a batch in ONE batched pass (monkeytune) versus a loop
   over window positions, one tower call per position (how the official code runs it).
2. LM head: the loss over supervised positions only versus the plain loss over full
   ``[tokens x vocab]`` logits, at 2048 tokens: time and peak memory.

Peak memory on CPU is the rise of the process's peak resident set size (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` just before the step) over its size before the step; each variant
runs in a fresh subprocess. On CUDA it is ``torch.cuda.max_memory_allocated``.

Usage: ``python bench/vision.py [--quick]``. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from monkeytune.config import get_config
from monkeytune.model import build_model


def _views(cfg, n_images, device):
    s = cfg.image.window_size
    pv = torch.randn(n_images * cfg.image.num_views, 3, s, s, device=device)
    per_image = list(range(cfg.image.num_windows)) + ([-1] if cfg.image.global_view else [])
    return pv, torch.tensor(per_image * n_images, device=device)


def _vision_step(model, pv, slots, mode: str):
    v = model.config.image.num_views
    if mode == "batched":
        out = model.encode_images(pv, slots)
    elif mode == "per_position":
        # One call per window position over that position's view of every image (the official loop).
        outs = [model.encode_images(pv[k::v], slots[k::v]) for k in range(v)]
        out = torch.stack(outs, dim=1).flatten(0, 1)
    else:  # per_view: one call per view
        out = torch.cat([model.encode_images(pv[i : i + 1], slots[i : i + 1]) for i in range(pv.shape[0])])
    out.float().square().mean().backward()


def bench_vision(preset: str, n_images: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    model = build_model(preset).to(device).train()
    for name, p in model.named_parameters():
        # The official recipe: tower frozen, adapters + resampler train.
        p.requires_grad_("lora" in name or name.startswith("resampler"))
    pv, slots = _views(model.config, n_images, device)
    modes = ("batched", "per_position", "per_view")
    samples = {mode: [] for mode in modes}
    # A warm-up round, then `repeats` measured rounds of every mode in turn: on a shared machine
    # the load drifts, and interleaving makes each mode's best time see the same conditions.
    for round_ in range(repeats + 1):
        for mode in modes:
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _vision_step(model, pv, slots, mode)
            if device == "cuda":
                torch.cuda.synchronize()
            if round_:
                samples[mode].append(time.perf_counter() - start)
    times = {mode: min(t) for mode, t in samples.items()}
    return {
        "preset": preset,
        "images": n_images,
        "views": int(pv.shape[0]),
        "batched_s": round(times["batched"], 4),
        "per_position_loop_s": round(times["per_position"], 4),
        "per_view_loop_s": round(times["per_view"], 4),
        "speedup_over_per_view_loop": round(times["per_view"] / times["batched"], 3),
        "speedup_over_per_position_loop": round(times["per_position"] / times["batched"], 3),
    }


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _lm_head_child(mode: str, tokens: int, supervised: int, hidden: int, vocab: int, device: str) -> dict:
    from monkeytune.model.loss import supervised_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    h = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    labels = torch.full((1, tokens), -100, device=device)
    labels[0, -supervised:] = torch.randint(0, vocab, (supervised,), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()
    start = time.perf_counter()
    if mode == "supervised":
        loss_sum, n = supervised_loss(h, labels, head)
        loss = loss_sum / n
    else:
        logits = head(h).float()
        loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - base
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak, "loss": float(loss)}


def bench_lm_head(tokens: int, supervised: int, hidden: int, vocab: int, device: str) -> dict:
    results = {}
    for mode in ("supervised", "full"):
        cmd = [sys.executable, __file__, "--child", mode, str(tokens), str(supervised), str(hidden), str(vocab), device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
    s, f = results["supervised"], results["full"]
    assert abs(s["loss"] - f["loss"]) < 1e-3 * max(1.0, abs(f["loss"])), (s["loss"], f["loss"])
    return {
        "tokens": tokens,
        "supervised_tokens": supervised,
        "hidden": hidden,
        "vocab": vocab,
        "supervised_s": round(s["seconds"], 4),
        "full_s": round(f["seconds"], 4),
        "time_ratio_supervised_over_full": round(s["seconds"] / f["seconds"], 4),
        "supervised_peak_mib": round(s["peak_bytes"] / 2**20, 1),
        "full_peak_mib": round(f["peak_bytes"] / 2**20, 1),
        "memory_ratio_supervised_over_full": round(max(s["peak_bytes"], 1) / max(f["peak_bytes"], 1), 4),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, tokens, supervised, hidden, vocab, device = sys.argv[2:8]
        print(json.dumps(_lm_head_child(mode, int(tokens), int(supervised), int(hidden), int(vocab), device)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    report = {"device": args.device, "torch_threads": torch.get_num_threads()}
    report["vision"] = [bench_vision("tiny", 4, repeats, args.device)]
    if not args.quick:
        report["vision"].append(bench_vision("mid", 2, repeats, args.device))
    for row in report["vision"]:
        print(f"vision {row['preset']:>4}: {row['views']} views fwd+bwd  batched {row['batched_s']:.3f}s  "
              f"per-view loop {row['per_view_loop_s']:.3f}s (x{row['speedup_over_per_view_loop']})  "
              f"per-position loop {row['per_position_loop_s']:.3f}s (x{row['speedup_over_per_position_loop']})")
    vocab = get_config("mid").llm.vocab_size
    lm = bench_lm_head(2048, 256, 512 if not args.quick else 128, vocab, args.device)
    report["lm_head"] = lm
    print(f"lm head @ {lm['tokens']} tokens ({lm['supervised_tokens']} supervised, vocab {lm['vocab']}): "
          f"time x{lm['time_ratio_supervised_over_full']}  peak memory {lm['supervised_peak_mib']} MiB vs "
          f"{lm['full_peak_mib']} MiB (x{lm['memory_ratio_supervised_over_full']})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
