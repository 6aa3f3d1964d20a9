"""The shared vision transformer in the Qwen-VL/Monkey layout, with per-window LoRA in every block.

All views of all images of a batch run through the tower in one batched forward. The frozen base
projections see every view; each view's adapters (chosen by its slot) are added by
:class:`~monkeytune.vision.multi_lora.MultiLoRA`. The module layout matches the official one so
that official weights map onto it one to one (see ``monkeytune.model.convert``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from monkeytune.config import VisionConfig
from monkeytune.vision.multi_lora import MultiLoRA, SlotIndex, WindowLayout


def resize_pos_embed(table: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a square ``[P*P, D]`` position table to ``[H*W, D]``.

    Interpolation runs in float32 (as the official code does) and returns the table's dtype.
    """
    side = int(round(table.shape[0] ** 0.5))
    if (side, side) == tuple(grid_hw):
        return table
    grid = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(grid_hw[0] * grid_hw[1], -1).to(table.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv input projection, via SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, L, 3*D]`` -> three ``[N, heads, L, D/heads]``.

        The fused projection is laid out per head as ``[q_h, k_h, v_h]`` (head-major), which is how
        the official tower splits it.
        """
        n, length, _ = qkv.shape
        qkv = qkv.view(n, length, self.heads, 3, -1).permute(3, 0, 2, 1, 4)
        return qkv[0], qkv[1], qkv[2]


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm ViT block with three per-window adapters.

    * ``lora_qkv`` reads the normalised input and adds to the fused qkv projection;
    * ``lora_proj`` reads the attention context and adds to the output projection;
    * ``lora_mlp`` is a parallel adapter: it reads the residual stream *before* the MLP (not the
      normalised input) and adds to the block's output.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        w, eps, k = cfg.width, cfg.layer_norm_eps, cfg.lora_slots
        self.ln_1 = nn.LayerNorm(w, eps=eps)
        self.attn = Attention(w, cfg.heads)
        self.ln_2 = nn.LayerNorm(w, eps=eps)
        self.mlp = MLP(w, cfg.mlp_width)
        self.has_lora = k > 0
        if self.has_lora:
            self.lora_qkv = MultiLoRA(k, w, 3 * w, cfg.lora_rank_attn, cfg.lora_dropout)
            self.lora_proj = MultiLoRA(k, w, w, cfg.lora_rank_attn, cfg.lora_dropout)
            self.lora_mlp = MultiLoRA(k, w, w, cfg.lora_rank_mlp, cfg.lora_dropout)

    def forward(self, x: torch.Tensor, slots: "torch.Tensor | SlotIndex | None",
                aside: torch.Tensor | None = None) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
        """Args: x ``[N, L, D]``; slots ``[N]`` (-1 = no adapter), a :class:`SlotIndex`, or None
        for views without adapters; aside ``[M, L, D]``: views without adapters to run without
        autograd in the same call (see :meth:`VisionTower.forward`).

        Returns ``[N, L, D]``, and with ``aside`` its ``[M, L, D]`` result too.
        """
        if aside is None:
            return self._run(x, slots)
        out = self._run(x, slots)
        with torch.no_grad():
            return out, self._run(aside, None)

    def _run(self, x: torch.Tensor, slots: "torch.Tensor | SlotIndex | None") -> torch.Tensor:
        n, length, d = x.shape
        adapted = self.has_lora and slots is not None
        h = self.ln_1(x)
        qkv = self.attn.qkv(h)
        if adapted:
            qkv = qkv + self.lora_qkv(h, slots)
        q, k, v = self.attn.split_heads(qkv)
        ctx = F.scaled_dot_product_attention(q, k, v)
        ctx = ctx.transpose(1, 2).reshape(n, length, d)
        out = self.attn.proj(ctx)
        if adapted:
            out = out + self.lora_proj(ctx, slots)
        x = x + out
        y = x + self.mlp(self.ln_2(x))
        if adapted:
            y = y + self.lora_mlp(x, slots)
        return y


class VisionTower(nn.Module):
    """Patch embedding, learned absolute positions, ``ln_pre`` and the block stack.

    Returns patch features; the resampler (a separate module) compresses them to queries.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.pos_embed = nn.Parameter(torch.randn(cfg.pos_grid**2, cfg.width) * cfg.width**-0.5)
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        # A training setting (train.gradient_checkpointing), switched on by the trainer.
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Encode views.

        Args:
            pixel_values: ``[N, 3, S, S]`` normalised views.
            slots: ``[N]`` int64 adapter slot per view (-1 for views without adapters), on the
                CPU or on the views' device.

        Returns:
            ``[N, (S/patch)^2, width]`` patch features.
        """
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(pixel_values.to(dtype))  # [N, D, h, w]
        grid_hw = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, D]
        x = x + resize_pos_embed(self.pos_embed, grid_hw)
        x = self.ln_pre(x)
        # Once per forward, shared by every adapter. Slots on the CPU (even for views on an
        # accelerator) let the index see the regular window layout without a host sync.
        index = SlotIndex.from_slots(slots, self.cfg.lora_slots, device=x.device)
        layout = index.layout
        if layout is None or layout.windows == layout.views_per_image or not torch.is_grad_enabled() \
                or not self._base_frozen():
            return self._blocks(x, index, None)[0]
        # Training with the tower's base frozen (Monkey's recipe): the views without an adapter
        # (the global view) have nothing in the tower to train and no input that needs a
        # gradient, so they run beside the window views without autograd: no activations kept
        # for them, no backward through them. Each block still runs once (one all-gather when
        # sharded), on the window views with autograd and on the others without.
        b, v, first, w = layout.images, layout.views_per_image, layout.first_view, layout.windows
        views = x.unflatten(0, (b, v))
        windows = views[:, first : first + w].flatten(0, 1)
        aside = torch.cat([views[:, :first], views[:, first + w :]], dim=1).flatten(0, 1)
        pick = index.pick.unflatten(0, (b, v))[:, first : first + w].flatten(0, 1)
        windows_only = SlotIndex(pick, WindowLayout(b, w, 0, layout.first_slot, w))
        windows, aside = self._blocks(windows, windows_only, aside)
        aside = aside.unflatten(0, (b, v - w))
        out = torch.cat([aside[:, :first], windows.unflatten(0, (b, w)), aside[:, first:]], dim=1)
        return out.flatten(0, 1)

    def _base_frozen(self) -> bool:
        return not any(p.requires_grad for name, p in self.named_parameters() if ".lora_" not in name)

    def _blocks(self, x: torch.Tensor, index: SlotIndex, aside: torch.Tensor | None):
        """Run the block stack on ``x`` (and ``aside`` without autograd). Returns ``(x, aside)``."""
        for block in self.blocks:
            args = (x, index) if aside is None else (x, index, aside)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                out = checkpoint(block, *args, use_reentrant=False)
            else:
                out = block(*args)
            x, aside = (out, None) if aside is None else out
        return x, aside
