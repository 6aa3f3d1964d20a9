"""Dynamic batching for the API: requests that arrive together are generated together.

One worker thread owns the model. It takes the oldest waiting request and every other waiting
request that can share its decoding (same sampling settings and a similar ``max_tokens``, see
:meth:`Job.batch_key`), up to ``max_batch_size``, and generates them as one left-padded batch through
:func:`monkeytune.generate.generate_ids`, the batched generator ``chat --questions`` and
``eval`` use. As soon as a batch finishes, the next one is formed from whatever waits.

Inside a batch each request keeps its own limits through one ``StoppingCriteria``
(:class:`_Rows`), called after every token with the whole batch: it records each row's new
token, ends a row at its end-of-answer token, its own ``max_tokens``, a stop string, its time
limit, or when its client went away, and hands new text to streamed requests as it comes. A
request is answered as soon as its row ends, not when its batch does. An ended row stops
counting (transformers pads it); when every row has ended the batch ends, so a request nobody
reads no longer holds the model. A request cancelled while waiting is dropped before it takes a
slot. Batches do not take new rows while they run (transformers' ``generate`` is given its whole
batch at once), which is why answers with very different ``max_tokens`` are not batched together.

Greedy rows give the same tokens alone or batched: left padding is masked and position ids
follow the mask (transformers' generation), so each row sees exactly its own prompt.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from monkeytune.generate import GenerationSettings, generate_ids, stop_ids
from monkeytune.model.qwen_compat import get_compat, ntk_alpha

__all__ = ["Batcher", "Job", "QueueFull"]

logger = logging.getLogger(__name__)
_serial = itertools.count()


class QueueFull(RuntimeError):
    """The waiting queue is full (or the batcher is closed); the request is refused at once."""


@dataclass(eq=False)
class Job:
    """One request to generate for.

    Attributes:
        ids: Prompt ids. images: Its image paths, in prompt order.
        max_tokens: Most tokens to generate. temperature, top_p, seed: Decoding (0: greedy).
        stop: Stop strings (the answer ends before the first one).
        stream: Whether text is handed to ``on_event`` as it is generated.
        on_event: Called from the worker thread with ``("text", piece)`` (streamed jobs) and,
            once, ``("done", self)``; must not block.
        deadline: ``time.monotonic()`` after which the row is ended (None: no limit).

    After ``done``: ``tokens`` (without the end-of-answer token), ``text`` (stripped, cut at a
    stop string), ``finish_reason`` (``stop``, ``length``, ``timeout``, ``cancelled`` or
    ``error``) and ``error`` (the exception of a failed batch).
    """

    ids: list[int]
    images: list[str]
    max_tokens: int
    on_event: Callable[[tuple], Any]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    deadline: float | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    sent: int = 0
    cut: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    serial: int = field(default_factory=lambda: next(_serial))

    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a batch: one decoding setting, and answer budgets alike.

        A batch runs until its longest row ends, and a row that has ended still takes its place
        in every step: a 16-token answer batched with 512-token ones would hold its slot for all
        of them. So ``max_tokens`` is bucketed by powers of two (1, 2, 3-4, 5-8, ... 9-16 ...).
        """
        budget = (self.max_tokens - 1).bit_length()
        if self.temperature == 0:
            return ("greedy", budget)
        if self.seed is not None:
            # A seeded sample is reproducible only when its batch is: it runs alone.
            return ("seeded", self.serial)
        return ("sample", self.temperature, self.top_p, budget)

    def cancel(self) -> None:
        """Stop generating for this job (its client went away); safe from any thread."""
        self.cancelled.set()

    def emit(self, event: tuple) -> None:
        """Hand ``event`` to ``on_event``; a listener already gone must not stop the worker."""
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - e.g. the server's event loop closed during shutdown
            logger.debug("event %s for a job nobody listens to", event[0], exc_info=True)


class _Rows(StoppingCriteria):
    """Per-row bookkeeping of one batch, run by transformers after every generated token."""

    def __init__(self, jobs: list[Job], tokenizer: Any, stops: list[int]) -> None:
        self.jobs, self.tokenizer, self.stops = jobs, tokenizer, set(stops)
        self.ended = [False] * len(jobs)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        now = time.monotonic()
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if not self.ended[row]:
                try:
                    self._step(row, self.jobs[row], token, now)
                except Exception as e:  # one row's failure ends that row, not the batch
                    self.fail(row, e)
        return torch.tensor(self.ended, dtype=torch.bool, device=input_ids.device)

    def decode(self, tokens: list[int]) -> str:
        """The text of ``tokens``; ids past the tokenizer's vocabulary (the model's padding rows) are skipped."""
        try:
            return self.tokenizer.decode(tokens)
        except ValueError:
            vocab = int(self.tokenizer.vocab_size)
            return self.tokenizer.decode([t for t in tokens if 0 <= t < vocab])

    def _step(self, row: int, job: Job, token: int, now: float) -> None:
        if token in self.stops:
            return self.end(row, "stop")
        job.tokens.append(token)
        if job.stream or job.stop:
            self._text(row, job)
        if self.ended[row]:
            return
        if len(job.tokens) >= job.max_tokens:
            self.end(row, "length")
        elif job.cancelled.is_set():
            self.end(row, "cancelled")
        elif job.deadline is not None and now > job.deadline:
            self.end(row, "timeout")

    def _text(self, row: int, job: Job) -> None:
        text = self.decode(job.tokens).lstrip()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            job.text, job.cut = text[:cut].rstrip(), True
            self._send(job, job.text)
            return self.end(row, "stop")
        if job.stream:
            # Hold back what may begin a stop string, and trailing spaces (the answer is stripped).
            hold = max((len(s) - 1 for s in job.stop), default=0)
            visible = text.rstrip()
            self._send(job, visible[: len(visible) - hold].rstrip() if hold else visible)

    @staticmethod
    def _send(job: Job, text: str) -> None:
        if job.stream and len(text) > job.sent:
            piece, job.sent = text[job.sent :], len(text)
            job.emit(("text", piece))

    def end(self, row: int, reason: str) -> None:
        """End ``row`` and answer its request at once: the rest of the batch may run on for a while."""
        if self.ended[row]:
            return
        self.ended[row] = True
        job = self.jobs[row]
        job.finish_reason = reason
        try:
            if not job.cut:
                job.text = self.decode(job.tokens).strip()
            if reason in ("stop", "length"):
                self._send(job, job.text)
        except Exception as e:  # noqa: BLE001 - reported to that request only
            logger.error("finishing a request failed", exc_info=e)
            job.error, job.finish_reason = e, "error"
        job.emit(("done", job))

    def fail(self, row: int, error: BaseException) -> None:
        logger.error("request in row %d failed", row, exc_info=error)
        self.jobs[row].error = error
        self.end(row, "error")

    def finish(self, error: BaseException | None = None) -> None:
        """End the rows still open: at the batch's own token limit, or with the batch's ``error``."""
        for row in range(len(self.jobs)):
            if not self.ended[row]:
                if error is None:
                    self.end(row, "length")
                else:
                    self.fail(row, error)


class Batcher:
    """The generation worker: a bounded queue of :class:`Job` and batches formed from it.

    Args:
        model: A loaded :class:`~monkeytune.model.MonkeyForCausalLM` in eval mode.
        tokenizer: Its tokenizer.
        template: The prompt template (for its stop tokens).
        max_batch_size: Most requests generated together.
        max_queue: Most requests waiting for a slot; more are refused (:class:`QueueFull`).
        arriving: How many requests are being read or checked and will be submitted soon. An
            idle worker waits up to ``gather_s`` for them (and for the clients of its last
            batch), so that requests arriving together start together instead of the first
            one alone.
        gather_s: Longest such wait.
    """

    def __init__(self, model: Any, tokenizer: Any, template: str, max_batch_size: int = 8,
                 max_queue: int = 64, arriving: Callable[[], int] = lambda: 0, gather_s: float = 0.05) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"need a batch size >= 1 and a queue size >= 0, got {max_batch_size}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.stops = stop_ids(tokenizer, template)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.arriving, self.gather_s = arriving, gather_s
        self._last_size = 1
        self._current: list[Job] = []  # the batch being generated
        self.positions = int(model.config.llm.max_position_embeddings)
        compat = get_compat(model)
        self._ntk_length = compat.seq_length if compat is not None and compat.use_dynamic_ntk else None
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0
        self.batch_count = self.batched_jobs = 0  # batches run and the requests in them (/health)
        self.recent: deque[int] = deque(maxlen=1000)  # sizes of the latest batches
        self._thread = threading.Thread(target=self._loop, name="monkeytune-api-generate", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ queue
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` at once when the queue is full or closed."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: dropped if it still waits, ended at its next token if it runs."""
        job.cancel()
        with self._cond:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
        if waiting:
            job.finish_reason = "cancelled"
            job.emit(("done", job))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, cancel the waiting and running ones and end the worker."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
        for job in self._current:
            job.cancel()  # ends at its next token
        for job in waiting:
            job.cancel()
            job.finish_reason = "cancelled"
            job.emit(("done", job))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _key(self, job: Job) -> tuple:
        """:meth:`Job.batch_key`, and for official checkpoints their prompt's rotary scale.

        Those scale their rotary embedding by the longest prompt of the batch (dynamic NTK,
        above ``seq_length`` tokens): a row batched with longer prompts would not answer as it
        does alone, so only prompts of one scale share a batch.
        """
        alpha = ntk_alpha(len(job.ids), self._ntk_length) if self._ntk_length else 1.0
        return job.batch_key(), alpha

    def _take(self) -> list[Job]:
        """The next batch: the oldest job and the compatible ones after it that fit beside it."""
        head = self._waiting[0]
        key, batch = self._key(head), []
        longest = most_new = 0
        for job in list(self._waiting):
            if len(batch) == self.max_batch_size:
                break
            new_most = max(most_new, job.max_tokens)
            # generate_ids checks each prompt against the batch's token limit: keep every row fitting.
            if self._key(job) != key or max(longest, len(job.ids)) + new_most > self.positions:
                continue
            batch.append(job)
            longest, most_new = max(longest, len(job.ids)), new_most
        for job in batch:
            self._waiting.remove(job)
        return batch

    def _gather(self) -> None:
        """Wait (at most ``gather_s``) for requests that are on their way.

        Those being read or checked arrived with the waiting ones. And the clients of the last
        batch, answered together, tend to send their next requests together: a batch smaller
        than the last one waits for them too, rather than leaving them a whole batch behind.
        A lone client (last batch of one) never waits.
        """
        end = time.monotonic() + self.gather_s
        while len(self._waiting) < self.max_batch_size and not self._closed:
            if not self.arriving() and len(self._waiting) >= self._last_size:
                break
            left = end - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(min(left, 0.005))  # submit() wakes it at once

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closed)
                self._gather()
                if self._closed:
                    return
                if not self._waiting:  # cancelled while gathering
                    continue
                batch = self._take()
                self.running = self._last_size = len(batch)
                self._current = batch
            try:
                self._run(batch)
            except BaseException:  # the worker must outlive any batch: later requests depend on it
                logger.exception("the generation worker lost a batch of %d", len(batch))
            finally:
                self.running, self._current = 0, []

    def _run(self, batch: list[Job]) -> None:
        head = batch[0]
        rows = _Rows(batch, self.tokenizer, self.stops)
        settings = GenerationSettings(
            max_new_tokens=max(j.max_tokens for j in batch), temperature=head.temperature, top_p=head.top_p,
            extra={"stopping_criteria": StoppingCriteriaList([rows])})
        self.batch_count += 1
        self.batched_jobs += len(batch)
        self.recent.append(len(batch))
        error = None
        try:
            if head.seed is not None and head.temperature > 0:
                torch.manual_seed(head.seed)
            generate_ids(self.model, self.tokenizer, [(j.ids, j.images) for j in batch], settings, self.stops)
        except Exception as e:  # the open rows get the error (ended ones have their answer); the worker lives on
            logger.exception("generation failed for a batch of %d", len(batch))
            error = e
        finally:
            rows.finish(error)
