"""Cross-rank check that every process trains the same parameters.

A rank that trains a different set (a config read differently, a stage applied at a different
step) makes DDP hang or silently average mismatched gradients. Comparing one hash per rank costs
a single small ``all_gather``; the name lists are gathered only when the hashes differ, to say
exactly which parameters disagree.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from monkeytune.policy.plan import trainable_names
from monkeytune.policy.rules import PlanError


def _names_hash(names: list[str]) -> int:
    digest = hashlib.sha256("\n".join(names).encode()).digest()
    # Signed int64 so it fits a LongTensor on any backend.
    return int.from_bytes(digest[:8], "little", signed=True)


def _some(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_trainable_consistent(model: nn.Module, group: dist.ProcessGroup | None = None) -> bool:
    """Raise on every rank if the ranks' trainable parameter sets differ.

    A no-op (returning ``False``) when ``torch.distributed`` is not initialised.
    Must be called by all ranks of ``group``.

    Args:
        model: The model (DDP-wrapped or not).
        group: Process group; the default group when ``None``.

    Returns:
        ``True`` when the check ran and every rank agrees.

    Raises:
        PlanError: Naming, per rank, the parameters it trains that rank 0 does not, and the
            parameters rank 0 trains that it does not.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    names = trainable_names(model)
    world = dist.get_world_size(group)
    device = _collective_device(group)
    mine = torch.tensor([_names_hash(names)], dtype=torch.int64, device=device)
    hashes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(hashes, mine, group=group)
    if all(int(h) == int(hashes[0]) for h in hashes):
        return True
    lists: list[list[str] | None] = [None] * world
    dist.all_gather_object(lists, names, group=group)
    ref = set(lists[0] or [])
    lines = []
    for rank, other in enumerate(lists):
        other_set = set(other or [])
        if other_set == ref:
            continue
        extra, lacking = sorted(other_set - ref), sorted(ref - other_set)
        parts = []
        if extra:
            parts.append(f"trains {len(extra)} that rank 0 does not: {_some(extra)}")
        if lacking:
            parts.append(f"freezes {len(lacking)} that rank 0 trains: {_some(lacking)}")
        lines.append(f"  rank {rank} " + "; ".join(parts))
    raise PlanError("trainable parameters differ across ranks:\n" + "\n".join(lines))
