"""Processed image views kept in memory, up to a byte budget.

Decoding a PNG and cutting it into views costs about as much as the vision tower's forward pass
on a small model, and a dataset whose images are each asked about several times decodes every
image again for every question. The cache keeps what an image was processed into, keyed by the
image, so each is decoded once. The first images drawn stay; once the budget is spent, later ones
are processed every time (nothing is evicted, so the cost of a full cache is never paid twice).

Each DataLoader worker process holds its own cache, for as long as the worker lives (training
starts new workers each epoch; with ``num_workers: 0`` the cache lasts the whole run).
"""

from __future__ import annotations

from typing import Hashable

import torch


class ViewCache:
    """Tensors per key, up to ``max_bytes`` in all.

    Args:
        max_bytes: Budget; 0 keeps nothing.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: dict[Hashable, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> tuple[torch.Tensor, ...] | None:
        """The tensors stored under ``key``, or None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
        else:
            self.hits += 1
        return item

    def put(self, key: Hashable, *tensors: torch.Tensor) -> bool:
        """Keep ``tensors`` under ``key`` if they fit in what is left of the budget.

        Returns:
            Whether they were kept. Callers must not modify kept tensors in place.
        """
        size = sum(t.numel() * t.element_size() for t in tensors)
        if key in self._items or self.nbytes + size > self.max_bytes:
            return False
        self._items[key] = tuple(tensors)
        self.nbytes += size
        return True
