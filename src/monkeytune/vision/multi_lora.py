"""Per-window LoRA: K adapter sets stored as stacked tensors and applied to a batch of views at once.

Monkey gives every window position of the grid its own low-rank adapters inside the shared ViT,
while the global view uses none. Holding the K adapters as ``[K, ...]`` tensors (rather than K
modules) lets one batched matmul serve every view of every image in a batch: each view gathers the
adapter of its slot and ``einsum`` does the rest. No Python loop over windows runs in the forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SlotIndex:
    """Which views carry an adapter, computed once per tower forward.

    Finding the active views needs ``nonzero``, a device-to-host sync on GPUs; doing it once per
    forward instead of in each of the ``3 x layers`` adapters keeps the tower free of syncs.

    Attributes:
        active: ``[M]`` indices of the views with an adapter (slot >= 0).
        slots: ``[M]`` their slots.
        num_views: N, the number of views in the batch.
        pick: ``[M, K]`` float32 one-hot of ``slots`` over the K adapter slots. Adapters are
            selected by contracting with it rather than by indexing (``lora_a[slots]``): the
            backward of a gather accumulates the views of one slot in an order that varies from
            process to process on a multi-threaded CPU, so runs with the same seed would drift
            apart; a matmul gives the same selected weights exactly and a reproducible gradient.
    """

    active: torch.Tensor
    slots: torch.Tensor
    num_views: int
    pick: torch.Tensor

    @classmethod
    def from_slots(cls, slots: torch.Tensor, num_slots: int) -> "SlotIndex":
        """Args: slots ``[N]`` int64, -1 for views without an adapter; num_slots: K."""
        active = (slots >= 0).nonzero(as_tuple=True)[0]
        chosen = slots[active]
        pick = F.one_hot(chosen, num_slots).float() if num_slots else chosen.new_zeros(0, 0, dtype=torch.float32)
        return cls(active, chosen, int(slots.shape[0]), pick)


class MultiLoRA(nn.Module):
    """K independent adapters ``delta_k(x) = B_k(A_k(dropout(x))) * scale_k``.

    Attributes:
        lora_a: ``[K, r, in_features]`` down projections (Kaiming-uniform init, as nn.Linear).
        lora_b: ``[K, out_features, r]`` up projections (zero init, so a new adapter is a no-op).
        lora_scale: ``[K]`` learnable scalar gains (init 1).
    """

    def __init__(self, slots: int, in_features: int, out_features: int, rank: int, dropout: float = 0.0):
        super().__init__()
        self.slots, self.rank = slots, rank
        self.in_features, self.out_features = in_features, out_features
        self.lora_a = nn.Parameter(torch.empty(slots, rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(slots, out_features, rank))
        self.lora_scale = nn.Parameter(torch.empty(slots))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_a.is_meta:
            return
        with torch.no_grad():
            for k in range(self.slots):
                # Same bound as nn.Linear's default init for a [rank, in] weight.
                nn.init.kaiming_uniform_(self.lora_a[k], a=math.sqrt(5))
            nn.init.zeros_(self.lora_b)
            nn.init.ones_(self.lora_scale)

    def forward(self, x: torch.Tensor, slots: "torch.Tensor | SlotIndex") -> torch.Tensor:
        """Adapter output for each view (zero for views whose slot is negative).

        Args:
            x: ``[N, L, in_features]`` one row per view.
            slots: ``[N]`` int64 adapter index per view (``-1`` means no adapter, as for the
                global view), or the same as a precomputed :class:`SlotIndex`.

        Returns:
            ``[N, L, out_features]``: the delta to add to the base projection's output.
        """
        index = slots if isinstance(slots, SlotIndex) else SlotIndex.from_slots(slots, self.slots)
        n, length, _ = x.shape
        if index.active.numel() == 0:
            return x.new_zeros(n, length, self.out_features)
        xa = self.dropout(x[index.active])
        # Each view's adapter, selected by a one-hot contraction (see SlotIndex.pick).
        pick = index.pick.to(self.lora_a.dtype)  # [n_active, slots]
        a = torch.einsum("ns,sri->nri", pick, self.lora_a)
        b = torch.einsum("ns,sor->nor", pick, self.lora_b)
        # Apply each view's adapter in one batched contraction.
        down = torch.einsum("nli,nri->nlr", xa, a)
        up = torch.einsum("nlr,nor->nlo", down, b)
        up = up * (pick @ self.lora_scale).to(up.dtype)[:, None, None]
        # The zeros take the dtype of the computed delta, not of x: under autocast the einsums
        # run in bf16/fp16 while x (the fp32 residual stream) does not, and CUDA's index_copy
        # refuses mixed dtypes. Out-of-place scatter keeps autograd happy and leaves global-view
        # rows exactly zero.
        out = up.new_zeros(n, length, self.out_features)
        return out.index_copy(0, index.active, up)

    def extra_repr(self) -> str:
        return f"slots={self.slots}, in={self.in_features}, out={self.out_features}, rank={self.rank}"
