"""The resampler: learnable queries cross-attend to a view's patch features, giving a fixed token count.

Layout follows Qwen-VL/Monkey (``attn_pool`` + ``ln_post`` + ``proj`` in the official code): a
key/value projection from the ViT width to the LLM width, LayerNorms on queries and keys/values, a
fixed 2D sin-cos position table added to queries and (resized) to keys, multi-head cross-attention
with biases, then ``ln_post`` and a square projection matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monkeytune.config import VisionConfig
from monkeytune.vision.vit import resize_pos_embed


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """2D sin-cos position table ``[side*side, dim]`` (positions row-major).

    The first half of the channels encodes the column index, the second half the row index; each
    half is ``[sin(p * w), cos(p * w)]`` with ``w = 10000^(-i / (dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position table needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[N, Q, D]``, k/v ``[N, L, D]`` -> ``[N, Q, D]``."""
        n, nq, d = q.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, t.shape[1], self.heads, d // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v)))
        return self.out_proj(ctx.transpose(1, 2).reshape(n, nq, d))


class Resampler(nn.Module):
    """Compress ``[N, L, width]`` patch features of N views into ``[N, n_queries, output_dim]``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim, eps = cfg.output_dim, cfg.layer_norm_eps
        side = int(round(math.sqrt(cfg.n_queries)))
        self.n_queries = cfg.n_queries
        self.output_scale = float(cfg.output_scale)
        # Fixed, but a persistent buffer: checkpoints carry their own table, which may differ
        # slightly from a recomputed one (e.g. rounded to bf16 or trained).
        self.register_buffer("pos_embed", sincos_2d(dim, side), persistent=True)
        self.query = nn.Parameter(torch.empty(cfg.n_queries, dim))
        self.kv_proj = nn.Linear(cfg.width, dim, bias=False) if cfg.width != dim else nn.Identity()
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, cfg.num_resampler_heads)
        self.ln_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Parameter(torch.empty(dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.query.is_meta:
            return
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.normal_(self.proj, std=self.proj.shape[0] ** -0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Args:
            x: ``[N, L, width]`` patch features, ``L = grid_hw[0] * grid_hw[1]``.
            grid_hw: Patch grid of the views.

        Returns:
            ``[N, n_queries, output_dim]`` visual tokens.
        """
        key_pos = resize_pos_embed(self.pos_embed, grid_hw).to(x.dtype)
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query) + self.pos_embed.to(self.query.dtype)
        q = q.unsqueeze(0).expand(x.shape[0], -1, -1)
        out = self.attn(q, kv + key_pos, kv)
        out = self.ln_post(out) @ self.proj
        return out * self.output_scale if self.output_scale != 1.0 else out
