"""Sequence packing: several samples share one row of ``max_length`` tokens.

Packing plans are made from token counts alone (:meth:`ConversationDataset.lengths` renders
text and counts image placeholders without opening an image; the rendering is cached, so each
sample is tokenized once for the plan and the row), with greedy first-fit: each sample
goes into the first row that still has room, else opens a new row. A packed row concatenates
its samples; ``position_ids`` restart at 0 for every sample and ``seq_lens`` lists the sample
lengths, so the model can keep attention inside each sample (a block-diagonal causal mask; see
:mod:`monkeytune.data.collate`). Samples are whole in exactly one row: nothing is cut.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from monkeytune.data.dataset import ConversationDataset
from monkeytune.data.skipping import SkipBadSamples


def first_fit_pack(
    lengths: Sequence[int | None], capacity: int, order: Sequence[int] | None = None
) -> list[list[int]]:
    """Greedy first-fit bin packing of sample indices into rows of ``capacity`` tokens.

    Args:
        lengths: Token count per sample; ``None`` marks a sample to leave out (a bad one).
        capacity: Row size in tokens.
        order: Indices in the order they are placed (default: ``0..n-1``). Sorting by
            decreasing length gives first-fit-decreasing, which fills rows more tightly.

    Returns:
        Rows of sample indices, each in placement order, rows in order of opening.

    Raises:
        ValueError: a sample is longer than ``capacity``.

    Runs in ``O(n log n)``: a max-segment-tree over rows' free space finds the leftmost row with
    enough room without scanning every open row.
    """
    order = range(len(lengths)) if order is None else order
    items = [(i, lengths[i]) for i in order if lengths[i] is not None]
    size = 1
    while size < max(1, len(items)):
        size *= 2
    # Leaves hold the free space of row k at size + k; -1 marks rows not opened yet, so that
    # even an empty sample never lands in one.
    free = [-1] * (2 * size)
    rows: list[list[int]] = []
    for i, n in items:
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row capacity {capacity}")
        if free[1] >= n:
            node = 1
            while node < size:  # descend to the leftmost leaf with room
                node = 2 * node if free[2 * node] >= n else 2 * node + 1
            row = node - size
        else:
            row = len(rows)
            rows.append([])
            node = size + row
            free[node] = capacity
        rows[row].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pack_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate dataset items into one packed row.

    Returns:
        ``input_ids``/``labels``/``position_ids`` ``[L]`` (positions restart at 0 per sample),
        ``seq_lens`` list of sample lengths, ``pixel_values`` ``[V, 3, S, S]`` and
        ``view_slots`` ``[V]`` concatenated in sample order, ``ids``, ``num_images``.
    """
    if not items:
        raise ValueError("cannot pack an empty list of items")
    return {
        "input_ids": torch.cat([it["input_ids"] for it in items]),
        "labels": torch.cat([it["labels"] for it in items]),
        "position_ids": torch.cat([torch.arange(it["input_ids"].shape[0]) for it in items]),
        "seq_lens": [int(it["input_ids"].shape[0]) for it in items],
        "pixel_values": torch.cat([it["pixel_values"] for it in items]),
        "view_slots": torch.cat([it["view_slots"] for it in items]),
        "ids": [it["id"] for it in items],
        "num_images": sum(int(it["num_images"]) for it in items),
    }


class PackedDataset(Dataset):
    """Rows of packed samples over a :class:`ConversationDataset` (or its skip wrapper).

    The plan is computed once at construction (and again by :meth:`set_epoch`) from token
    counts; items decode their images lazily like the base dataset. A sample that turns out
    bad only when loaded (an image that fails to decode) is left out of its row after the skip
    wrapper has recorded it; without the wrapper it raises.

    Args:
        base: The dataset to pack; its ``max_length`` bounds every sample.
        max_length: Row capacity (default ``base.max_length``).
        shuffle: Place samples in a seeded random order (rows then mix unrelated samples);
            otherwise in file order.
        seed: Seed of that order.
        decreasing: First-fit-decreasing: place longest first for tighter rows.
    """

    def __init__(
        self,
        base: ConversationDataset | SkipBadSamples,
        max_length: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        decreasing: bool = False,
    ):
        self.base = base
        self.max_length = int(max_length or base.max_length)
        if self.max_length < base.max_length:
            raise ValueError(
                f"row length {self.max_length} is shorter than the dataset's max_length {base.max_length}"
            )
        self.shuffle = shuffle
        self.seed = seed
        self.decreasing = decreasing
        self.lengths = base.lengths()
        self.rows = self._plan(seed)
        if not self.rows:
            raise ValueError("no usable samples to pack")

    def _plan(self, seed: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(seed).shuffle(order)
        if self.decreasing:
            # Stable: ties keep the (shuffled) order.
            order.sort(key=lambda i: -(self.lengths[i] or 0))
        return first_fit_pack(self.lengths, self.max_length, order)

    def set_epoch(self, epoch: int) -> None:
        """Re-plan with seed ``seed + epoch`` so rows mix differently each epoch (if shuffling).

        Call it in the main process before creating the epoch's DataLoader iterator.
        """
        if self.shuffle:
            self.rows = self._plan(self.seed + epoch)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fill_ratio(self) -> float:
        """Fraction of row capacity occupied by sample tokens."""
        used = sum(self.lengths[i] or 0 for row in self.rows for i in row)
        return used / (len(self.rows) * self.max_length)

    def __getitem__(self, j: int) -> dict[str, Any]:
        for step in range(len(self.rows)):
            row = self.rows[(j + step) % len(self.rows)]
            items = [it for it in (self.base.try_load(i) for i in row) if it is not None]
            if items:
                return pack_items(items)
        raise RuntimeError("every packed row holds only bad samples")
