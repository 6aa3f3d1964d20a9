"""Per-window LoRA: K adapter sets stored as stacked tensors and applied to a batch of views at once.

Monkey gives every window position of the grid its own low-rank adapters inside the shared ViT,
while the global view uses none. The K adapters are held as ``[K, ...]`` tensors (rather than K
modules) so that one batched pass serves every view of every image, with no Python loop over
windows and no gather or scatter of views:

* Regular layout (the tower's own: image-major, window-minor, every image with the same views,
  e.g. ``[0, 1, 2, 3, -1] * B``): the views are reshaped to ``[B, V, L, in]``, the window views
  go through one batched matmul against the slice of adapters they use, and the views without an
  adapter get zeros. Each view runs only its own adapter. The layout is read from slots on the
  CPU only (see :class:`SlotIndex`), so recognising it never waits on a device.
* Any other slot vector: a dense pass. Each view is projected down by all K adapters at once
  (``K x rank`` features, a few dozen), everything but its own slot's features is zeroed by a
  gate, and one up projection sums what is left. It costs K times the adapter work of the
  regular pass.

Neither pass indexes adapters by slot (``lora_a[slots]``): the backward of such a gather
accumulates the views of one slot in an order that varies from process to process on a
multi-threaded CPU, so runs with the same seed would drift apart. Both passes reduce over views
only inside matmuls and ``sum`` reductions, which are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class WindowLayout:
    """A slot vector that is one per-image pattern repeated, with its adapted views in one run.

    The slots are ``pattern * images`` where ``pattern`` (length ``views_per_image``) is
    ``-1`` everywhere except at the view positions ``first_view .. first_view + windows - 1``,
    which use the consecutive slots ``first_slot .. first_slot + windows - 1``.

    Attributes:
        images: B, the number of repetitions of the pattern.
        views_per_image: V, the pattern's length.
        first_view: Position within the pattern of the first view with an adapter.
        first_slot: The slot that view uses.
        windows: W >= 1, the number of consecutive views with an adapter.
    """

    images: int
    views_per_image: int
    first_view: int
    first_slot: int
    windows: int

    @classmethod
    def detect(cls, slots: list[int], num_slots: int) -> "WindowLayout | None":
        """The layout of ``slots`` (``[N]`` ints, negative for no adapter), or None if it is irregular.

        A slot vector without any adapted view returns None too: the dense pass then still runs
        every adapter, which keeps all adapter weights in the graph (see
        ``Monkey._idle_vision_path``).
        """
        n = len(slots)
        # The shortest period that divides N. A longer valid period would repeat the adapted run
        # within one pattern, so if the shortest one does not have the expected shape none does.
        period = next(v for v in range(1, n + 1) if n % v == 0 and slots[v:] == slots[: n - v]) if n else 0
        pattern = slots[:period]
        adapted = [j for j, s in enumerate(pattern) if s >= 0]
        if not adapted:
            return None
        first, windows = adapted[0], len(adapted)
        first_slot = pattern[first]
        # The adapted views must be consecutive and use consecutive slots, so that both are slices.
        if adapted[-1] - first + 1 != windows or first_slot + windows > num_slots:
            return None
        if pattern[first : first + windows] != list(range(first_slot, first_slot + windows)):
            return None
        return cls(n // period, period, first, first_slot, windows)


@dataclass(frozen=True)
class SlotIndex:
    """Which adapter each view uses, computed once per tower forward.

    Attributes:
        pick: ``[N, K]`` float32 one-hot of ``slots`` over the K adapter slots; a view without an
            adapter has a zero row. The dense pass gates by it.
        layout: The slots' :class:`WindowLayout` when they have one and it was known without a
            device-to-host copy (slots on the CPU); None sends :class:`MultiLoRA` down the dense
            pass.
    """

    pick: torch.Tensor
    layout: WindowLayout | None = None

    @classmethod
    def from_slots(cls, slots: torch.Tensor, num_slots: int, device: torch.device | str | None = None) -> "SlotIndex":
        """Build the index of a slot vector.

        Args:
            slots: ``[N]`` int64 adapter slot per view, -1 for views without an adapter.
            num_slots: K.
            device: Where ``pick`` goes (default: ``slots``' device). Passing CPU slots for views
                on an accelerator gets the regular pass there too, at no host sync.

        Returns:
            The index; its layout is detected only for CPU slots, where reading them is free.
        """
        layout = None
        if num_slots and slots.device.type == "cpu":
            layout = WindowLayout.detect(slots.tolist(), num_slots)
        if not num_slots:
            pick = slots.new_zeros(slots.shape[0], 0, dtype=torch.float32)
        else:
            pick = F.one_hot(slots.clamp(min=0), num_slots).float() * (slots >= 0).float()[:, None]
        return cls(pick if device is None else pick.to(device), layout)


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
        if index.layout is not None:
            return self._forward_regular(x, index.layout)
        return self._forward_dense(x, index.pick)

    def _forward_regular(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Each window view through its own adapter only, in one batched matmul per projection.

        Args:
            x: ``[N, L, in_features]`` with ``N = layout.images * layout.views_per_image``.
            layout: Where the adapted views are.

        Returns:
            ``[N, L, out_features]``, exactly zero for the views without an adapter.
        """
        b, v, w = layout.images, layout.views_per_image, layout.windows
        n, length, _ = x.shape
        if n != b * v:
            raise ValueError(f"x has {n} views but the slot layout has {b} x {v}")
        lo, hi = layout.first_slot, layout.first_slot + w
        before, after = layout.first_view, v - layout.first_view - w
        windows = x.reshape(b, v, length, self.in_features)
        if before or after:
            # [B, W, L, in]: a strided view of the window views. Taken only when there are other
            # views, as its backward writes the input gradient into a zero-filled buffer.
            windows = windows[:, before : before + w]
        windows = self.dropout(windows)
        # Slicing (not indexing) the adapters keeps the backward of the weights a matmul over each
        # slot's views plus a sum over images; unused slots get zero gradients, as in the dense pass.
        down = torch.matmul(windows, self.lora_a[lo:hi].transpose(1, 2))  # [B, W, L, r]
        down = down * self.lora_scale[lo:hi].to(down.dtype)[:, None, None]
        up = torch.matmul(down, self.lora_b[lo:hi].transpose(1, 2))  # [B, W, L, out]
        if before or after:
            # Zeros for the views without an adapter, joined along the view axis: a copy, not a
            # scatter. They are one expanded scalar, so only the joined result is written.
            zero = up.new_zeros(())
            zeros = [zero.expand(b, k, length, self.out_features) for k in (before, after)]
            up = torch.cat([p for p in (zeros[0], up, zeros[1]) if p.shape[1]], dim=1)
        return up.reshape(n, length, self.out_features)

    def _forward_dense(self, x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """Every view through all K adapters, gated down to its own.

        Args:
            x: ``[N, L, in_features]``.
            pick: ``[N, K]`` one-hot slot of each view (zero row: no adapter).

        Returns:
            ``[N, L, out_features]``.
        """
        k, r = self.slots, self.rank
        # Every adapter's down projection of every view: [N, L, K * r], a few dozen features.
        down = F.linear(self.dropout(x), self.lora_a.reshape(k * r, self.in_features))
        # Keep each view's own slot at its gain; a view without an adapter keeps nothing, so its
        # delta is exactly zero.
        gate = (pick.to(self.lora_scale.dtype) * self.lora_scale).repeat_interleave(r, dim=1)
        down = down * gate.to(down.dtype)[:, None, :]
        # lora_b [K, out, r] laid out as [out, K * r] to match the down features' order.
        return F.linear(down, self.lora_b.permute(1, 0, 2).reshape(self.out_features, k * r))

    def extra_repr(self) -> str:
        return f"slots={self.slots}, in={self.in_features}, out={self.out_features}, rank={self.rank}"
