"""Cross-entropy over supervised positions only.

A training sequence of 2048-4096 tokens is mostly prompt and image placeholders; only answer
tokens carry a label. Projecting every hidden state to a 151936-word vocabulary would build a
``[tokens x vocab]`` fp32 tensor of 1-2 GB per sample for nothing. Here the LM head runs only on
positions whose next token is supervised, in chunks whose logits are recomputed during backward,
so peak memory is bounded by ``chunk_size x vocab`` whatever the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Supervised positions per LM-head chunk. With a 152k vocabulary a chunk holds 128 x 152k fp32
# logits, log-probabilities and their gradient (~0.2 GiB); still a large enough matmul for a GPU.
LOSS_CHUNK = 128


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return (F.cross_entropy(logits.float(), targets, reduction="none") * w).sum()


def _chunk_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, w: torch.Tensor | None) -> torch.Tensor:
    # The head is called as a module, never through its weight tensor: engines that shard
    # parameters (ZeRO-3, FSDP) gather them in the module's forward, recomputation included.
    return _ce_sum(head(hidden), targets, w)


def supervised_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    chunk_size: int = LOSS_CHUNK,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over supervised positions, and their count.

    Args:
        hidden: ``[B, T, H]`` final hidden states.
        labels: ``[B, T]`` token ids aligned with the inputs; ``-100`` marks unsupervised
            positions. Position ``t`` of ``hidden`` predicts ``labels[:, t + 1]``.
        lm_head: The output projection ``H -> vocab`` (any module, e.g. wrapped by peft).
        chunk_size: Supervised positions per LM-head chunk.
        weights: Optional ``[B, T]`` weight of each target ``labels[b, t]`` (e.g. one over its
            sample's target count for a per-sample loss); the sum is then weighted.

    Returns:
        ``(loss_sum, num_tokens)``: a float32 scalar and an int64 scalar. The per-token mean is
        ``loss_sum / num_tokens``; returning both lets a trainer normalise over a whole
        gradient-accumulation window or over data-parallel ranks.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    num_tokens = mask.sum()
    selected = hidden[:, :-1][mask]  # [M, H]
    targets = targets[mask]
    w = None if weights is None else weights[:, 1:][mask].to(device=hidden.device, dtype=torch.float32)
    if selected.shape[0] == 0:
        # A zero loss whose graph still reaches every parameter, the LM head included, so that
        # every data-parallel rank runs the same backward (DDP waits for each parameter's grad).
        reach = hidden.sum() + lm_head(hidden[:, :1]).float().sum()
        return reach * 0.0, num_tokens
    if selected.shape[0] <= chunk_size:
        return _chunk_ce_sum(selected, targets, lm_head, w), num_tokens
    total = selected.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_size):
        end = start + chunk_size
        w_chunk = None if w is None else w[start:end]
        total = total + checkpoint(
            _chunk_ce_sum, selected[start:end], targets[start:end], lm_head, w_chunk, use_reentrant=False
        )
    return total, num_tokens
