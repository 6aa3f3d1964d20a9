"""Worker of the two-process gloo tests (spawned by test_distributed.py; not a test module).

Each rank trains a small stand-in model whose parameter names follow the Monkey layout, with a
progressive-unfreezing stage at step 2, on rank-dependent data. Results go to ``out_dir``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from monkeytune.policy import (
    PlanError,
    TrainPlan,
    UnfreezeSchedule,
    apply_plan,
    apply_stage,
    build_param_groups,
    check_trainable_consistent,
    rewrap_ddp,
)

STAGE_STEP, STEPS = 2, 4


class Small(nn.Module):
    """``resampler`` -> ``llm.model.layers.{0,1}`` -> ``llm.lm_head``."""

    def __init__(self):
        super().__init__()
        self.resampler = nn.Linear(8, 8)
        self.llm = nn.Module()
        self.llm.model = nn.Module()
        self.llm.model.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.llm.lm_head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.resampler(x)
        for layer in self.llm.model.layers:
            h = torch.tanh(layer(h))
        return self.llm.lm_head(h)


def _train(rank: int, rewrap: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # identical initial weights on every rank
    model = Small()
    schedule = UnfreezeSchedule.from_config(
        TrainPlan("monkey-fix-llm"), [{"start_step": STAGE_STEP, "rules": ["train: llm.model.layers.1.*"]}])
    apply_plan(model, schedule.plan)
    opt = torch.optim.AdamW(build_param_groups(model, {"default": 0.05}, include_frozen=True))
    ddp = nn.parallel.DistributedDataParallel(model)
    start = model.llm.model.layers[1].weight.detach().clone()
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for step in range(STEPS):
        change = apply_stage(model, opt, schedule.stage_at(step))
        if change.changed and step > 0:
            check_trainable_consistent(ddp)
            if rewrap:
                ddp = rewrap_ddp(ddp)
        x = torch.randn(16, 8, generator=g)
        ddp(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {"start": start, "layer1": model.llm.model.layers[1].weight.detach().clone(),
            "layer0": model.llm.model.layers[0].weight.detach().clone(),
            "resampler": model.resampler.weight.detach().clone()}


def run(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: a TCP port chosen beforehand can be taken by another process first.
    store = os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {"rewrap": _train(rank, rewrap=True), "no_rewrap": _train(rank, rewrap=False)}
        # Mismatch: rank 1 also trains layer 0.
        model = Small()
        rules = ["train: llm.model.layers.0.*"] if rank == 1 else []
        apply_plan(model, TrainPlan("monkey-fix-llm").with_rules(rules))
        try:
            check_trainable_consistent(model)
            results["mismatch_error"] = ""
        except PlanError as exc:
            results["mismatch_error"] = str(exc)
        apply_plan(model, TrainPlan("monkey-fix-llm"))
        results["consistent"] = check_trainable_consistent(model)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Tear down together: a rank that destroys its group while the other still talks to
        # it can abort the other ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
