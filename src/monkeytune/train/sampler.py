"""Data order that a checkpoint can return to exactly.

The order of epoch ``e`` is a pure function of ``(seed, e)``: a seeded permutation of the items,
cut into micro-batches of ``micro_batch_size``, dealt round-robin to the ranks (micro-batch ``j``
of the epoch goes to rank ``j % world_size``). Nothing depends on what happened before, so a
resumed run rebuilds epoch ``e``'s list and starts at the saved micro-batch index.

Dealing whole micro-batches round-robin makes a ``W``-process run with ``G`` accumulation steps
see, per optimizer step, exactly the micro-batches a 1-process run with ``W * G`` accumulation
steps sees: the data-parallel run is the single-process run split across ranks.

A streamed run (``data.streaming``) has no such list: :func:`stream_batches` serves it, and its
:class:`Position` carries the streams' cursors (:mod:`monkeytune.data.stream`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Item order of one epoch: ``0..n-1`` or a permutation seeded by ``(seed, epoch)``."""
    if not shuffle:
        return list(range(num_items))
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(num_items, generator=g).tolist()


def rank_batches(
    num_items: int, micro_batch_size: int, seed: int, epoch: int,
    shuffle: bool = True, rank: int = 0, world_size: int = 1,
) -> list[list[int]]:
    """Micro-batches (lists of item indices) of ``rank`` in ``epoch``.

    The last micro-batch of the epoch may be short. Trailing micro-batches that cannot be dealt
    to every rank (fewer than ``world_size`` left) are dropped, so all ranks run the same number
    of forward passes.
    """
    order = epoch_order(num_items, seed, epoch, shuffle)
    batches = [order[i : i + micro_batch_size] for i in range(0, num_items, micro_batch_size)]
    usable = len(batches) // world_size * world_size
    return batches[rank:usable:world_size]


class EpochBatchSampler(Sampler[list[int]]):
    """Batch sampler over :func:`rank_batches`, starting at any micro-batch of any epoch.

    Args:
        num_items: Dataset length (samples, or packed rows).
        micro_batch_size: Items per micro-batch.
        seed: Seed of the order.
        shuffle: Shuffle each epoch.
        rank: This process's rank.
        world_size: Number of data-parallel processes.
    """

    def __init__(self, num_items: int, micro_batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.num_items = num_items
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_items} items make fewer than {world_size} micro-batches of {micro_batch_size}: "
                "every process needs at least one micro-batch per epoch"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank."""
        n = -(-self.num_items // self.micro_batch_size)
        return n // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its micro-batch ``start`` on."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        batches = rank_batches(self.num_items, self.micro_batch_size, self.seed, self.epoch,
                               self.shuffle, self.rank, self.world_size)
        yield from batches[self.start :]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)


@dataclass(frozen=True)
class Position:
    """Where the next micro-batch comes from: ``batch`` index (on this rank) within ``epoch``.

    A streamed run (:mod:`monkeytune.data.stream`) also carries ``stream``, this process's state
    ``{"next", "cursors"}``, which is what it resumes from; ``epoch`` and ``batch`` then give the
    epoch and block of the stream that sent the batch (progress only).
    """

    epoch: int = 0
    batch: int = 0
    stream: dict[str, Any] | None = None


class _Failed:
    """A data error met in a DataLoader worker, carried to the main process as a value.

    Raised in the worker, it would come back as torch's ``RuntimeError`` whose message holds the
    worker's traceback; as a value it is raised in the main process as the ``DataError`` it is.
    """

    def __init__(self, error: Exception):
        self.error = error


class _Guarded(Dataset):
    """``dataset`` whose data errors are returned as :class:`_Failed` instead of raised."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        from monkeytune.data.errors import DataError

        try:
            return self.dataset[i]
        except DataError as e:
            return _Failed(e)


class _GuardedCollate:
    """``collate`` that passes a :class:`_Failed` item through as the whole batch."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]):
        self.collate = collate

    def __call__(self, items: list[Any]) -> Any:
        failed = next((it for it in items if isinstance(it, _Failed)), None)
        return failed if failed is not None else self.collate(items)


def micro_batches(
    dataset: Dataset,
    sampler: EpochBatchSampler,
    collate: Callable[[list[Any]], dict[str, Any]],
    start: Position,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[Position, dict[str, Any]]]:
    """Endless stream of ``(position after this batch, batch)`` from ``start``, epoch after epoch.

    A fresh DataLoader serves each epoch. Its generator is seeded from ``(seed, epoch)``, so
    creating it never draws from the global torch RNG (which dropout uses): an interrupted and
    resumed run consumes random numbers exactly like an uninterrupted one.
    """
    epoch, index = start.epoch, start.batch
    per_epoch = sampler.batches_per_epoch
    while True:
        if index >= per_epoch:
            epoch, index = epoch + 1, 0
            continue
        sampler.set_epoch(epoch, index)
        loader = DataLoader(
            _Guarded(dataset) if num_workers else dataset,
            batch_sampler=sampler,
            collate_fn=_GuardedCollate(collate) if num_workers else collate,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(int(seed) * 7919 + epoch),
            persistent_workers=False,
            pin_memory=pin_memory,  # on a GPU: page-locked batches copy without blocking the step
        )
        for batch in loader:
            if isinstance(batch, _Failed):
                raise batch.error
            index += 1
            yield Position(epoch, index), batch


def stream_batches(dataset, start: Position, seed: int = 0,
                   pin_memory: bool = False) -> Iterator[tuple[Position, dict[str, Any]]]:
    """Endless ``(position after this batch, batch)`` of a streamed dataset from ``start``.

    One DataLoader serves the whole run (the streams roll over epochs themselves). It takes a
    batch from each worker in turn, so the order is fixed; ``dataset.state`` follows the batches
    handed out (for its end-of-run summary). Its generator is seeded, as in :func:`micro_batches`.

    Args:
        dataset: A :class:`~monkeytune.data.stream.StreamingDataset` (it says how many workers).
        start: Where to start; ``start.stream`` None: at the beginning.
    """
    from monkeytune.data.errors import DataError

    state = start.stream if start.stream is not None else dataset.fresh_state()
    dataset.state = state
    loader = DataLoader(dataset, batch_size=None, num_workers=dataset.num_workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(int(seed) * 7919))
    for worker, cursor, batch in loader:
        if isinstance(batch, DataError):
            raise batch
        state = dataset.state = dataset.advance(state, int(worker), cursor)
        yield Position(int(cursor[0]), int(cursor[1]), state), batch
