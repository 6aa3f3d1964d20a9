"""Continuous batching: one decode loop over a KV cache that requests join and leave between steps.

A :class:`Batch` is the state of the rows being generated together: the model's KV cache of
every row, left-padded to one width; the attention mask marking each row's real tokens; the
position id of each row's next token; and the scores each row's next token is picked from.
:class:`Decoder` makes and advances batches:

* :meth:`Decoder.start` prefills new prompts into a batch of their own (their images go through
  the vision tower here, once; decoding steps read the cache only);
* :meth:`Decoder.join` merges two batches: the narrower one's cache and mask are padded on the
  left to the wider one's width;
* :meth:`Decoder.pick` picks every row's next token with the row's own settings (greedy, or
  temperature and top-p with the row's own random generator when it has a seed);
* :meth:`Decoder.keep` drops the rows that ended, and the padding columns only they needed;
* :meth:`Decoder.step` feeds the picked tokens through the model and leaves the next scores.

A row answers alike alone, batched or joined mid-decode: its cached keys and values are those
of its own tokens whatever its neighbours, padding columns are masked out, and its position ids
count its own real tokens only. Joining adds masked columns on a row's left and nothing else.

Caches are handled through transformers' public cache API only: a merged or trimmed cache is a
new ``Cache`` of :class:`GrowingLayer` built from per-layer tensors. A ``GrowingLayer`` is a
``DynamicLayer`` that keeps spare columns after its tokens, so that a decoding step writes its
keys and values in place rather than copying the whole cache into a new tensor (``DynamicLayer``
concatenates: a fifth of a CPU step of 16 rows at 250 columns, two fifths at 1,000). Only a
cache whose every layer is a plain ``DynamicLayer`` (keys and values of every token seen, one
column per token) can be padded and grown that way. Sliding-window layers keep only their last
window and linear-attention layers a state per row, with no column to pad: a model with such
layers gets today's batches instead (its rows start together, take no one in, and ended rows
stay in the batch, ignored, until the last ends).

Official Qwen checkpoints scale a query by its cache index (log-n attention, padding counted,
see :mod:`monkeytune.model.qwen_compat`) past ``seq_length`` positions: padding added by a join
would change a running row's scale there. So with log-n on, a batch takes rows in (and drops
padding columns) only while no row can reach that index.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from monkeytune.generate import OnlyTokenizerIds
from monkeytune.model.qwen_compat import get_compat
from monkeytune.vision.processor import ImageProcessor

__all__ = ["Batch", "Decoder", "GrowingLayer", "sample"]


@dataclass(eq=False)
class Batch:
    """Rows being generated together.

    Attributes:
        rows: The jobs (:class:`~monkeytune.serve.batching.Job`), in cache row order.
        cache: The LLM's KV cache, ``[B, heads, W, head_dim]`` per layer.
        mask: ``[B, W]`` 1 where a row has a real token, 0 for its left padding.
        positions: ``[B]`` the position id of each row's next token (its real tokens so far).
        scores: ``[B, V]`` float32 scores of each row's next token, not yet picked.
        generators: Each row's random generator (seeded sampling rows only, else None).
        joins: Whether the cache can take rows in and let rows out (see the module's notes).
    """

    rows: list[Any]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    generators: list[torch.Generator | None]
    joins: bool

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def remaining(self) -> int:
        """The most tokens any open row may still add."""
        return max((j.max_tokens - len(j.tokens) for j in self.rows if j.finish_reason is None), default=0)


def sample(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token drawn from ``softmax(scores / temperature)`` cut to its top-``top_p`` mass.

    Args:
        scores: ``[V]`` float32 scores (ids never to pick at -inf).
        temperature: Above 0.
        top_p: The likeliest tokens are kept while the mass before them is under ``top_p``
            (the likeliest always).
        generator: The row's own generator (seeded requests), or None for torch's global one.
    """
    probs = torch.softmax(scores / temperature, dim=-1)
    if top_p < 1:
        ranked, order = probs.sort(descending=True)
        ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
    # multinomial takes unnormalised weights: the cut mass need not be renormalised.
    return int(torch.multinomial(probs, 1, generator=generator))


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are the first columns of buffers with room to grow.

    ``keys`` and ``values`` (``[B, heads, W, head_dim]``) are views of ``[B, heads, W + room,
    head_dim]`` buffers: a step's new columns are written after them, and the buffers are
    reallocated, ``ROOM`` columns wider than needed, only when full. Everything else (sequence
    length, masks, selection) is ``DynamicLayer``'s, which reads ``keys`` and ``values``.

    Args:
        keys, values: The layer's cached states, ``[B, heads, W, head_dim]`` (copied into new
            buffers); or, with ``width``, buffers whose first ``width`` columns hold the states
            and the rest are spare (kept as they are, no copy).
        width: See ``keys``.
    """

    ROOM = 64  # spare columns per reallocation: one copy of the cache every 64 steps

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, width: int | None = None) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        if width is None:
            self.update(keys, values)
        else:
            self.lazy_initialization(keys, values)
            self._k, self._v = keys, values
            self.keys, self.values = keys[:, :, :width], values[:, :, :width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, heads, n, head_dim]`` states; the keys and values of every cached token."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        width, new = self.get_seq_length(), key_states.shape[-2]
        in_place = (width > 0 and self._in_buffers() and key_states.shape[:2] == self._k.shape[:2]
                    and width + new <= self._k.shape[-2])
        if not in_place:
            shape = (*key_states.shape[:2], width + new + self.ROOM, key_states.shape[-1])
            k, v = key_states.new_empty(shape), value_states.new_empty(shape)
            if width:
                k[:, :, :width].copy_(self.keys)
                v[:, :, :width].copy_(self.values)
            self._k, self._v = k, v
        self._k[:, :, width : width + new].copy_(key_states)
        self._v[:, :, width : width + new].copy_(value_states)
        self.keys, self.values = self._k[:, :, : width + new], self._v[:, :, : width + new]
        return self.keys, self.values

    def _in_buffers(self) -> bool:
        """Whether ``keys`` is still the start of its buffer: ``DynamicLayer``'s own selection and
        reordering replace it with a new tensor, which is then copied over again."""
        return (self._k is not None and self.keys.data_ptr() == self._k.data_ptr()
                and self.keys.shape[:2] == self._k.shape[:2])

    def select(self, rows: torch.Tensor, start: int) -> GrowingLayer:
        """A new layer of ``rows`` (``[n]`` indices) and the columns from ``start`` on.

        One copy: the rows are gathered from the whole buffers, spare columns included.
        """
        width = self.get_seq_length() - start
        if not self._in_buffers():
            return GrowingLayer(self.keys[:, :, start:].index_select(0, rows),
                                self.values[:, :, start:].index_select(0, rows))
        return GrowingLayer(self._k[:, :, start:].index_select(0, rows), self._v[:, :, start:].index_select(0, rows),
                            width)


def _growing(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    """A cache of :class:`GrowingLayer` holding each layer's ``(keys, values)``."""
    return Cache(layers=[GrowingLayer(k, v) for k, v in layers])


def _joinable(cache: Any) -> bool:
    """Whether every layer of ``cache`` holds one key/value column per token (see the module's notes)."""
    layers = getattr(cache, "layers", None)
    return (isinstance(cache, Cache) and bool(layers)
            and all(type(layer) in (DynamicLayer, GrowingLayer) and getattr(layer, "keys", None) is not None
                    and layer.keys.dim() == 4 for layer in layers))


def _stack_left(a: torch.Tensor, b: torch.Tensor, width: int, room: int = 0) -> torch.Tensor:
    """``a``'s rows then ``b``'s, each right-aligned in ``width`` columns (the last dim for masks, else -2).

    ``room`` more columns follow, unwritten: a :class:`GrowingLayer`'s spare columns.
    """
    dim = -1 if a.dim() == 2 else -2
    shape = list(a.shape)
    shape[0], shape[dim] = a.shape[0] + b.shape[0], width + room
    out = a.new_zeros(shape)  # zeros: padding keys and values, and mask 0
    out[: a.shape[0]].narrow(dim, width - a.shape[dim], a.shape[dim]).copy_(a)
    out[a.shape[0]:].narrow(dim, width - b.shape[dim], b.shape[dim]).copy_(b)
    return out


class Decoder:
    """Prefill, join, pick, step and trim for one model (see the module's notes).

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM` (native or composed) in eval mode.
        vocab_size: The tokenizer's vocabulary: ids at or above it are never picked
            (:class:`~monkeytune.generate.OnlyTokenizerIds`).
        pad_id: The id left padding is filled with (masked, never attended to).
    """

    def __init__(self, model: Any, vocab_size: int, pad_id: int) -> None:
        self.model, self.llm, self.pad_id = model, model.llm, pad_id
        params = inspect.signature(self.llm.forward).parameters
        # transformers renamed ``past_key_values`` to ``cache`` within the 5.x releases monkeytune takes.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last position's scores are needed; models that cannot say so return all.
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.only_tokens = OnlyTokenizerIds(vocab_size) if model.config.llm.vocab_size > vocab_size else None
        compat = get_compat(model)
        self.logn_length = compat.seq_length if compat is not None and compat.use_logn_attn else None
        self.processor = ImageProcessor(model.config.image)

    # ------------------------------------------------------------------ model calls
    @torch.no_grad()
    def _forward(self, cache: Any, **inputs: Any) -> tuple[Any, torch.Tensor]:
        """``(cache, scores [B, V])`` after one forward of the LLM; a None ``cache`` lets the model make its own."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        out = self.llm(**inputs, use_cache=True, **kwargs, **self._last_only)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        scores = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)
        if self.only_tokens is not None:
            scores = self.only_tokens(None, scores)
        return cache, scores

    def views(self, images: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_values [N, 3, S, S] float32, slots [N])`` of image files, on the CPU; from any thread.

        The batcher prepares each job's views this way while the job waits (see :meth:`start`).
        """
        return self.processor.batch(list(images))

    @torch.no_grad()  # the vision tower too: serving never keeps activations for a backward pass
    def start(self, jobs: Sequence[Any], views: Sequence[tuple[torch.Tensor, torch.Tensor] | None] = ()) -> Batch:
        """Prefill ``jobs``' prompts (left-padded, images included) into a batch of their own.

        Args:
            jobs: The jobs, each with ``ids`` and the image paths ``images``.
            views: Each job's :meth:`views`, already prepared, or None (or nothing at all):
                its images are read here.

        Raises:
            Exception: whatever the images or the model raise (the caller answers these jobs).
        """
        device = self.model.device
        width = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.ids):] = torch.tensor(job.ids, dtype=torch.long)
            mask[row, width - len(job.ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pixel_values, slots = self._pixels(jobs, views)
        embeds = self.model.embed_inputs(ids, pixel_values, slots)
        # Position ids count real tokens only (padding gets 0; it is masked anyway).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, scores = self._forward(None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        generators = [self._generator(job, device) for job in jobs]
        joins = _joinable(cache)
        if joins:
            cache = _growing([(layer.keys, layer.values) for layer in cache.layers])
        return Batch(list(jobs), cache, mask, mask.sum(-1), scores, generators, joins)

    def _pixels(self, jobs: Sequence[Any], views: Sequence[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The views of every job's images, in job order, on the model's device and in its dtype."""
        given = list(views) or [None] * len(jobs)
        parts = [v if v is not None else self.views(job.images) for job, v in zip(jobs, given) if job.images]
        if not parts:
            return None, None
        dtype = next(self.model.parameters()).dtype
        return (torch.cat([p[0] for p in parts]).to(self.model.device, dtype),
                torch.cat([p[1] for p in parts]).to(self.model.device))

    @staticmethod
    def _generator(job: Any, device: torch.device) -> torch.Generator | None:
        if job.temperature <= 0 or job.seed is None:
            return None
        # The row's own generator: its draws do not depend on what else runs beside it.
        return torch.Generator(device=device).manual_seed(job.seed)

    def pick(self, batch: Batch) -> list[int]:
        """Every row's next token, by the row's own settings."""
        chosen = batch.scores.argmax(dim=-1).tolist()
        for row, job in enumerate(batch.rows):
            if job.temperature > 0:
                chosen[row] = sample(batch.scores[row], job.temperature, job.top_p, batch.generators[row])
        return chosen

    def step(self, batch: Batch, tokens: Sequence[int]) -> None:
        """Feed one token per row (``tokens`` in row order) and leave the scores of the next."""
        device = batch.mask.device
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        batch.cache, batch.scores = self._forward(batch.cache, input_ids=ids, attention_mask=mask,
                                                  position_ids=batch.positions[:, None])
        batch.mask, batch.positions = mask, batch.positions + 1

    # ------------------------------------------------------------------ joining and leaving
    def _logn_free(self, width: int, remaining: int) -> bool:
        """Whether no query of a ``width``-column batch adding ``remaining`` tokens reaches log-n scaling."""
        return self.logn_length is None or width + remaining <= self.logn_length

    def fits(self, batch: Batch, jobs: Sequence[Any]) -> bool:
        """Whether ``jobs`` may join ``batch`` (a cache that joins; for log-n models, every row unscaled)."""
        if not batch.joins:
            return False
        width = max([batch.width, *(len(j.ids) for j in jobs)])
        return self._logn_free(width, max([batch.remaining(), *(j.max_tokens for j in jobs)]))

    def join(self, running: Batch, new: Batch) -> Batch:
        """One batch of ``running``'s rows then ``new``'s (``new`` was just prefilled; both join)."""
        if not (running.joins and new.joins):
            raise ValueError("these batches' caches cannot be merged")
        width = max(running.width, new.width)
        room = GrowingLayer.ROOM  # stacked straight into buffers with spare columns: one copy per join
        cache = Cache(layers=[GrowingLayer(_stack_left(a.keys, b.keys, width, room),
                                           _stack_left(a.values, b.values, width, room), width)
                              for a, b in zip(running.cache.layers, new.cache.layers)])
        return Batch(running.rows + new.rows, cache, _stack_left(running.mask, new.mask, width),
                     torch.cat([running.positions, new.positions]), torch.cat([running.scores, new.scores]),
                     running.generators + new.generators, True)

    def keep(self, batch: Batch, rows: Sequence[int]) -> Batch | None:
        """``batch`` with only ``rows`` (indices, in order); None when no row is left.

        A batch that cannot let rows out keeps them all (their tokens are ignored) until none is kept.
        """
        if not rows:
            return None
        if not batch.joins or len(rows) == len(batch.rows):
            return batch
        index = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
        mask = batch.mask[index]
        # Columns that only the leaving rows used (padding for everyone left) go too.
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() and self._logn_free(batch.width, batch.remaining()) else 0
        cache = Cache(layers=[layer.select(index, start) for layer in batch.cache.layers])
        return Batch([batch.rows[r] for r in rows], cache, mask[:, start:], batch.positions[index],
                     batch.scores[index], [batch.generators[r] for r in rows], True)
