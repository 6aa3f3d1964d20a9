"""Batching: pack samples into rows, and pad samples or rows into the tensors the model's forward takes.

Batch keys (``B`` rows, ``T`` tokens per row, ``N`` views in the batch):

Model inputs (:data:`MODEL_KEYS`, pass them as keyword arguments):
    ``input_ids`` ``[B, T]`` int64, padded with ``pad_id``.
    ``attention_mask`` ``[B, T]`` int64, 1 real / 0 pad. **Absent for packed batches**: there
    the model gets no mask and derives a block-diagonal causal mask from ``position_ids``
    (transformers detects every restart at 0 as a new sequence), so attention never crosses
    samples.
    ``position_ids`` ``[B, T]`` int64, ``0..len-1`` for every sample; the padding tail of a row
    also counts from 0, so in a packed row it forms a sequence of its own and never attends
    into, or is attended by, a real sample.
    ``labels`` ``[B, T]`` int64, ``-100`` where unsupervised and on padding; aligned with
    ``input_ids`` (the model shifts).
    ``pixel_values`` ``[N, 3, S, S]`` float32 and ``view_slots`` ``[N]`` int64: all views of all
    images, row 0's images first, each row's in order of appearance, which is the order in
    which the model fills the ``image_pad_id`` positions of the flattened batch.

Packing metadata:
    ``seq_lens`` ``[B, K]`` int32: lengths of the samples in each row, zero-filled on the right
    (``K`` = most samples in a row; ``K = 1`` when not packed). Padding is not included.
    :func:`packed_attention_mask` turns it into a block-diagonal mask for SDPA or eager
    attention.

Padding-free batches (``Collator(padding_free=True)``, used with ``flash_attention_2``): every
sample of the micro-batch is concatenated into one row, ``B = 1`` and ``T`` = the sum of the
sample lengths, with no padding and no ``attention_mask``; ``position_ids`` restart at 0 for
each sample and the labels of each sample's first token are ``-100`` (so no target crosses a
boundary). The batch also carries transformers' flash-attention varlen arguments
(``FlashAttentionKwargs``, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
gives them), which the model passes to the decoder:
    ``cu_seq_lens_q`` / ``cu_seq_lens_k`` ``[K + 1]`` int32: ``0`` then the cumulative sample
    lengths (``K`` samples in the batch).
    ``max_length_q`` / ``max_length_k`` int: the longest sample.
With them flash attention runs ``flash_attn_varlen_func`` over the samples and reads no
position ids for boundaries; SDPA and eager ignore them and find the samples from the
restarting ``position_ids`` (transformers builds the block-diagonal mask for ``B = 1``).

Bookkeeping (not model inputs):
    ``num_images`` int: images in the batch (``pixel_values`` holds ``views`` per image).
    ``num_samples`` int: samples in the batch (packed samples counted one by one).
    ``ids`` list of the record ids, row by row.
    ``indices`` list of the dataset indices, row by row (batches that are not packed).

**Packing.** Sequence packing: several samples share one row of ``max_length`` tokens.

Packing plans are made from token counts alone (:meth:`ConversationDataset.lengths` renders
text and counts image placeholders without opening an image; the rendering is cached, so each
sample is tokenized once for the plan and the row), with greedy first-fit: each sample
goes into the first row that still has room, else opens a new row. A packed row concatenates
its samples; ``position_ids`` restart at 0 for every sample and ``seq_lens`` lists the sample
lengths, so the model can keep attention inside each sample (a block-diagonal causal mask; see
:func:`packed_attention_mask`). Samples are whole in exactly one row: nothing is cut.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import Dataset

from monkeytune.data.templates import IGNORE_INDEX

if TYPE_CHECKING:  # the dataset module is above this one
    from monkeytune.data.dataset import ConversationDataset

FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "view_slots", *FLASH_KEYS)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``batch`` the model's ``forward`` takes."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


class Collator:
    """Pad a list of dataset items into one batch.

    Items are either single samples (:class:`~monkeytune.data.dataset.ConversationDataset`) or
    packed rows (:class:`PackedDataset`, which carry ``seq_lens`` and
    ``position_ids``); a batch must not mix the two.

    Args:
        pad_id: Token id written into padding (the tokenizer's ``pad_id``).
        pad_to_multiple_of: Round ``T`` up to a multiple of this (8 suits tensor cores);
            ``None`` or 1 for exact longest-in-batch padding.
        pad_to_length: Pad every batch to exactly this length (the official behaviour, which
            pads to ``model_max_length``); overrides dynamic padding.
        padding_free: Concatenate the whole micro-batch into one unpadded row with the
            flash-attention varlen arguments (see the module docstring); the padding options
            then do not apply.

    Raises (on call):
        ValueError: a row is longer than ``pad_to_length``, or packed and plain items are mixed.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, pad_to_length: int | None = None,
                 padding_free: bool = False):
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to_length = pad_to_length
        self.padding_free = padding_free

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        packed = ["seq_lens" in it for it in items]
        if any(packed) and not all(packed):
            raise ValueError("a batch mixes packed rows and single samples")
        packed_batch = packed[0]
        if self.padding_free:
            return flatten_items(items, packed_batch)
        lens = [int(it["input_ids"].shape[0]) for it in items]
        longest = max(lens)
        if self.pad_to_length is not None:
            if longest > self.pad_to_length:
                raise ValueError(f"a row has {longest} tokens, more than pad_to_length {self.pad_to_length}")
            width = self.pad_to_length
        else:
            width = _round_up(longest, self.pad_to_multiple_of)
        b = len(items)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.int64)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros((b, width), dtype=torch.int64)
        position_ids = torch.zeros((b, width), dtype=torch.int64)
        row_seq_lens: list[list[int]] = []
        for r, (it, n) in enumerate(zip(items, lens)):
            input_ids[r, :n] = it["input_ids"]
            labels[r, :n] = it["labels"]
            attention_mask[r, :n] = 1
            if packed_batch:
                position_ids[r, :n] = it["position_ids"]
                row_seq_lens.append([int(x) for x in it["seq_lens"]])
            else:
                position_ids[r, :n] = torch.arange(n)
                row_seq_lens.append([n])
            # The padding tail counts from 0 so that it is a separate sequence in packed rows.
            position_ids[r, n:] = torch.arange(width - n)

        k = max(len(s) for s in row_seq_lens)
        seq_lens = torch.zeros((b, k), dtype=torch.int32)
        for r, s in enumerate(row_seq_lens):
            seq_lens[r, : len(s)] = torch.tensor(s, dtype=torch.int32)

        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),
            "view_slots": torch.cat([it["view_slots"] for it in items]).to(torch.int64),
            "seq_lens": seq_lens,
            "num_images": sum(int(it["num_images"]) for it in items),
            "num_samples": sum(len(s) for s in row_seq_lens),
            "ids": [i for it in items for i in (it["ids"] if packed_batch else [it["id"]])],
        }
        if not packed_batch:
            batch["attention_mask"] = attention_mask
            batch["indices"] = [it.get("index") for it in items]
        return batch


def flatten_items(items: Sequence[dict[str, Any]], packed: bool) -> dict[str, Any]:
    """One unpadded row holding every sample of ``items`` (the padding-free batch of the module docstring).

    Args:
        items: Packed rows (with ``seq_lens`` and ``position_ids``) or single samples.
        packed: Whether ``items`` are packed rows.

    Returns:
        The batch: ``input_ids``/``labels``/``position_ids`` ``[1, T]``, ``seq_lens`` ``[1, K]``,
        ``cu_seq_lens_q``/``_k`` ``[K + 1]`` int32, ``max_length_q``/``_k``, images and bookkeeping.
    """
    lens = [int(x) for it in items for x in (it["seq_lens"] if packed else [it["input_ids"].shape[0]])]
    input_ids = torch.cat([it["input_ids"] for it in items]).to(torch.int64)
    labels = torch.cat([it["labels"] for it in items]).to(torch.int64)
    position_ids = torch.cat([torch.arange(n) for n in lens])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    # The previous sample's last hidden state must not be trained to predict this sample's first token.
    labels[cu[:-1].long()] = IGNORE_INDEX
    longest = max(lens)
    return {
        "input_ids": input_ids[None],
        "position_ids": position_ids[None],
        "labels": labels[None],
        "pixel_values": torch.cat([it["pixel_values"] for it in items]),
        "view_slots": torch.cat([it["view_slots"] for it in items]).to(torch.int64),
        "seq_lens": torch.tensor([lens], dtype=torch.int32),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
        "num_images": sum(int(it["num_images"]) for it in items),
        "num_samples": len(lens),
        "ids": [i for it in items for i in (it["ids"] if packed else [it["id"]])],
    }


def packed_attention_mask(seq_lens: torch.Tensor | Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Block-diagonal causal mask for packed rows, for SDPA or eager attention.

    Token ``i`` may attend to token ``j`` when both belong to the same sample and ``j <= i``.
    Padding positions (beyond the row's samples) attend only to themselves, so that no row of
    the mask is empty (an all-masked row makes softmax produce NaN); their labels are ``-100``.

    Args:
        seq_lens: ``[B, K]`` sample lengths per row (zeros ignored), or a list of lists.
        length: ``T``, the padded row length.

    Returns:
        ``[B, 1, T, T]`` bool, ``True`` where attention is allowed.
    """
    rows = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else [list(r) for r in seq_lens]
    seg = torch.empty((len(rows), length), dtype=torch.int64)
    for r, lens in enumerate(rows):
        lens = [int(x) for x in lens if int(x) > 0]
        total = sum(lens)
        if total > length:
            raise ValueError(f"row {r} has {total} tokens of samples but length is {length}")
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.int64))
        seg[r, :total] = ids
        # Unique ids for padding positions: each one is a block of its own.
        seg[r, total:] = torch.arange(length - total) + len(lens)
    pos = torch.arange(length)
    causal = pos[None, :] <= pos[:, None]  # [T, T], key <= query
    same = seg[:, :, None] == seg[:, None, :]  # [B, T, T]
    return (same & causal).unsqueeze(1)


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
    """Rows of packed samples over a :class:`ConversationDataset`.

    The plan is computed once at construction (and again by :meth:`set_epoch`) from token
    counts; items decode their images lazily like the base dataset. A sample that turns out
    bad only when loaded (an image that fails to decode) is left out of its row after the
    dataset's skip policy has recorded it; without the policy it raises.

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
        base: ConversationDataset,
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
