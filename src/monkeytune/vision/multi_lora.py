"""Per-window LoRA: K adapter sets stored as stacked tensors and applied to a batch of views at once.

Monkey gives every window position of the grid its own low-rank adapters inside the shared ViT,
while the global view uses none. Holding the K adapters as ``[K, ...]`` tensors (rather than K
modules) lets two dense matmuls serve every view of every image in a batch: each view is projected
down by all K adapters at once (``K x rank`` features, a few dozen), everything but its own slot's
features is zeroed by a gate, and one up projection sums what is left. No Python loop over windows,
no per-view copy of adapter weights and no gather or scatter of views runs in the forward; the
extra down projections cost ``K x rank / out_features`` of the base layer's work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SlotIndex:
    """Which adapter each view uses, computed once per tower forward.

    Attributes:
        pick: ``[N, K]`` float32 one-hot of ``slots`` over the K adapter slots; a view without an
            adapter has a zero row. Gating by it rather than indexing (``lora_a[slots]``) keeps
            the backward a plain matmul: the backward of a gather accumulates the views of one
            slot in an order that varies from process to process on a multi-threaded CPU, so
            runs with the same seed would drift apart.
    """

    pick: torch.Tensor

    @classmethod
    def from_slots(cls, slots: torch.Tensor, num_slots: int) -> "SlotIndex":
        """Args: slots ``[N]`` int64, -1 for views without an adapter; num_slots: K."""
        if not num_slots:
            return cls(slots.new_zeros(slots.shape[0], 0, dtype=torch.float32))
        return cls(F.one_hot(slots.clamp(min=0), num_slots).float() * (slots >= 0).float()[:, None])


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
        k, r = self.slots, self.rank
        # Every adapter's down projection of every view: [N, L, K * r], a few dozen features.
        down = F.linear(self.dropout(x), self.lora_a.reshape(k * r, self.in_features))
        # Keep each view's own slot at its gain; a view without an adapter keeps nothing, so its
        # delta is exactly zero.
        gate = (index.pick.to(self.lora_scale.dtype) * self.lora_scale).repeat_interleave(r, dim=1)
        down = down * gate.to(down.dtype)[:, None, :]
        # lora_b [K, out, r] laid out as [out, K * r] to match the down features' order.
        return F.linear(down, self.lora_b.permute(1, 0, 2).reshape(self.out_features, k * r))

    def extra_repr(self) -> str:
        return f"slots={self.slots}, in={self.in_features}, out={self.out_features}, rank={self.rank}"
