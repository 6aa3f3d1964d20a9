"""LLaVA's connector: a two-layer MLP from patch features to LLM tokens, with optional pixel shuffle.

Where the resampler compresses a view to a fixed number of learned queries, the projector keeps
one token per patch. Pixel shuffle (as InternVL uses it) folds each ``s x s`` square of patches
into one token of ``s * s`` times the width first, which bounds the tokens per view to
``(side / s)^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monkeytune.config import VisionConfig


def pixel_shuffle(x: torch.Tensor, grid_hw: tuple[int, int], factor: int) -> torch.Tensor:
    """Fold ``factor x factor`` squares of patches into single tokens.

    Args:
        x: ``[N, H * W, C]`` patch tokens, row-major.
        grid_hw: ``(H, W)``, both divisible by ``factor``.
        factor: Side of the folded squares.

    Returns:
        ``[N, (H / f) * (W / f), C * f * f]``, row-major over the folded grid; each token's
        channels are its square's patches in row-major order.
    """
    if factor == 1:
        return x
    n, _, c = x.shape
    h, w = grid_hw
    f = factor
    x = x.reshape(n, h // f, f, w // f, f, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // f) * (w // f), f * f * c)


class Projector(nn.Module):
    """``Linear(width * s^2, D) -> GELU -> Linear(D, D)`` on every (folded) patch token.

    Args:
        cfg: ``width`` (the encoder's), ``output_dim`` (the LLM's hidden size), ``pixel_shuffle``.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.factor = cfg.pixel_shuffle
        self.fc1 = nn.Linear(cfg.width * self.factor**2, cfg.output_dim)
        self.fc2 = nn.Linear(cfg.output_dim, cfg.output_dim)

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Args:
            x: ``[N, L, width]`` patch features (``L = H * W``, or ``1 + H * W`` with a class token,
                which only an unfolded projector takes).
            grid_hw: ``(H, W)`` patch grid of the views.

        Returns:
            ``[N, tokens_per_view, output_dim]``.
        """
        x = pixel_shuffle(x, grid_hw, self.factor)
        return self.fc2(F.gelu(self.fc1(x.to(self.fc1.weight.dtype))))
