"""The data order is a pure function of seed and epoch and splits across ranks like one process."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from monkeytune.train.sampler import EpochBatchSampler, Position, epoch_order, micro_batches, rank_batches


def test_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_order(50, 3, 0) == epoch_order(50, 3, 0)
    assert epoch_order(50, 3, 0) != epoch_order(50, 3, 1)
    assert epoch_order(50, 3, 0) != epoch_order(50, 4, 0)
    assert sorted(epoch_order(50, 3, 7)) == list(range(50))
    assert epoch_order(5, 3, 1, shuffle=False) == [0, 1, 2, 3, 4]


def test_ranks_deal_the_single_process_micro_batches_round_robin():
    single = rank_batches(23, 4, seed=1, epoch=2)
    assert [len(b) for b in single] == [4, 4, 4, 4, 4, 3]
    r0 = rank_batches(23, 4, seed=1, epoch=2, rank=0, world_size=2)
    r1 = rank_batches(23, 4, seed=1, epoch=2, rank=1, world_size=2)
    assert r0 == single[0::2] and r1 == single[1::2]
    # Three ranks: 6 micro-batches deal evenly; four ranks: 2 left over are dropped.
    assert sum(len(rank_batches(23, 4, 1, 2, True, r, 4)) for r in range(4)) == 4


class Items(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i


def collate(items):
    return {"ids": torch.tensor(items)}


def test_stream_resumes_mid_epoch_and_crosses_epochs():
    sampler = EpochBatchSampler(10, 3, seed=5)  # 4 micro-batches per epoch, the last one short
    assert sampler.batches_per_epoch == 4
    full = micro_batches(Items(), sampler, collate, Position())
    first = [next(full) for _ in range(7)]
    assert [p for p, _ in first][3:5] == [Position(0, 4), Position(1, 1)]
    resumed = micro_batches(Items(), EpochBatchSampler(10, 3, seed=5), collate, first[2][0])
    for (pos, batch), (pos2, batch2) in zip(first[3:], resumed):
        assert pos == pos2 and torch.equal(batch["ids"], batch2["ids"])
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    next(micro_batches(Items(), EpochBatchSampler(10, 3, seed=5), collate, Position(1, 0)))
    assert torch.equal(torch.rand(1), before)  # building a loader draws nothing from the global RNG
