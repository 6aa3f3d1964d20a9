"""The ``skip`` bad-sample policy of a dataset: counted, logged, reported, bounded.

:class:`SkipBadSamples` attaches itself to a :class:`~monkeytune.data.dataset.ConversationDataset`,
which then replaces a bad sample by the next good one and tells the policy; a good sample never
comes here. The policy never lets a bad sample pass silently. At construction it runs the
text side of the chain over every sample (parse errors, rendering, length, image files exist),
so the run starts with a summary, and it stops at once when the skipped share is already above
``max_skip_fraction``. Samples that fail later (an image that only fails to decode) are
skipped when met: logged, appended to the report file and counted against the same bound.

Every skipped sample is logged (``logging.warning``) and appended to ``report_path`` as one
JSON line (``id``, ``file``, ``line``, ``index``, ``kind``, ``field``, ``reason``). Counts are
per process: with several DataLoader workers the report file is the complete record, and
:func:`summarize_report` reads the total back from it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

from monkeytune.data.dataset import ConversationDataset
from monkeytune.data.errors import TOO_MANY_SKIPPED, DataError

logger = logging.getLogger(__name__)

# Public instruction sets lose a few images to dead links; more than 5% lost usually means a
# wrong image_root or format, which should stop the run rather than quietly train on the rest.
DEFAULT_MAX_SKIP_FRACTION = 0.05


def format_summary(kinds: Counter, total: int) -> str:
    """``skipped 3 of 40 samples (7.5%): missing_image 2 (5.0%), too_long 1 (2.5%)``."""
    n = sum(kinds.values())
    share = 100.0 * n / max(total, 1)
    head = f"skipped {n} of {total} samples ({share:.1f}%)"
    if not n:
        return head
    by_kind = ", ".join(f"{k} {c} ({100.0 * c / max(total, 1):.1f}%)" for k, c in kinds.most_common())
    return f"{head}: {by_kind}"


def summarize_report(report_path: str | os.PathLike, total: int) -> str:
    """The skip summary read back from a report file (complete across DataLoader workers)."""
    seen: dict[tuple, str] = {}
    try:
        with open(report_path, encoding="utf-8") as f:
            for raw in f:
                rec = json.loads(raw)
                seen[(rec.get("file"), rec.get("index"), rec.get("line"))] = rec.get("kind", "?")
    except FileNotFoundError:
        pass
    return format_summary(Counter(seen.values()), total)


class SkipBadSamples:
    """The skip policy of ``dataset``: what was skipped, why, and whether that is still acceptable.

    Args:
        dataset: A :class:`ConversationDataset` built with ``strict=False``; it holds this
            policy as ``dataset.skip`` from then on.
        report_path: JSON Lines file each skipped sample is appended to (``None``: log only).
        max_skip_fraction: Largest accepted share of skipped records (of all records read);
            above it a :class:`DataError` of kind ``too_many_skipped`` stops the run.
        scan: Run the text side of the chain (and ``stat`` every image) at construction.
        report_scan: Write what the scan finds to the report (data-parallel ranks scan the
            same data, so only one of them should).

    Raises:
        DataError: ``too_many_skipped``; the message carries the summary.
    """

    def __init__(
        self,
        dataset: ConversationDataset,
        report_path: str | os.PathLike | None = None,
        max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
        scan: bool = True,
        report_scan: bool = True,
    ):
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.dataset = dataset
        self.report_path = str(report_path) if report_path is not None else None
        self.max_skip_fraction = float(max_skip_fraction)
        self.total = dataset.num_records
        self.bad: dict[int, DataError] = {}  # the dataset reads it: a known-bad sample is not loaded again
        self.kinds: Counter = Counter()
        self._write = report_scan
        dataset.skip = self
        for err in dataset.parse_errors:
            if err.index is None:
                raise err  # a data file that cannot be read or classified is not a sample to skip
            self._record(err)
        if scan:
            for i, e in dataset.scan_all().items():
                self.bad[i] = e
                self._record(e)
            logger.log(logging.WARNING if self.num_skipped else logging.INFO, "%s", self.summary())
        self._write = True
        self._check_bound()
        if len(self.bad) == len(dataset):
            raise self.every_sample_bad()

    @property
    def num_skipped(self) -> int:
        return sum(self.kinds.values())

    @property
    def skipped(self) -> dict[int, DataError]:
        """Samples found bad so far in this process, by index."""
        return dict(self.bad)

    def summary(self) -> str:
        """Skipped count and share by kind, in this process."""
        return format_summary(self.kinds, self.total)

    def every_sample_bad(self) -> DataError:
        """The error that stops a run in which no sample is usable."""
        return DataError(TOO_MANY_SKIPPED, f"every sample is bad ({self.summary()})", ", ".join(self.dataset.paths))

    # -- bookkeeping ---------------------------------------------------------------------------

    def _check_bound(self) -> None:
        if self.num_skipped > self.max_skip_fraction * self.total:
            where = f"; every one is listed in {self.report_path}" if self.report_path else ""
            raise DataError(
                TOO_MANY_SKIPPED,
                f"{self.summary()}, more than data.max_skip_fraction = {self.max_skip_fraction:g}{where}. "
                "Fix the data (monkeytune data check names every problem) or raise the bound",
                ", ".join(self.dataset.paths),
            )

    def mark_bad(self, i: int, err: DataError) -> None:
        """Record sample ``i`` as bad (logged, reported, counted against the bound).

        Raises:
            DataError: ``too_many_skipped`` once the bound is passed.
        """
        self.bad[i] = err
        self._record(err)
        self._check_bound()

    def _record(self, err: DataError) -> None:
        self.kinds[err.kind] += 1
        logger.warning("skipping bad sample: %s", err.describe())
        if self.report_path and self._write:
            line = json.dumps(err.to_dict(), ensure_ascii=False, default=str)
            # One short append per line; O_APPEND keeps lines from several workers whole.
            with open(self.report_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def run_summary(dataset: Any) -> str | None:
    """The skip summary of a training dataset at the end of a run (``None`` when not skipping).

    Read from the report file when there is one, so it counts what every DataLoader worker
    skipped; ``dataset`` may be packed.
    """
    policy = getattr(getattr(dataset, "base", dataset), "skip", None)
    if policy is None:
        return None
    if policy.report_path:
        return summarize_report(policy.report_path, policy.total) + f" (listed in {policy.report_path})"
    return policy.summary()
