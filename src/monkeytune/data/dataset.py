"""The training dataset: records in, token ids, labels and image views out.

Records are parsed and validated when the dataset is built (cheap: JSON only). Tokenization
happens lazily, per item, and images are decoded in ``__getitem__``, so DataLoader workers do
the decoding in parallel and the model never sees a file path.

Bad samples are never dropped silently. With ``on_bad_sample="error"`` the first one raises a
:class:`~monkeytune.data.records.DataError` naming the file, line and field. With ``"skip"``
each one is logged (``logging.warning``), counted in :attr:`ConversationDataset.num_skipped` and
appended to ``report_path`` as one JSON line (``id``, ``file``, ``line``, ``index``, ``kind``,
``field``, ``reason``); ``__getitem__`` then returns the next good sample instead, so batch
sizes stay fixed. Counts are per process: with several DataLoader workers the report file is
the complete record (one line per discovery, so a sample met again in a later epoch by a fresh
worker is listed again).

A sample longer than ``max_length`` is never cut (a cut could fall inside an image span or
leave an answer without its end token): it is an error, or, with ``truncate_turns=True``,
trailing whole exchanges that carry no image are dropped until it fits, keeping at least one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from monkeytune.config import ModelConfig
from monkeytune.data.records import (
    MISSING_IMAGE,
    TEMPLATE,
    TOO_LONG,
    UNREADABLE_IMAGE,
    DataError,
    Sample,
    load_samples,
)
from monkeytune.data.templates import (
    IGNORE_INDEX,
    IM_END,
    IM_START,
    TEMPLATES,
    Encoded,
    encode_conversation,
)
from monkeytune.tokenizer.base import Tokenizer

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")


@dataclass
class TextSample:
    """A tokenized sample before its images are decoded."""

    encoded: Encoded
    images: list[str]  # resolved paths, in order of appearance
    truncated_exchanges: int  # trailing exchanges dropped by truncate_turns


def fit_to_length(enc: Encoded, max_length: int, truncate_turns: bool) -> tuple[Encoded, int] | str:
    """Return ``(encoded, dropped_exchanges)`` fitting ``max_length``, or the reason it cannot.

    Only whole trailing exchanges without images are dropped, and at least one always remains.
    """
    if len(enc) <= max_length:
        return enc, 0
    n = len(enc.exchange_ends)
    if truncate_turns:
        keep = n
        while keep > 1 and enc.exchange_images[keep - 1] == 0:
            keep -= 1
            if enc.exchange_ends[keep - 1] <= max_length:
                return enc.keep_exchanges(keep), n - keep
        return (
            f"{len(enc)} tokens > max_length {max_length}, and dropping trailing text-only "
            f"exchanges cannot make it fit (first exchange alone: {enc.exchange_ends[0]} tokens)"
        )
    return f"{len(enc)} tokens > max_length {max_length} (samples are never cut; see truncate_turns)"


class ConversationDataset(Dataset):
    """Conversation records -> model-ready samples.

    Args:
        paths: One data file (JSON list or JSON Lines) or several.
        tokenizer: Any tokenizer; its image token ids must equal the model config's.
        model_cfg: Gives ``tokens_per_image`` and the image layout.
        max_length: Longest accepted sample in tokens (images included).
        template: ``monkey`` (official) or ``chatml``.
        on_bad_sample: ``"error"`` (raise) or ``"skip"`` (log, count, report, replace).
        report_path: JSON Lines file skipped samples are appended to (``skip`` only).
        truncate_turns: Drop trailing text-only exchanges of over-long samples.
        image_processor: Object with ``__call__(path) -> ProcessedImage``; by default an
            :class:`~monkeytune.vision.processor.ImageProcessor` for ``model_cfg.image``.

    Items are dicts:
        ``input_ids`` ``[L]`` int64, ``labels`` ``[L]`` int64 (``-100`` unsupervised),
        ``pixel_values`` ``[V, 3, S, S]`` float32 (all views of the sample's images in order,
        ``V = images x views``; ``V = 0`` for text-only samples), ``view_slots`` ``[V]`` int64,
        ``num_images`` int, ``id`` (the record id) and ``index`` (the item actually returned).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Tokenizer,
        model_cfg: ModelConfig,
        max_length: int = 2048,
        template: str = "monkey",
        on_bad_sample: str = "error",
        report_path: str | os.PathLike | None = None,
        truncate_turns: bool = False,
        image_processor: Any = None,
    ):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        for name in ("image_start_id", "image_end_id", "image_pad_id"):
            if getattr(tokenizer, name) != getattr(model_cfg, name):
                raise ValueError(
                    f"tokenizer.{name} ({getattr(tokenizer, name)}) differs from model config "
                    f"{name} ({getattr(model_cfg, name)}): the model would not find the image "
                    "placeholders. Set the model config's image token ids from the tokenizer."
                )
        if template == "chatml":
            for token in (IM_START, IM_END):
                try:
                    tokenizer.special_id(token)
                except KeyError:
                    raise ValueError(f"the chatml template needs {token} in the tokenizer") from None
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.tokens_per_image = model_cfg.tokens_per_image
        self.max_length = int(max_length)
        self.template = template
        self.on_bad_sample = on_bad_sample
        self.report_path = str(report_path) if report_path is not None else None
        self.truncate_turns = truncate_turns
        self._processor = image_processor
        self.num_skipped = 0
        self.num_truncated = 0
        self._bad: dict[int, DataError] = {}
        self._lengths: list[int | None] | None = None

        errors: list[DataError] | None = [] if on_bad_sample == "skip" else None
        self.samples: list[Sample] = load_samples(
            [paths] if isinstance(paths, (str, os.PathLike)) else list(paths), errors
        )
        for err in errors or []:
            self._record_skip(err)
        if not self.samples:
            raise ValueError(f"no usable samples in {paths}")

    def __len__(self) -> int:
        return len(self.samples)

    # -- text side (no image decoding) --------------------------------------------------------

    def encode(self, i: int) -> TextSample:
        """Tokenize sample ``i`` and fit it to ``max_length`` (no image is opened).

        Raises:
            DataError: ``template`` (a system turn with ``monkey``) or ``too_long``.
        """
        s = self.samples[i]
        if s.system is not None and self.template == "monkey":
            raise s.error(
                TEMPLATE, "the monkey template has no system prompt (use chatml)", "conversations[0].from"
            )
        enc = encode_conversation(self.template, s.turns, self.tokenizer, self.tokens_per_image, s.system)
        fitted = fit_to_length(enc, self.max_length, self.truncate_turns)
        if isinstance(fitted, str):
            raise s.error(TOO_LONG, fitted)
        enc, dropped = fitted
        # A packed row must never learn to predict a sample's first token from the previous
        # sample's last one; templates already leave it unsupervised, this makes it certain.
        if enc.labels:
            enc.labels[0] = IGNORE_INDEX
        return TextSample(enc, s.images[: len(enc.image_paths)], dropped)

    def length(self, i: int) -> int | None:
        """Token count of sample ``i`` (cached), or ``None`` if it is bad and skipped."""
        if self._lengths is None:
            self._lengths = [None] * len(self.samples)
        cached = self._lengths[i]
        if cached is not None:
            return cached
        if i in self._bad:
            return None
        try:
            n = len(self.encode(i).encoded)
        except DataError as e:
            if self.on_bad_sample == "error":
                raise
            self._mark_bad(i, e)
            return None
        self._lengths[i] = n
        return n

    def lengths(self) -> list[int | None]:
        """Token counts of all samples (tokenizes text only; images are counted, not opened)."""
        return [self.length(i) for i in range(len(self.samples))]

    # -- full samples --------------------------------------------------------------------------

    @property
    def image_processor(self):
        if self._processor is None:
            from monkeytune.vision.processor import ImageProcessor

            self._processor = ImageProcessor(self.model_cfg.image)
        return self._processor

    def load(self, i: int) -> dict[str, Any]:
        """Build item ``i`` with its decoded images.

        Raises:
            DataError: any problem with the sample (``missing_image``, ``unreadable_image``,
                ``too_long`` ...), never silently fixed.
        """
        text = self.encode(i)
        sample = self.samples[i]
        views, slots = [], []
        for path, fld in zip(text.images, sample.image_fields):
            if not os.path.isfile(path):
                raise sample.error(MISSING_IMAGE, f"image file not found: {path}", fld)
            try:
                processed = self.image_processor(path)
            except (ValueError, OSError) as e:
                raise sample.error(UNREADABLE_IMAGE, str(e), fld) from e
            v = processed.views
            if v.shape[0] * self.model_cfg.vision.n_queries != self.tokens_per_image:
                raise ValueError(
                    f"the image processor gave {v.shape[0]} views for {path}, but the prompt "
                    f"reserves {self.tokens_per_image} tokens per image"
                )
            views.append(v)
            slots.append(processed.slots)
        if views:
            pixel_values = torch.cat(views)
            view_slots = torch.cat(slots).to(torch.int64)
        else:
            size = self.model_cfg.image.window_size
            pixel_values = torch.empty(0, 3, size, size)
            view_slots = torch.empty(0, dtype=torch.int64)
        if text.truncated_exchanges:
            self.num_truncated += 1
        enc = text.encoded
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.int64),
            "labels": torch.tensor(enc.labels, dtype=torch.int64),
            "pixel_values": pixel_values,
            "view_slots": view_slots,
            "num_images": len(text.images),
            "id": sample.id,
            "index": i,
        }

    def try_load(self, i: int) -> dict[str, Any] | None:
        """:meth:`load`, or ``None`` after recording the problem when skipping bad samples."""
        if i in self._bad:
            return None
        try:
            return self.load(i)
        except DataError as e:
            if self.on_bad_sample == "error":
                raise
            self._mark_bad(i, e)
            return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        i %= n
        # In skip mode a bad sample is replaced by the next good one, so batches keep their size.
        for step in range(n):
            item = self.try_load((i + step) % n)
            if item is not None:
                return item
        raise RuntimeError(f"every sample of the dataset is bad; see {self.report_path or 'the log'}")

    # -- bookkeeping ----------------------------------------------------------------------------

    def _mark_bad(self, i: int, err: DataError) -> None:
        self._bad[i] = err
        if self._lengths is not None:
            self._lengths[i] = None
        self._record_skip(err)

    def _record_skip(self, err: DataError) -> None:
        self.num_skipped += 1
        logger.warning("skipping bad sample: %s", err.describe())
        if self.report_path:
            line = json.dumps(err.to_dict(), ensure_ascii=False, default=str)
            # One short append per line; O_APPEND keeps lines from several workers whole.
            with open(self.report_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    @property
    def skipped(self) -> dict[int, DataError]:
        """Samples found bad so far in this process, by index."""
        return dict(self._bad)
