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
    num_chunks: int | None = None,
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
        num_chunks: Call the LM head exactly this many times (each chunk then holds at most
            ``ceil(M / num_chunks)`` of the ``M`` supervised positions; trailing chunks may be
            empty). Data-parallel trainers pass the same number on every rank: ZeRO-3 gathers
            the head's weight at every call, so ranks that called it a different number of
            times would wait on each other forever. Default: ``ceil(M / chunk_size)``, at least 1.

    Returns:
        ``(loss_sum, num_tokens)``: a float32 scalar and an int64 scalar. The per-token mean is
        ``loss_sum / num_tokens``; returning both lets a trainer normalise over a whole
        optimizer step of several micro-batches or over data-parallel ranks.

    Raises:
        ValueError: ``num_chunks`` is below 1.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    num_tokens = mask.sum()
    selected = hidden[:, :-1][mask]  # [M, H]
    targets = targets[mask]
    w = None if weights is None else weights[:, 1:][mask].to(device=hidden.device, dtype=torch.float32)
    reach = None
    if selected.shape[0] == 0:
        # No target: a zero whose graph still reaches every parameter, the LM head included
        # (DDP waits for each parameter's gradient, and every rank must run the same backward):
        # the whole hidden state, and one position with weight 0 through the head.
        reach = hidden.float().sum() * 0.0
        selected, targets = hidden[:1, 0], labels.new_zeros(1)
        w = hidden.new_zeros(1, dtype=torch.float32)
    n = selected.shape[0]
    if num_chunks is None:
        num_chunks = -(-n // chunk_size)
    elif num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
    total = selected.new_zeros((), dtype=torch.float32) if reach is None else reach
    if num_chunks == 1:
        return total + _chunk_ce_sum(selected, targets, lm_head, w), num_tokens
    size = -(-n // num_chunks)
    for start in range(0, size * num_chunks, size):
        end = start + size  # past n the chunk is empty: the head still runs, on no rows
        w_chunk = None if w is None else w[start:end]
        total = total + checkpoint(
            _chunk_ce_sum, selected[start:end], targets[start:end], lm_head, w_chunk, use_reentrant=False
        )
    return total, num_tokens


def loss_chunk_count(labels: torch.Tensor, chunk_size: int = LOSS_CHUNK) -> int:
    """LM-head calls :func:`supervised_loss` makes by default for ``labels`` ``[B, T]``."""
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return max(1, -(-n // chunk_size))
