"""Streamed training data (``data.streaming: true``): records read block by block, nothing indexed up front.

The map-style dataset reads every record before the first step (:class:`~monkeytune.data.reading.Samples`);
for a set larger than the page cache that pass is a read of the whole disk at every start. A
streamed run reads, before its first batch, each file's size (a table's row counts) and the
first records of the first file (the prompt layout the final folder records). With ``data.format``
``auto``, a process reads a file's first records when it first meets the file, to detect its
format from them.

Blocks. Each file is cut into blocks (:mod:`monkeytune.data.blocks`): byte ranges of a JSON
Lines file, row ranges of an arrow table, parquet row groups. The blocks of all files, in order,
are dealt round-robin to the ``S = processes x workers`` streams (:func:`~monkeytune.data.blocks.deal`);
a stream (rank ``r``, DataLoader worker ``w``: stream ``r * workers + w``) reads only its own
blocks. A JSON list cannot be cut without reading it whole: it is refused (``monkeytune data
convert`` writes it as JSON Lines or parquet).

Order. In epoch ``e`` stream ``s`` reads its blocks in an order seeded by ``(seed, e, s)`` and
the records of its ``k``-th block in an order seeded by ``(seed, e, s, k)``: a pure function, so
no shuffle buffer holds state that a checkpoint would have to save. Each stream rolls into its
next epoch on its own; the run's length is ``train.max_steps``.

Cursor. A worker builds whole micro-batches (collated; with packing, samples are first placed
in rows sequentially: a sample that does not fit closes the row) and sends each with its cursor
``[epoch, k, r, seen, skipped]``: the first record not used yet (record ``r`` of the ``k``-th
block of that epoch's order) and its bad-record counts. The DataLoader takes one batch from each
worker in turn. The state after a batch, ``{"next": worker, "cursors": [...]}`` per process, is
what a checkpoint saves; a resumed run starts every worker at its cursor and the turn at
``next``, so it reads exactly what the uninterrupted run would have read.

Bad records raise their :class:`~monkeytune.data.errors.DataError` (file, line or row, field),
or, with the skip policy, are logged, appended to the report file and counted, the share of
skipped records bounded by ``max_skip_fraction`` once a worker has seen :data:`MIN_SEEN` records
and at the end of each of its epochs. A JSON Lines record's line and index are counted only when
an error needs them (:class:`~monkeytune.data.blocks.LineCounter`).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from monkeytune.data.blocks import (
    LineCounter,
    Source,
    clear_cache,
    deal,
    head_records,
    list_blocks,
    read_block,
    sources,
)
from monkeytune.data.collate import pack_items
from monkeytune.data.dataset import ConversationDataset
from monkeytune.data.errors import DATA_FILE, TOO_MANY_SKIPPED, DataError
from monkeytune.data.messages import FORMAT_CHOICES, Sample, parse_record
from monkeytune.data.reading import detect_format

logger = logging.getLogger(__name__)

HEAD_SAMPLES = 32  # parsed head samples kept for the prompt layout of the final folder
MIN_SEEN = 100  # records a worker reads before its skipped share is bounded


class StreamingDataset(IterableDataset):
    """Endless micro-batches of this process's streams, each with the cursor after it.

    Iterating yields ``(worker, cursor, batch)``; ``batch`` is a DataError when the stream
    stopped on one (raise it in the main process). See the module docstring.

    Args:
        paths: JSON Lines files and tables (:mod:`monkeytune.data.tables`).
        renderer: A :class:`ConversationDataset` with no files: renders and loads each sample.
        collate: Turns a list of items (or packed rows) into a batch.
        micro_batch_size: Items (rows, when packing) per batch.
        rank, world_size, num_workers: This process, the processes, DataLoader workers each.
        format: ``auto`` (detected per file from its first records, see :meth:`format_of`) or a
            format name.
        image_root, allow_empty_answers: As for the map-style dataset.
        packing: Place samples in rows of ``renderer.max_length`` tokens, in order.
        shuffle, seed: The order (see the module docstring).
        report_file: With the skip policy, where skipped records are appended; None: raise.
        max_skip_fraction: With the skip policy, the largest share of records skipped.
    """

    def __init__(self, paths: Sequence[str], renderer: ConversationDataset, collate: Callable[[list], dict], *,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 format: str = "auto", image_root: str | None = None, allow_empty_answers: bool = False,
                 packing: bool = False, shuffle: bool = True, seed: int = 0, skip: bool = False,
                 report_file: str | None = None, max_skip_fraction: float = 0.05):
        if format not in FORMAT_CHOICES:
            raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMAT_CHOICES)}")
        self.paths, self.renderer, self.collate = [str(p) for p in paths], renderer, collate
        self.micro_batch_size, self.packing, self.shuffle, self.seed = micro_batch_size, packing, shuffle, seed
        self.rank, self.num_workers, self.workers = rank, num_workers, max(1, num_workers)
        self.streams = world_size * self.workers
        self.image_root, self.allow_empty_answers = image_root, allow_empty_answers
        self.skip, self.report_file, self.max_skip_fraction = skip, report_file, max_skip_fraction
        self.format, self._formats = format, {}  # each file's format, detected once per process
        self.sources = sources(self.paths)
        self.blocks = list_blocks(self.sources, self.streams)
        if len(self.blocks) < self.streams:
            raise DataError(DATA_FILE, f"the data makes {len(self.blocks)} blocks for {self.streams} streams "
                            f"({world_size} process(es) x {self.workers} worker(s)); lower data.num_workers",
                            ", ".join(self.paths))
        self.batches_per_epoch = -(-len(self.blocks) // self.streams)  # blocks per stream: the epoch's progress
        self.state = self.fresh_state()
        self._lines = LineCounter()
        # The first file's first samples: the prompt layout the final folder records.
        self.samples = self._head_samples(self.sources[0])
        clear_cache()  # the head's row group: workers read their own

    def format_of(self, src: Source, head: list | None = None) -> str:
        """``data.format``, or the format detected from the first records of ``src`` (the same in
        every process: each reads the head of a file when it first meets it).

        Raises:
            DataError: ``unknown_format`` for a head that mixes layouts.
        """
        if self.format != "auto":
            return self.format
        if src.path not in self._formats:
            self._formats[src.path] = detect_format(head if head is not None else self._head(src), src.path)
        return self._formats[src.path]

    @staticmethod
    def _head(src: Source) -> list[tuple[int, int | None, Any]]:
        return [(i, line, obj) for i, line, obj in head_records(src, HEAD_SAMPLES) if not isinstance(obj, DataError)]

    def _head_samples(self, src: Source) -> list[Sample]:
        head = self._head(src)
        fmt, out = self.format_of(src, head), []
        for index, line, obj in head[:HEAD_SAMPLES]:
            try:
                out.append(parse_record(obj, fmt, src.path, line, index, self.image_root, self.allow_empty_answers))
            except DataError:
                pass  # reported when training meets the record
        return out

    # -- the main process's side ---------------------------------------------------------

    def fresh_state(self) -> dict[str, Any]:
        """The state before the first batch: every worker at the start of epoch 0."""
        return {"next": 0, "cursors": [[0, 0, 0, 0, 0] for _ in range(self.workers)]}

    @staticmethod
    def advance(state: dict[str, Any], worker: int, cursor: Sequence[int]) -> dict[str, Any]:
        """The state after a batch of ``worker`` with ``cursor`` (a new dict)."""
        cursors = [list(c) for c in state["cursors"]]
        cursors[worker] = [int(x) for x in cursor]
        return {"next": (worker + 1) % len(cursors), "cursors": cursors}

    def summary(self) -> str | None:
        """Skipped records of this process's streams so far (None without the skip policy)."""
        if not self.skip:
            return None
        seen, skipped = (sum(c[i] for c in self.state["cursors"]) for i in (3, 4))
        listed = f" (listed in {self.report_file})" if self.report_file else ""
        return f"skipped {skipped} of {seen} records this process read{listed}"

    # -- a worker's side -----------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, list[int], Any]]:
        info = get_worker_info()
        # The turn goes on where the saved run left it: DataLoader worker 0 plays worker ``next``.
        worker = ((info.id if info is not None else 0) + self.state["next"]) % self.workers
        yield from self._batches(worker, self.rank * self.workers + worker, self.state["cursors"][worker])

    def _batches(self, worker: int, stream: int, cursor: Sequence[int]) -> Iterator[tuple[int, list[int], Any]]:
        items: list = []  # samples of the batch (or closed rows, when packing)
        row: list = []  # the open row
        used = 0
        try:
            for before, after, item in self._items(stream, cursor):
                if item is None:
                    continue
                if not self.packing:
                    items.append(item)
                    if len(items) == self.micro_batch_size:
                        yield worker, after, self.collate(items)
                        items = []
                    continue
                n = int(item["input_ids"].shape[0])
                if row and used + n > self.renderer.max_length:
                    items.append(pack_items(row))
                    row, used = [], 0
                    if len(items) == self.micro_batch_size:
                        # This sample is not placed yet: the cursor points at it.
                        yield worker, before, self.collate(items)
                        items = []
                row.append(item)
                used += n
        except DataError as e:
            yield worker, list(cursor), e

    def _order(self, n: int, *key: int) -> list[int]:
        order = list(range(n))
        if self.shuffle:
            # A string seed is hashed with SHA-512: the same in every process and Python run.
            random.Random("/".join(map(str, (self.seed, *key)))).shuffle(order)
        return order

    def _items(self, stream: int, cursor: Sequence[int]) -> Iterator[tuple[list[int], list[int], Any]]:
        """``(cursor before, cursor after, item or None when skipped)`` of every record of
        ``stream`` from ``cursor`` on, epoch after epoch."""
        mine = [self.blocks[j] for j in deal(len(self.blocks), self.streams, stream)]
        epoch, k, r, seen, skipped = (int(x) for x in cursor)
        while True:
            whole, good = k == 0 and r == 0, 0
            blocks = self._order(len(mine), epoch, stream)
            for k in range(k, len(blocks)):
                block = mine[blocks[k]]
                src = self.sources[block.file]
                records = read_block(src, block)
                order = self._order(len(records), epoch, stream, k)
                for r in range(r, len(records)):
                    before = [epoch, k, r, seen, skipped]
                    seen += 1
                    item = self._item(src, *records[order[r]])
                    if item is None:
                        skipped += 1
                        self._bound(seen, skipped, end=False)
                    good += item is not None
                    yield before, [epoch, k, r + 1, seen, skipped], item
                r = 0
            if whole and not good:
                raise DataError(DATA_FILE, f"stream {stream} of {self.streams} found no usable record in a whole "
                                "epoch of its blocks; lower data.num_workers, or fix the data", ", ".join(self.paths))
            self._bound(seen, skipped, end=True)
            epoch, k = epoch + 1, 0

    def _item(self, src: Source, place: int, obj: Any) -> dict[str, Any] | None:
        """The loaded item of one record; None after reporting it under the skip policy."""
        index = None if src.kind == "jsonl" else place  # a JSON Lines record is located on error only
        fmt = self.format_of(src)  # outside the try: a file of mixed layouts is no record to skip
        try:
            if isinstance(obj, DataError):
                raise obj
            sample = parse_record(obj, fmt, src.path, None, index, self.image_root, self.allow_empty_answers)
            if index is None and "id" not in obj:
                sample.id = f"{Path(src.path).name}@{place}"
            return self.renderer.load(None, sample)
        except DataError as e:
            located = self._locate(e, src, place, obj)
            if not self.skip:
                raise located from None
            self._report(located)
            return None

    def _locate(self, e: DataError, src: Source, place: int, obj: Any) -> DataError:
        if src.kind != "jsonl":
            return e
        line, index = self._lines.at(src.path, place)
        sid = obj.get("id", f"{Path(src.path).name}:{index}") if isinstance(obj, dict) else None
        return DataError(e.kind, e.reason, src.path, line, index, e.field, sid)

    def _report(self, e: DataError) -> None:
        logger.warning("skipping bad sample: %s", e.describe())
        if self.report_file:
            # One short append per line; O_APPEND keeps lines from several workers whole.
            with open(self.report_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(e.to_dict(), ensure_ascii=False, default=str) + "\n")

    def _bound(self, seen: int, skipped: int, end: bool) -> None:
        if (end or seen >= MIN_SEEN) and skipped > self.max_skip_fraction * seen:
            where = f"; every one is listed in {self.report_file}" if self.report_file else ""
            raise DataError(TOO_MANY_SKIPPED, f"a stream skipped {skipped} of the {seen} records it read, more than "
                            f"data.max_skip_fraction = {self.max_skip_fraction:g}{where}. Fix the data (monkeytune "
                            "data check names every problem) or raise the bound", ", ".join(self.paths))
