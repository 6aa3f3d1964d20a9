"""The training dataset: one transform chain from records to model-ready samples.

The chain, shared by training and ``monkeytune data check`` (which runs it dry):

1. **parse** (checked at construction, then again each time a sample is used; only its place in
   the file is kept, :class:`~monkeytune.data.reading.Samples`): every record, whatever its
   format, becomes a :class:`~monkeytune.data.messages.Sample` whose images sit where their
   placeholders were;
2. **render** (:meth:`ConversationDataset.prepare`, its length kept): a cheap size check on the raw text,
   then :func:`~monkeytune.data.templates.render` to ids and labels, then the fit to
   ``max_length``; no image is opened;
3. **load views** (:meth:`ConversationDataset.load`): decode each image into its views
   (:class:`~monkeytune.data.views.ImageViews`).

This dataset raises a :class:`~monkeytune.data.errors.DataError` for a bad sample, or, once
the skip policy (:class:`~monkeytune.data.skipping.SkipBadSamples`: count, report, threshold)
is attached, replaces it by the next good one and tells the policy.

A sample longer than ``max_length`` is never cut (a cut could fall inside an image span or
leave an answer without its end token): it is an error, or, with ``truncate_turns=True``,
trailing whole exchanges that carry no image are dropped until it fits, keeping at least one.
"""

from __future__ import annotations

import logging
import os
from array import array
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from monkeytune.config import ModelConfig
from monkeytune.data.errors import TEMPLATE, TOO_LONG, DataError
from monkeytune.data.index import (
    errors_from_array,
    errors_to_array,
    index_file,
    index_key,
    load_index,
    save_index,
    tokenizer_identity,
)
from monkeytune.data.messages import ImageRef, Sample
from monkeytune.data.reading import Samples
from monkeytune.data.templates import (
    CONVERSATION_TEMPLATES,
    IGNORE_INDEX,
    IM_END,
    IM_START,
    Encoded,
    Prepared,
    Compact,
    fit_to_length,
    render,
    size_problem,
)
from monkeytune.data.views import ImageViews, image_problem
from monkeytune.tokenizer.base import Tokenizer

logger = logging.getLogger(__name__)

class ConversationDataset(Dataset):
    """Conversation records of any supported format -> model-ready samples.

    Args:
        paths: One data file (JSON list or JSON Lines) or several.
        tokenizer: Any tokenizer; its image token ids must equal the model config's.
        model_cfg: Gives ``tokens_per_image``, the image layout and ``image.max_pixels``.
        max_length: Longest accepted sample in tokens (images included).
        template: ``monkey`` (official) or ``chatml``.
        truncate_turns: Drop trailing text-only exchanges of over-long samples.
        image_processor: Object with ``__call__(image) -> ProcessedImage``; by default an
            :class:`~monkeytune.vision.processor.ImageProcessor` for ``model_cfg.image``.
        format: ``auto`` (detected per file) or ``monkey``, ``llava``, ``sharegpt``, ``openai``.
        image_root: Folder relative image paths resolve against (default: each file's folder).
        allow_empty_answers: Accept assistant turns without text.
        strict: Raise the first record that cannot be parsed; otherwise such records are kept
            in :attr:`parse_errors` (the skip policy reports them).
        view_cache_bytes: Keep each image's processed views in memory, up to this many bytes,
            so an image asked about several times is decoded once (0: decode every time).
        cache: Load what :meth:`scan_all` found from the index saved beside the data by an
            earlier run with the same data and settings, instead of reading every record
            (:mod:`monkeytune.data.index`); :meth:`scan_all` saves it when it is absent.
        scan: Run :meth:`scan_all` while the records are read, on each sample as it is parsed
            (so each record is read and parsed once, not twice). With ``strict`` the first
            problem in file order raises, whether it is a parse or a scan problem.
        columns: The data's own names of record fields (``data.columns``,
            :mod:`monkeytune.data.columns`).
        load_options: ``datasets.load_dataset`` keyword arguments for ``hf:`` dataset names
            (:mod:`monkeytune.data.hub`).

    Items are dicts:
        ``input_ids`` ``[L]`` int64, ``labels`` ``[L]`` int64 (``-100`` unsupervised),
        ``pixel_values`` ``[V, 3, S, S]`` float32 (all views of the sample's images in order,
        ``V = images x views``; ``V = 0`` for text-only samples), ``view_slots`` ``[V]`` int64,
        ``num_images`` int, ``id`` (the record id) and ``index``.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Tokenizer,
        model_cfg: ModelConfig,
        max_length: int = 2048,
        template: str = "monkey",
        truncate_turns: bool = False,
        image_processor: Any = None,
        format: str = "auto",
        image_root: str | None = None,
        allow_empty_answers: bool = False,
        strict: bool = True,
        view_cache_bytes: int = 0,
        cache: bool = False,
        scan: bool = False,
        columns: dict[str, str] | None = None,
        load_options: dict | None = None,
    ):
        if template not in CONVERSATION_TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {CONVERSATION_TEMPLATES}")
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
        if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer template needs a tokenizer with its own chat template (a composed "
                             "model's LLM's); this one has none: use monkey or chatml")
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.tokens_per_image = model_cfg.tokens_per_image
        self.max_length = int(max_length)
        self.template = template
        self.truncate_turns = truncate_turns
        self.paths = [str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self.strict = strict
        self.columns, self.load_options = dict(columns or {}), dict(load_options or {})
        self.parse_errors: list[DataError] = []
        self.formats: dict[str, str] = {}
        self.views = ImageViews(model_cfg, image_processor, view_cache_bytes)
        self.skip = None  # the bad-sample policy, once one attaches (monkeytune.data.skipping)
        self._problems: dict[int, DataError] | None = None  # what scan_all found (None: not run yet)
        self._index_file = None
        if cache:
            settings = {"format": format, "image_root": image_root, "allow_empty_answers": allow_empty_answers,
                        "template": template, "max_length": self.max_length, "truncate_turns": truncate_turns,
                        "tokens_per_image": self.tokens_per_image, "max_pixels": model_cfg.image.max_pixels,
                        "tokenizer": tokenizer_identity(tokenizer), "columns": self.columns}
            key = index_key(self.paths, settings)
            self._index_file = index_file(self.paths, key) if key is not None else None
        saved = load_index(self._index_file) if self._index_file is not None else None
        if saved is not None:
            self._restore(saved, image_root, allow_empty_answers)
        else:
            self._read(format, image_root, allow_empty_answers, scan)
        if not self.samples and strict:
            raise ValueError(f"no usable samples in {', '.join(self.paths)}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_records(self) -> int:
        """Records read: parsed samples plus records that failed to parse."""
        return len(self.samples) + sum(1 for e in self.parse_errors if e.index is not None)

    @property
    def num_truncated(self) -> int:
        """Samples rendered so far that ``truncate_turns`` shortened."""
        return int((self._dropped > 0).sum())

    # -- step 2: render (text only) ----------------------------------------------------------

    def render(self, i: int, compact: bool = False, sample: Sample | None = None) -> Prepared:
        """Render sample ``i`` and fit it to ``max_length``, without caching (no image is opened).

        Args:
            i: Sample index.
            compact: Render one placeholder per image (the compact form) instead of
                ``tokens_per_image``; lengths are still judged at the full size.
            sample: ``self.samples[i]`` when the caller has it already.

        Raises:
            DataError: ``template`` (a system turn with ``monkey``) or ``too_long``.
        """
        s = sample if sample is not None else self.samples[i]
        if s.system is not None and self.template == "monkey":
            first = s.turns[0].field.split("[")[0]  # conversations or messages
            role_key = "from" if s.turns[0].field.endswith(".value") else "role"
            raise s.error(TEMPLATE, "the monkey template has no system prompt (use chatml)", f"{first}[0].{role_key}")
        too_big = size_problem(s, self.max_length)
        if too_big is not None:
            raise too_big
        tpi = 1 if compact else self.tokens_per_image
        enc = render(self.template, s.system, s.turns, self.tokenizer, tpi)
        fitted = fit_to_length(enc, self.max_length, self.truncate_turns, self.tokens_per_image - tpi)
        if isinstance(fitted, str):
            raise s.error(TOO_LONG, fitted)
        enc, dropped = fitted
        # A packed row must never learn to predict a sample's first token from the previous
        # sample's last one; templates already leave it unsupervised, this makes it certain.
        if enc.labels:
            enc.labels[0] = IGNORE_INDEX
        return Prepared(enc, dropped)

    def unfitted(self, i: int) -> Encoded | None:
        """Sample ``i`` rendered without the fit to ``max_length`` (for reports on over-long
        samples), or ``None`` when the size check refuses to tokenize it."""
        s = self.samples[i]
        if size_problem(s, self.max_length) is not None:
            return None
        return render(self.template, s.system, s.turns, self.tokenizer, self.tokens_per_image)

    def prepare(self, i: int) -> tuple[np.ndarray, np.ndarray, list[ImageRef], int]:
        """``(input_ids [L], labels [L], images, truncated_exchanges)`` of sample ``i``.

        Rendered each time (the record is read back and parsed too): nothing of a sample's text
        stays in memory between uses, only its length (:meth:`length`).
        """
        ids, labels, images, dropped, _ = self._prepared(i)
        return ids, labels, images, dropped

    def _prepared(self, i: int | None, sample: Sample | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[ImageRef], int, Sample]:
        sample = sample if sample is not None else self.samples[i]
        c = self._compact(i, sample)
        ids, labels = c.expand(self.tokenizer.image_pad_id, self.tokens_per_image)
        return ids, labels, sample.images[: c.n_images], c.dropped, sample

    def _compact(self, i: int | None, sample: Sample | None = None) -> Compact:
        # Rendered with one placeholder per image: no list of tokens_per_image pads is built
        # only to be compressed again (1280 per image for Monkey).
        p = self.render(i, compact=True, sample=sample)
        c = Compact(p.encoded, p.truncated_exchanges)
        if i is not None:  # a streamed sample has no index, hence no kept length
            self._lengths[i] = len(c.ids) + c.n_images * (self.tokens_per_image - 1)
            self._dropped[i] = c.dropped
        return c

    def length(self, i: int) -> int:
        """Token count of sample ``i`` (rendered once; the count is kept)."""
        if self._lengths[i] < 0:
            self._compact(i)
        return int(self._lengths[i])

    def lengths(self) -> list[int | None]:
        """Token counts of all samples (renders text only; images are counted, not opened);
        with the skip policy, ``None`` for a bad sample."""
        if self.skip is None:
            return [self.length(i) for i in range(len(self.samples))]
        out: list[int | None] = []
        for i in range(len(self.samples)):
            try:
                out.append(None if i in self.skip.bad else self.length(i))
            except DataError as e:
                self.skip.mark_bad(i, e)
                out.append(None)
        return out

    def image_errors(self, i: int, decode: bool, memo: dict[str, tuple[str, str] | None] | None = None,
                     sample: Sample | None = None) -> list[DataError]:
        """Dry-run image check of sample ``i``: the file system only, or a full decode.

        Args:
            sample: ``self.samples[i]`` when the caller has it already.

        Returns:
            One ``missing_image`` or ``unreadable_image`` error per bad image, naming its field.
        """
        s = sample if sample is not None else self.samples[i]
        errors = []
        for ref in s.images:
            if memo is not None and ref.source in memo:
                problem = memo[ref.source]
            else:
                problem = image_problem(ref, self.model_cfg.image.max_pixels, decode)
                if memo is not None:
                    memo[ref.source] = problem
            if problem is not None:
                errors.append(s.error(problem[0], problem[1], ref.field))
        return errors

    def scan_all(self) -> dict[int, DataError]:
        """:meth:`scan` every sample, as training does before its first step, or take the result
        from the saved index (``cache``); the index is saved after a scan that completes.

        Returns:
            The problems found, by sample index (empty when ``strict``).

        Raises:
            DataError: with ``strict``, the first problem (the first record that failed to
                parse, else the first sample that failed the scan).
        """
        if self._problems is None:
            problems = {}
            for i in range(len(self.samples)):
                try:
                    self.scan(i)
                except DataError as e:
                    if self.strict:
                        raise
                    problems[i] = e
            self._problems = problems
            self._save_index()
        return dict(self._problems)

    def _read(self, format: str, image_root: str | None, allow_empty_answers: bool, scan: bool) -> None:
        # What rendering finds, 6 bytes a sample (-1: not rendered yet in this process); grown
        # sample by sample when the scan runs as the records are read.
        self._lengths, self._dropped = array("i"), array("h")
        problems: dict[int, DataError] = {}

        def visit(i: int, sample: Sample) -> None:
            self._lengths.append(-1)
            self._dropped.append(0)
            try:
                self.scan(i, sample)
            except DataError as e:
                if self.strict:
                    raise
                problems[i] = e

        # The samples' places, parsed again when used: memory does not grow with their text.
        self.samples = Samples(
            self.paths, None if self.strict else self.parse_errors, format, image_root, allow_empty_answers,
            self.formats, self.columns, self.load_options, visit=visit if scan else None,
        )
        if scan:
            self._lengths = np.frombuffer(self._lengths, dtype=np.int32).copy()
            self._dropped = np.frombuffer(self._dropped, dtype=np.int16).copy()
            self._problems = problems
            self._save_index()
        else:
            self._lengths = np.full(len(self.samples), -1, dtype=np.int32)
            self._dropped = np.zeros(len(self.samples), dtype=np.int16)

    def _save_index(self) -> None:
        if self._index_file is None:
            return
        problems = self._problems or {}
        save_index(self._index_file, {
            **self.samples.state(), "lengths": self._lengths, "dropped": self._dropped,
            "parse_errors": errors_to_array(self.parse_errors),
            "problem_index": np.array(list(problems), dtype=np.int64),
            "problems": errors_to_array(list(problems.values()))})
        logger.info("data index saved to %s", self._index_file)

    def _restore(self, saved: dict[str, Any], image_root: str | None, allow_empty_answers: bool) -> None:
        # What an earlier scan_all found, as if this one had run: places, lengths, problems.
        self.samples = Samples.from_state(saved, image_root, allow_empty_answers, self.columns, self.load_options)
        self.formats = self.samples.file_formats
        self.parse_errors = errors_from_array(saved["parse_errors"])
        self._lengths = saved["lengths"].astype(np.int32)
        self._dropped = saved["dropped"].astype(np.int16)
        self._problems = dict(zip(saved["problem_index"].tolist(), errors_from_array(saved["problems"])))
        logger.info("data index loaded from %s: %d samples, not read again", self._index_file, len(self.samples))
        if self.strict and (self.parse_errors or self._problems):
            # The first in file order, as a run that scans while reading meets it.
            order = {path: k for k, path in enumerate(self.paths)}
            raise min([*self.parse_errors, *self._problems.values()],
                      key=lambda e: (order.get(e.file, -1), -1 if e.index is None else e.index))

    def scan(self, i: int, sample: Sample | None = None) -> None:
        """The chain run dry on sample ``i`` as training starts: render (its length is kept) and
        ``stat`` every image, without decoding.

        Args:
            sample: ``self.samples[i]`` when the caller has it already.

        Raises:
            DataError: the first problem found.
        """
        sample = sample if sample is not None else self.samples[i]
        self._compact(i, sample)
        for err in self.image_errors(i, decode=False, sample=sample)[:1]:
            raise err

    # -- step 3: load the views --------------------------------------------------------------

    def load(self, i: int | None, sample: Sample | None = None) -> dict[str, Any]:
        """Build item ``i`` with its decoded images.

        Args:
            i: Sample index; None for a ``sample`` that is not in :attr:`samples` (a record
                read by :mod:`monkeytune.data.stream`), whose item then has ``index`` None.
            sample: ``self.samples[i]`` when the caller has it already, or the sample to load.

        Raises:
            DataError: any problem with the sample (``missing_image``, ``unreadable_image``,
                ``too_long`` ...), never silently fixed.
        """
        ids, labels, images, _, sample = self._prepared(i, sample)
        pixel_values, view_slots = self.views(images, sample)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "pixel_values": pixel_values,
            "view_slots": view_slots,
            "num_images": len(images),
            "id": sample.id,
            "index": i,
        }

    def try_load(self, i: int) -> dict[str, Any] | None:
        """:meth:`load`; a bad sample raises, or with the skip policy gives ``None`` once the
        policy has recorded it."""
        if self.skip is None:
            return self.load(i)
        if i in self.skip.bad:
            return None
        try:
            return self.load(i)
        except DataError as e:
            self.skip.mark_bad(i, e)
            return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        i %= n
        # With the skip policy a bad sample is replaced by the next good one, so batches keep
        # their size; without it, try_load raises for the first bad one.
        for step in range(n):
            item = self.try_load((i + step) % n)
            if item is not None:
                return item
        raise self.skip.every_sample_bad()
