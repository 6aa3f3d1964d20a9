"""One script to run on a GPU machine: does monkey-7b fine-tuning fit, how fast is it, does it learn.

On a GPU: ``monkey-7b`` with random weights, frozen weights in bf16 and trained ones fp32 under
bf16 autocast, gradient checkpointing, 896x896 images (4 windows + global view, 1280 visual
tokens) and 2048-token samples. On a CPU the ``mid`` preset in fp32 runs the same code, to check
the script itself. One row per case:

* ``monkey-fix-llm`` and ``monkey``: each policy trained in one process;
* ``compat-flash``: ``monkey-fix-llm`` on an official-layout model (the Qwen compat layer of
  :func:`monkeytune.model.qwen_compat.apply_compat` installed, as official checkpoints load) with
  ``flash_attention_2`` under it. Skipped, with the reason, without CUDA or an importable
  ``flash_attn``;
* ``ddp-text-rank``: ``monkey-fix-llm`` under DDP on 2 GPUs (two spawned processes, NCCL,
  ``find_unused_parameters=False``; ``bench/gpu_check_ddp.py``), where rank 0 trains on samples
  with an image and rank 1 on text-only samples only: every trained vision weight must still get
  a gradient on rank 1, or DDP fails or hangs. Reported: whether both ranks finish and hold the
  same trained weights after the steps. Not run with fewer than 2 GPUs (nor on a CPU).

Before a case builds its model, ``monkeytune.memory``'s estimate of the step (one GPU, DDP row,
gradient checkpointing; AdamW fused on a GPU, as the trainer runs it) is compared with the device's total
memory (on a CPU: the machine's RAM): a case whose estimate exceeds it is reported as "does not
fit" and not run. A case that runs out of memory anyway (``torch.cuda.OutOfMemoryError``) frees
its model and optimizer and is reported as "out of memory"; any other error becomes an "error"
row. Either way every row says why, and the script always ends with its JSON line.

For each case that ran it prints:

* samples/s and tokens/s of a whole step (forward, backward, AdamW update), median of the timed steps;
* MFU: the step's model FLOPs (:func:`step_flops`: matmuls of the decoder layers, ViT blocks and LM
  head, and the attention score and value products) over the device's matmul peak measured here
  (bf16 on a GPU, fp32 on a CPU), and over the datasheet's dense bf16 peak (:data:`DATASHEET_BF16_TFLOPS`,
  matched on the device name; null when unknown or on a CPU);
* the peak memory (``max_memory_allocated`` over what was allocated before the model; on a CPU
  the resident-set peak) next to ``max_memory_reserved`` (the allocator's cache, absolute) and
  ``monkeytune.memory``'s estimate for the same step;
* whether the loss falls over steps on one repeated batch.

``flash_attention_2`` is used for the LLM when the ``flash_attn`` package imports (on a GPU),
SDPA otherwise. With flash attention the ``B`` samples of a step are packed padding-free: one
row of ``B x tokens`` tokens whose ``position_ids`` restart at 0 per sample, with the
``cu_seq_lens`` / ``max_length`` varlen arguments (:mod:`monkeytune.data.collate`), so samples
never attend to each other; ``--packing on`` does the same under SDPA (which then builds the
block-diagonal mask from the position ids). Usage: ``python bench/gpu_check.py [--steps N]
[--batch B] [--tokens T] [--packing auto|on|off] [--cases a,b] [--ddp-timeout S]``; the last
line is JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import _peak, _reset_peak, _train_step, make_samples, micro_batches  # noqa: E402

POLICIES = ("monkey-fix-llm", "monkey")
COMPAT_CASE, DDP_CASE = "compat-flash", "ddp-text-rank"
CASES = (*POLICIES, COMPAT_CASE, DDP_CASE)
SIDE_POLICY = "monkey-fix-llm"  # the policy of the compat and DDP cases (fits one 80 GB GPU)
GIB = 1024**3

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, as
#: ``(substrings of torch.cuda.get_device_name(), peak)``; the first row whose substrings all
#: occur wins. NVL parts (H100 NVL, H200 NVL) have lower clocks and are not in the table.
DATASHEET_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("NVL",), None),
    (("H100", "PCIe"), 756.0),
    (("H100",), 989.0),  # SXM5, reported as e.g. "NVIDIA H100 80GB HBM3"
    (("H200",), 989.0),
    (("A100",), 312.0),  # SXM and PCIe alike
    (("L40S",), 362.0),
)


def datasheet_peak_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak for ``device_name`` (TFLOP/s), None when not in the table."""
    name = device_name.upper()
    for keys, peak in DATASHEET_BF16_TFLOPS:
        if all(k.upper() in name for k in keys):
            return peak
    return None


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


# ---------------------------------------------------------------- FLOPs
def attention_flops(lengths, width: int, layers: int, backward_layers: int, causal: bool) -> float:
    """FLOPs of the attention score (``Q K^T``) and value (``P V``) matmuls of one step.

    Per layer and sequence of ``L`` tokens the forward of both products costs ``4 L^2 width``
    (``2 L^2 width`` each; ``width`` = heads x head size). Causal attention counts half of that,
    ``2 L^2 width``: the masked upper triangle is not model work (flash attention skips it;
    SDPA may compute it, which then shows as lower MFU, not as more FLOPs). Backward costs twice
    the forward (two matmuls per product: gradients of both operands) in the layers backward
    runs through, whether or not their weights train. Softmax and the rotary are not counted.

    Args:
        lengths: Token count of each sequence attention runs over: each packed sample of the
            LLM (samples never attend to each other), each view's patches for the ViT.
        width: Query width (heads x head size).
        layers: Layers the forward runs.
        backward_layers: Layers the backward runs through.
        causal: Count half of the ``L x L`` products.
    """
    if not 0 <= backward_layers <= layers:
        raise ValueError(f"backward_layers must be in [0, {layers}], got {backward_layers}")
    per_layer = sum(4.0 * int(n) ** 2 * width for n in lengths) * (0.5 if causal else 1.0)
    return per_layer * (layers + 2 * backward_layers)


def linear_flops(params: int, trained: int, tokens: int, backward: bool) -> float:
    """Matmul FLOPs of ``params`` weights applied to ``tokens`` tokens over one step.

    2 per weight and token forward, 2 more for the gradient of the input when backward runs
    through the layer, and 2 more for the weight's own gradient when it trains.
    """
    return (2.0 * params + (2.0 * params if backward else 0.0) + 2.0 * trained) * tokens


def step_flops(model, cfg, batch: dict, summary) -> dict[str, float]:
    """Model FLOPs of one step by part; recomputation from checkpointing is not counted.

    The decoder layers and ViT blocks (their weights and attention; see :func:`linear_flops` and
    :func:`attention_flops`), with backward through the layers ``summary`` (a
    :class:`monkeytune.memory.ParamSummary`) says it reaches: the LLM from ``llm_from``, the ViT
    from ``vision_from`` (none when it is None). The LLM's attention is causal within each
    sample (``seq_lens``); the ViT's is full over the patches of each view. The LM head runs on
    supervised positions only; embeddings are lookups; the resampler is not counted (under 1% at
    monkey-7b sizes).
    """
    lengths = [int(n) for n in batch["seq_lens"].flatten() if int(n) > 0]
    tokens = sum(lengths)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    views = int(batch["pixel_values"].shape[0])
    per_view = (cfg.image.window_size // cfg.vision.patch_size) ** 2

    def blocks(prefix: str, n_tokens: int, backward_from: int | None) -> float:
        sizes: dict[int, list[int]] = {}
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                entry = sizes.setdefault(int(name[len(prefix):].split(".")[0]), [0, 0])
                entry[0] += p.numel()
                entry[1] += p.numel() if p.requires_grad else 0
        return sum(linear_flops(total, trained, n_tokens, backward_from is not None and i >= backward_from)
                   for i, (total, trained) in sizes.items())

    llm_layers, vit_layers = cfg.llm.num_layers, cfg.vision.layers
    vit_backward = 0 if summary.vision_from is None else max(0, vit_layers - summary.vision_from)
    head = model.llm.get_output_embeddings().weight
    parts = {
        "llm_linear": blocks("llm.model.layers.", tokens, summary.llm_from),
        "llm_attention": attention_flops(lengths, cfg.llm.hidden_size, llm_layers,
                                         max(0, llm_layers - summary.llm_from), causal=True),
        "vit_linear": blocks("vision.blocks.", views * per_view, summary.vision_from),
        "vit_attention": attention_flops([per_view] * views, cfg.vision.width, vit_layers, vit_backward, causal=False),
        "lm_head": linear_flops(head.numel(), head.numel() if head.requires_grad else 0, supervised, True),
    }
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------- memory and fit
def device_total_memory(device: str) -> int:
    """Total memory of the device a case runs on: the GPU's, or on a CPU the machine's RAM."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit_decision(estimate_bytes: int, total_bytes: int) -> tuple[bool, str]:
    """``(fits, why)``: a case fits when its estimate is at most the device's total memory.

    No margin is taken off: what the estimate leaves out (CUDA context, fragmentation) is what
    the out-of-memory safety net is for.
    """
    fits = estimate_bytes <= total_bytes
    return fits, (f"estimate {estimate_bytes / GIB:.1f} GiB {'<=' if fits else '>'} "
                  f"device total {total_bytes / GIB:.1f} GiB")


def policy_estimate(cfg, policy: str, precision: str, batch_size: int, tokens: int):
    """``(MemoryEstimate, ParamSummary)`` of one step on one GPU, from a meta-device build.

    ``tokens`` is the step's total (visual tokens included), split evenly over ``batch_size``
    samples of one image each; gradient checkpointing is on (``total_ckpt``).
    """
    from monkeytune.memory import estimate_memory, summarize
    from monkeytune.model import build_model
    from monkeytune.policy import TrainPlan, plan_report

    with torch.device("meta"):
        summary = summarize(plan_report(build_model(cfg), TrainPlan(policy)).decisions, cfg)
    est = estimate_memory(summary, cfg, precision, "ddp", 1, batch_size=batch_size,
                          seq_len=max(1, tokens // batch_size))
    return est, summary


def flash_attention_status(device: str) -> tuple[bool, str]:
    """Whether ``flash_attention_2`` can run here, and why not."""
    if device != "cuda":
        return False, "flash_attention_2 needs a CUDA device; this run has none"
    try:
        import flash_attn  # noqa: F401, PLC0415
    except Exception as e:  # noqa: BLE001 - a broken build raises more than ImportError
        return False, f"the flash_attn package does not import ({type(e).__name__}: {e})"
    return True, "flash_attn imports"


# ---------------------------------------------------------------- cases
def _setup(args, device: str) -> dict:
    gpu = device == "cuda"
    preset, precision = ("monkey-7b", "bf16") if gpu else ("mid", "fp32")
    flash, _ = flash_attention_status(device)
    attention = "flash_attention_2" if flash else "sdpa"
    return {"gpu": gpu, "preset": preset, "precision": precision,
            "dtype": torch.bfloat16 if gpu else torch.float32, "attention": attention,
            "packing": args.packing == "on" or (args.packing == "auto" and attention == "flash_attention_2")}


def text_only(item: dict, cfg) -> dict:
    """A :func:`make_samples` sample with its image (start, pads, end tokens and views) removed."""
    pads = item["input_ids"].unfold(0, cfg.tokens_per_image, 1).eq(cfg.image_pad_id).all(1)
    start = int(pads.nonzero()[0]) - 1  # the image start token, then the pads, then the end token
    keep = torch.ones_like(item["input_ids"], dtype=torch.bool)
    keep[start : start + cfg.tokens_per_image + 2] = False
    ids, labels = item["input_ids"][keep].clone(), item["labels"][keep].clone()
    # Random text can hit an image token id in presets with a small vocabulary (tiny): not in text-only.
    stray = torch.isin(ids, torch.tensor([cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id]))
    ids[stray] = 100
    labels[stray & (labels != -100)] = 100
    return {**item, "input_ids": ids, "labels": labels, "num_images": 0,
            "pixel_values": item["pixel_values"][:0], "view_slots": item["view_slots"][:0]}


def one_batch(cfg, batch: int, tokens: int, packing: bool, images: bool = True) -> dict:
    """One micro-batch of ``batch`` samples of ``tokens`` tokens (one image each, or text only)."""
    if images:
        samples = make_samples(cfg, batch, seed=3, text=(max(16, tokens - cfg.tokens_per_image - 2),) * 2)
    else:
        samples = [text_only(it, cfg) for it in make_samples(cfg, batch, seed=4, text=(tokens, tokens))]
    rows = max(len(it["input_ids"]) for it in samples) * batch  # every sample in one row
    return micro_batches(samples, "padding_free" if packing else "dynamic", rows, batch)[0]


def build_case_model(cfg, policy: str, precision: str, device: str, attention: str, compat: bool):
    """The model of a case: random weights, plan applied, frozen weights in the compute dtype,
    checkpointing on; ``compat`` installs the Qwen compat layer as an official checkpoint's load does."""
    from monkeytune.model import build_model
    from monkeytune.model.monkey import enable_llm_checkpointing
    from monkeytune.model.qwen_compat import CompatConfig, apply_compat
    from monkeytune.policy import TrainPlan, apply_plan
    from monkeytune.train.setup import hold_frozen_in_compute_dtype, select_attention

    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg).train()
    if compat:
        apply_compat(model.llm, CompatConfig())  # the official config's seq_length, NTK and log-n flags
    apply_plan(model, TrainPlan(policy))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    hold_frozen_in_compute_dtype(model, trained, precision)
    select_attention(model, attention)  # keeps the compat layer, over the new implementation
    enable_llm_checkpointing(model.llm)
    model.vision.gradient_checkpointing = True
    return model


def adamw(model, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trained parameters, fused where the trainer fuses it (every parameter on a GPU)."""
    from monkeytune.train.optim import use_fused_adamw

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, fused=use_fused_adamw([{"params": params}]) or None)


def train_case(held: dict, args, device: str, policy: str, setup: dict, summary, compat: bool = False) -> dict:
    """Build, train ``args.steps`` timed steps (after a warm-up step), measure; model and optimizer in ``held``."""
    from monkeytune.config import get_config

    cfg = get_config(setup["preset"])
    batch = one_batch(cfg, args.batch, args.tokens, setup["packing"])
    tokens = int(batch["seq_lens"].sum())
    base = _reset_peak(device)  # before the model: the peak then counts weights, states and activations
    held["model"] = build_case_model(cfg, policy, setup["precision"], device, setup["attention"], compat)
    model = held["model"]
    held["opt"] = adamw(model, 1e-4 if setup["gpu"] else 1e-3)
    opt, dtype = held["opt"], setup["dtype"]
    losses = [_train_step(model, opt, batch, device, dtype)]  # warm-up: kernels, optimizer states
    _reset_peak(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(_train_step(model, opt, batch, device, dtype))
        if setup["gpu"]:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = _peak(device, base)
    flops = step_flops(model, cfg, batch, summary)
    return {
        "attention": model.llm.config._attn_implementation, "packing": setup["packing"],
        "row_shape": list(batch["input_ids"].shape), "batch": args.batch, "tokens": tokens,
        "step_s": round(seconds, 3), "samples_per_s": round(args.batch / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "tflops_per_step": round(flops["total"] / 1e12, 3), "tflops_per_s": round(flops["total"] / seconds / 1e12, 3),
        "attention_flops_fraction": round((flops["llm_attention"] + flops["vit_attention"]) / flops["total"], 4),
        "peak_bytes": peak, "peak_reserved_bytes": torch.cuda.max_memory_reserved() if setup["gpu"] else None,
        "losses": [round(x, 4) for x in losses], "loss_falls": losses[-1] < losses[0],
    }


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def guarded(row: dict, device: str, fn, *fn_args, **fn_kwargs) -> dict:
    """Run ``fn(held, ...)`` into ``row``; an out-of-memory or any other error becomes the row's status.

    ``fn`` keeps its model and optimizer in ``held``, so they can be dropped here after an
    out-of-memory error (then ``gc`` and ``torch.cuda.empty_cache``) and the next case starts
    from an empty GPU.
    """
    held: dict = {}
    oom = None
    try:
        row.update(fn(held, *fn_args, **fn_kwargs))
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        oom = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
    except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' rows
        traceback.print_exc()
        row.update(status="error", reason=f"{type(e).__name__}: {e}"[:1000])
    # Out of the except blocks: the exception and its traceback (whose frames hold the graph) are gone.
    held.clear()
    _free(device)
    if oom is not None:
        row.update(status="out of memory", reason=f"torch.cuda.OutOfMemoryError ({row.get('fit', 'no estimate')}): {oom}")
    return row


def check_policy(args, device: str, policy: str, setup: dict, total: int, case: str | None = None,
                 compat: bool = False) -> dict:
    """One case in one process: the fit decision, then (if it fits) the guarded run."""
    from monkeytune.config import get_config

    row = {"case": case or policy, "policy": policy, "preset": setup["preset"], "precision": setup["precision"],
           "compat": compat, "device_total_bytes": total}
    try:
        est, summary = policy_estimate(get_config(setup["preset"]), policy, setup["precision"], args.batch,
                                       args.batch * args.tokens)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {**row, "status": "error", "reason": f"estimate: {type(e).__name__}: {e}"}
    fits, why = fit_decision(est.total_ckpt, total)
    row.update(estimate_bytes=est.total_ckpt, fit=why)
    if not fits:
        return {**row, "status": "does not fit", "reason": f"by monkeytune.memory's estimate: {why}"}
    return guarded(row, device, train_case, args, device, policy, setup, summary, compat)


def check_compat(args, device: str, setup: dict, total: int) -> dict:
    flash, why = flash_attention_status(device)
    if not flash:
        return {"case": COMPAT_CASE, "policy": SIDE_POLICY, "compat": True, "status": "skipped", "reason": why}
    compat_setup = {**setup, "attention": "flash_attention_2",
                    "packing": args.packing in ("auto", "on")}
    return check_policy(args, device, SIDE_POLICY, compat_setup, total, case=COMPAT_CASE, compat=True)


def check_ddp(args, device: str, setup: dict, total: int) -> dict:
    from monkeytune.config import get_config

    row = {"case": DDP_CASE, "policy": SIDE_POLICY, "world": 2}
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus < 2:
        return {**row, "status": "not run", "reason": f"{gpus} GPU" if gpus else "no GPU (CPU run)"}
    est, _ = policy_estimate(get_config(setup["preset"]), SIDE_POLICY, setup["precision"], args.batch,
                             args.batch * args.tokens)
    fits, why = fit_decision(est.total_ckpt, total)
    row.update(estimate_bytes=est.total_ckpt, fit=why)
    if not fits:
        return {**row, "status": "does not fit", "reason": f"by monkeytune.memory's estimate (per GPU): {why}"}
    _free(device)  # the parent's cached blocks on GPU 0 go back before rank 0 starts there
    opts = {"device": device, "preset": setup["preset"], "precision": setup["precision"], "policy": SIDE_POLICY,
            "attention": setup["attention"], "packing": setup["packing"], "batch": args.batch,
            "tokens": args.tokens, "steps": args.steps, "lr": 1e-4}
    from gpu_check_ddp import launch_ddp  # noqa: PLC0415 - the 2-GPU case's own module

    return {**row, "attention": setup["attention"], **launch_ddp(opts, 2, args.ddp_timeout)}


# ---------------------------------------------------------------- report
def _line(r: dict) -> str:
    head = f"{r['case']:<15}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('reason')}"
    if r["case"] == DDP_CASE:
        return head + " ok: " + "; ".join(
            f"rank {x['rank']} ({x['images']} images) {x['tokens_per_s']} tokens/s, losses {x['losses']}"
            for x in r["ranks"]) + "; trained weights equal on both ranks"
    reserved = r["peak_reserved_bytes"]
    return (f"{head} {r['preset']} {r['precision']} {r['attention']}"
            f"{' packed ' + 'x'.join(map(str, r['row_shape'])) if r['packing'] else ''}: {r['samples_per_s']} samples/s, "
            f"{r['tokens_per_s']} tokens/s, MFU {100 * r['mfu']:.1f}% of measured"
            + (f", {100 * r['mfu_datasheet']:.1f}% of datasheet" if r["mfu_datasheet"] is not None else "")
            + f", peak {r['peak_bytes'] / GIB:.2f} GiB"
            + (f" (reserved {reserved / GIB:.2f} GiB)" if reserved is not None else "")
            + f", estimate {r['estimate_bytes'] / GIB:.2f} GiB, loss {r['losses'][0]} -> {r['losses'][-1]} "
            f"({'falls' if r['loss_falls'] else 'does NOT fall'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per case (after one warm-up step)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per sample, visual tokens included")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="padding-free packing of the batch's samples (auto: with flash_attention_2)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--ddp-timeout", type=float, default=300.0,
                   help="seconds the 2-GPU case may take before its ranks are killed and reported hung")
    args = p.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # A fixed mmap threshold (M_MMAP_THRESHOLD): freed tensors go back to the system at once,
        # so the resident-set peak follows live memory as a GPU allocator's peak does.
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    peak_flops = matmul_peak(device, torch.bfloat16 if device == "cuda" else torch.float32)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    sheet = datasheet_peak_tflops(name) if device == "cuda" else None
    total = device_total_memory(device)
    _free(device)
    setup = _setup(args, device)
    print(f"{name}: measured matmul peak {peak_flops / 1e12:.3g} TFLOP/s ({'bf16' if device == 'cuda' else 'fp32'}), "
          f"datasheet dense bf16 peak {sheet if sheet is not None else 'unknown'} TFLOP/s, "
          f"{total / GIB:.1f} GiB {'total' if device == 'cuda' else 'RAM'}; {setup['preset']} {setup['precision']}, "
          f"attention {setup['attention']}", flush=True)
    rows = []
    for case in cases:
        if case in POLICIES:
            r = check_policy(args, device, case, setup, total)
        elif case == COMPAT_CASE:
            r = check_compat(args, device, setup, total)
        else:
            r = check_ddp(args, device, setup, total)
        if r.get("status") == "ok" and "tflops_per_s" in r:
            r["mfu"] = round(r["tflops_per_s"] * 1e12 / peak_flops, 4)
            r["mfu_datasheet"] = round(r["tflops_per_s"] / sheet, 4) if sheet else None
        rows.append(r)
        print(_line(r), flush=True)
    print(json.dumps({"device": name, "matmul_peak_tflops": round(peak_flops / 1e12, 2),
                      "datasheet_bf16_tflops": sheet, "device_total_bytes": total, "rows": rows}))


if __name__ == "__main__":
    main()
