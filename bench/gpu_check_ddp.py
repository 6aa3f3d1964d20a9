"""The 2-GPU case of ``bench/gpu_check.py``: DDP where one rank draws only text-only micro-batches.

Two spawned processes (NCCL on GPUs; gloo on a CPU, to check the script) train ``monkey-fix-llm``
with ``find_unused_parameters=False``: rank 0's samples hold one image each, rank 1's are
text-only. Every trained vision weight must still get a gradient on rank 1, or DDP fails or
hangs. :func:`launch_ddp` reports whether both ranks finish and hold the same trained weights;
a rank still running at the deadline is killed and reported as hung, with the step it reached.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from gpu_check import adamw, build_case_model, one_batch
from train_step import _peak, _reset_peak, _train_step


def ddp_worker(rank: int, world: int, out_dir: str, opts: dict) -> None:
    """One rank of the DDP case: trains ``opts['steps'] + 1`` steps, writes ``rank<r>.json`` to ``out_dir``.

    Rank 0's micro-batches hold one image per sample, every other rank's are text-only. DDP runs
    with ``find_unused_parameters=False``: every trained weight must get a gradient on every rank.
    """
    import torch.distributed as dist
    from monkeytune.config import get_config

    result: dict = {"rank": rank, "status": "started", "stage": "process group"}
    out = Path(out_dir) / f"rank{rank}.json"
    progress = Path(out_dir) / f"rank{rank}.progress"  # how far a rank got, should it hang

    def stage(what: str) -> None:
        result["stage"] = what
        progress.write_text(json.dumps(result))

    try:
        device = opts["device"]
        if device == "cuda":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)
        # A file rendezvous: a TCP port chosen beforehand can be taken by another process first.
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"file://{Path(out_dir) / 'rendezvous'}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=opts["timeout"]))
        cfg = get_config(opts["preset"])
        batch = one_batch(cfg, opts["batch"], opts["tokens"], opts["packing"], images=rank == 0)
        stage("building the model")
        model = build_case_model(cfg, opts["policy"], opts["precision"], device, opts["attention"], compat=False)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rank] if device == "cuda" else None, find_unused_parameters=False)
        opt = adamw(model, opts["lr"])
        dtype = torch.bfloat16 if opts["precision"] == "bf16" else torch.float32
        base = _reset_peak(device)
        losses, times = [], []
        for step in range(opts["steps"] + 1):
            stage(f"step {step + 1} of {opts['steps'] + 1}")
            start = time.perf_counter()
            losses.append(_train_step(ddp, opt, batch, device, dtype))
            if device == "cuda":
                torch.cuda.synchronize()
            if step:  # the first step is the warm-up
                times.append(time.perf_counter() - start)
            result.update(losses=[round(x, 4) for x in losses], steps_done=step + 1)
        seconds = sorted(times)[len(times) // 2] if times else None
        tokens = int(batch["seq_lens"].sum())
        # float64 sums of the trained weights: equal on every rank if DDP kept them in sync.
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
        stage("final barrier")
        dist.barrier()  # both ranks done before either tears the group down
        result.update(status="ok", stage="done", images=int(batch["num_images"]), tokens=tokens,
                      step_s=None if seconds is None else round(seconds, 3),
                      tokens_per_s=None if not seconds else round(tokens / seconds, 1),
                      peak_bytes=_peak(device, base), checksum=checksum)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        result.update(status="error", reason=f"{type(e).__name__}: {e}"[:1000])
        traceback.print_exc()
    out.write_text(json.dumps(result))
    try:
        if dist.is_initialized() and result["status"] == "ok":
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def launch_ddp(opts: dict, world: int = 2, timeout: float = 300.0) -> dict:
    """Spawn ``world`` ranks of :func:`ddp_worker`, wait up to ``timeout`` seconds, summarise.

    Returns ``status`` ("ok" or "failed"), ``reason`` and the ranks' results (a rank still
    running at the deadline is killed and reported as hung).
    """
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        procs = [ctx.Process(target=ddp_worker, args=(r, world, tmp, {**opts, "timeout": timeout}))
                 for r in range(world)]
        for p in procs:
            p.start()
        paths = [Path(tmp) / f"rank{r}.json" for r in range(world)]
        deadline = time.monotonic() + timeout
        # Wait for every rank's result (or exit); a rank that wrote it gets a grace period to exit.
        while time.monotonic() < deadline and not all(x.is_file() or not p.is_alive() for x, p in zip(paths, procs)):
            if any(x.is_file() and json.loads(x.read_text())["status"] != "ok" for x in paths):
                break  # a failed rank leaves the others waiting in a collective: no need to wait them out
            time.sleep(0.5)
        grace = min(deadline, time.monotonic() + 30.0)
        for p in procs:
            p.join(max(0.0, grace - time.monotonic()))
        alive = [p.is_alive() for p in procs]
        for p, live in zip(procs, alive):
            if live:
                p.kill()
                p.join()
        ranks = []
        for r, x in enumerate(paths):
            partial = x.with_suffix(".progress")
            ranks.append(json.loads(x.read_text()) if x.is_file()
                         else json.loads(partial.read_text()) if partial.is_file() else {"rank": r, "status": "no result"})
    for r, p in enumerate(procs):
        ranks[r]["exitcode"] = p.exitcode
        if alive[r] and ranks[r]["status"] in ("no result", "started"):
            ranks[r]["status"] = f"hung at {ranks[r].get('stage', 'start-up')} (killed after {timeout:g} s)"
        elif alive[r]:
            ranks[r]["killed_after_result"] = True  # finished, but did not exit in time
    bad = [f"rank {r['rank']}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
           for r in ranks if r["status"] != "ok"]
    if bad:
        return {"status": "failed", "reason": "; ".join(bad), "ranks": ranks}
    sums = [r["checksum"] for r in ranks]
    if any(s != sums[0] for s in sums):
        return {"status": "failed", "ranks": ranks,
                "reason": f"the ranks' trained weights differ after the steps (checksums {sums})"}
    return {"status": "ok", "reason": None, "ranks": ranks}
