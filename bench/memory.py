"""The training-memory estimate (``monkeytune.memory``) against a measured peak, side by side.

For each policy (``monkey``, ``monkey-fix-llm``, ``full``, ``llm-qlora``) a fresh subprocess
builds the ``mid`` preset, applies the plan (``llm-qlora`` quantises the LLM's and the ViT's frozen
linear layers to NF4 with bitsandbytes, on the CPU when there is no GPU), and runs two real training steps
(forward, backward, AdamW update) on one sample with an image. Measured: the peak memory of the second, steady-state step (the first
creates the optimizer states) over the memory before the model was built, i.e. weights +
gradients + optimizer states + activations. On CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``), with glibc's mmap threshold fixed so freed tensors go back to the
system at once (the resident set then follows live memory, as a GPU allocator's would). The
estimate is ``estimate_memory(..., strategy="ddp", gpus=1)`` for the same sequence length; for
``llm-qlora`` its summary comes from a meta-device build (the quantised layers' storage is not
their parameter count).

Usage: ``python bench/memory.py [--precision fp32|bf16] [--device cpu|cuda] [--checkpointing]
[--optim adamw_torch|adamw_bnb_8bit]``.
Prints a table with the estimate/measured ratio of each policy; the last line is JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import _peak, _reset_peak, _train_step, make_samples, micro_batches  # noqa: E402

POLICIES = ("monkey", "monkey-fix-llm", "full", "llm-qlora")
MIB = 2**20


def _trim() -> None:
    """Give freed heap memory back to the system so the resident set counts live tensors only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def child(args) -> dict:
    from monkeytune.config import get_config
    from monkeytune.memory import estimate_memory, summarize
    from monkeytune.model import build_model
    from monkeytune.policy import DEFAULT_LLM_LORA, TrainPlan, apply_plan, plan_report
    from monkeytune.train.config import OptimSection
    from monkeytune.train.optim import build_optimizer
    from monkeytune.train.setup import hold_frozen_in_compute_dtype

    device = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    cfg = get_config("mid")
    batch = micro_batches(make_samples(cfg, 1, seed=2, text=(200, 200)), "dynamic", 0, 1)[0]
    seq_len = int(batch["input_ids"].shape[1])
    _trim()
    base = _reset_peak(device)  # libraries and the batch, before the model exists
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    plan = TrainPlan(args.policy)
    apply_plan(model, plan)
    if args.checkpointing:
        from monkeytune.model.monkey import enable_llm_checkpointing

        enable_llm_checkpointing(model.llm)
        model.vision.gradient_checkpointing = True

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    hold_frozen_in_compute_dtype(model, trained, args.precision)
    opt = build_optimizer(model, OptimSection(name=args.optim, lr=1e-5), {}, [], include_frozen=False)
    _train_step(model, opt, batch, device, dtype)  # the first step creates the optimizer states
    _trim()
    _reset_peak(device)  # the peak restarts; weights and optimizer states stay counted against ``base``
    _train_step(model, opt, batch, device, dtype)  # a steady-state step
    measured = _peak(device, base)
    if args.policy == "llm-qlora":
        with torch.device("meta"):
            decisions = plan_report(build_model(cfg), plan).decisions
        summary = summarize(decisions, cfg, DEFAULT_LLM_LORA["target_modules"])
    else:
        summary = summarize(plan_report(model, plan).decisions, cfg)
    est = estimate_memory(summary, cfg, args.precision, "ddp", 1, batch_size=1, seq_len=seq_len, optim=args.optim)
    return {
        "policy": args.policy, "seq_len": seq_len, "params": summary.total, "trainable": summary.trainable,
        "estimate": est.total_ckpt if args.checkpointing else est.total, "states": est.states,
        "activations": est.activations_ckpt if args.checkpointing else est.activations, "measured": measured,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--optim", choices=["adamw_torch", "adamw_bnb_8bit"], default="adamw_torch")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--policy", default="monkey", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(1)
        print(json.dumps(child(args)))
        return
    common = ["--precision", args.precision, "--device", args.device, "--optim", args.optim] + (
        ["--checkpointing"] if args.checkpointing else [])
    rows = []
    for policy in POLICIES:
        # A fixed mmap threshold: glibc otherwise raises it after large frees and keeps freed
        # tensors in the heap, so the resident set would count memory the program no longer uses.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        proc = subprocess.run([sys.executable, __file__, "--child", "--policy", policy, *common],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{policy}: {proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"mid preset, one sample ({rows[0]['seq_len']} tokens), {args.precision}, {args.device}, {args.optim}"
          f"{', checkpointing' if args.checkpointing else ''}")
    print(f"{'policy':<16}{'trainable':>12}{'states MiB':>12}{'activ MiB':>11}{'estimate MiB':>14}"
          f"{'measured MiB':>14}{'est/meas':>10}")
    for r in rows:
        r["ratio"] = round(r["estimate"] / r["measured"], 3)
        print(f"{r['policy']:<16}{r['trainable']:>12,}{r['states'] / MIB:>12.1f}{r['activations'] / MIB:>11.1f}"
              f"{r['estimate'] / MIB:>14.1f}{r['measured'] / MIB:>14.1f}{r['ratio']:>10.3f}")
    print(json.dumps({"precision": args.precision, "device": args.device, "checkpointing": args.checkpointing,
                      "optim": args.optim,
                      "rows": rows}))


if __name__ == "__main__":
    main()
