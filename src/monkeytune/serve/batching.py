"""Continuous batching for the API: requests join the running batch at the next token and leave it when done.

One worker thread owns the model and runs one decode loop (:mod:`.decode`). Before every step
it takes in the requests that wait, oldest first, up to ``max_batch_size`` rows: their prompts
are prefilled (images included) and merged into the running batch's KV cache, and they get
their first token in the same step as the running rows get their next. A request's images are
cut into views by a second thread as soon as it is queued: a request joins once they are ready,
and the running batch does not wait for them. A row leaves the batch as soon as it ends: at its
end-of-answer token, its own ``max_tokens``, a stop string, its time limit, or when its client
went away; its slot is free for the next waiting request at the next step. So short and long
answers, greedy and sampled ones, share a batch; a request is answered as soon as its row ends.
A request cancelled while waiting is dropped before it takes a slot.

Each row keeps its own settings (temperature, top-p, seed: a seeded row draws from its own
generator) and its own limits; :class:`_Answers` records each row's tokens, cuts stop strings
and hands new text to streamed requests as it comes. Greedy rows give the same tokens alone or
batched, whenever they joined (see :mod:`.decode`).

Two things keep a request from joining a running batch, and then it waits for the batch to end
(and nothing behind it joins meanwhile, so it is not passed over for ever): a model whose cache
cannot take rows in (sliding-window or linear-attention layers: its batches run as
transformers' ``generate`` runs them, see :mod:`.decode`), and, for official checkpoints, a
prompt of another rotary scale than the batch's (see :meth:`Batcher._key`) or a batch long
enough for log-n attention.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from monkeytune.generate import stop_ids
from monkeytune.limits import check_prompt_length
from monkeytune.model.qwen_compat import get_compat, ntk_alpha
from monkeytune.serve.decode import Batch, Decoder

__all__ = ["Batcher", "Job", "QueueFull"]

logger = logging.getLogger(__name__)


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
        views: Its images' views, being prepared while it waits (set by :meth:`Batcher.submit`).

    After ``done``: ``tokens`` (without the end-of-answer token), ``text`` (stripped, cut at a
    stop string), ``finish_reason`` (``stop``, ``length``, ``timeout``, ``cancelled`` or
    ``error``) and ``error`` (the exception of a failed prefill or step).
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
    views: Future | None = None

    def cancel(self) -> None:
        """Stop generating for this job (its client went away); safe from any thread."""
        self.cancelled.set()

    def emit(self, event: tuple) -> None:
        """Hand ``event`` to ``on_event``; a listener already gone must not stop the worker."""
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - e.g. the server's event loop closed during shutdown
            logger.debug("event %s for a job nobody listens to", event[0], exc_info=True)


def _ready(job: Job) -> bool:
    """Whether ``job`` can start: its images' views are prepared (or it has none)."""
    return job.views is None or job.views.done()


class _Answers:
    """Each row's answer as its tokens come: text, stop strings, streaming, limits, the final event."""

    def __init__(self, tokenizer: Any, stops: list[int]) -> None:
        self.tokenizer, self.stops = tokenizer, set(stops)

    def record(self, job: Job, token: int, now: float) -> bool:
        """Take ``job``'s next ``token``; whether its row goes on (False: it was answered)."""
        try:
            self._step(job, token, now)
        except Exception as e:  # one row's failure ends that row, not the batch
            self.fail(job, e)
        return job.finish_reason is None

    def decode(self, tokens: list[int]) -> str:
        """The text of ``tokens``; ids past the tokenizer's vocabulary (the model's padding rows) are skipped."""
        try:
            return self.tokenizer.decode(tokens)
        except ValueError:
            vocab = int(self.tokenizer.vocab_size)
            return self.tokenizer.decode([t for t in tokens if 0 <= t < vocab])

    def _step(self, job: Job, token: int, now: float) -> None:
        if token in self.stops:
            return self.end(job, "stop")
        job.tokens.append(token)
        if job.stream or job.stop:
            self._text(job)
        if job.finish_reason is not None:
            return
        if len(job.tokens) >= job.max_tokens:
            self.end(job, "length")
        elif job.cancelled.is_set():
            self.end(job, "cancelled")
        elif job.deadline is not None and now > job.deadline:
            self.end(job, "timeout")

    def _text(self, job: Job) -> None:
        text = self.decode(job.tokens).lstrip()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            job.text, job.cut = text[:cut].rstrip(), True
            self._send(job, job.text)
            return self.end(job, "stop")
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

    def end(self, job: Job, reason: str) -> None:
        """End ``job``'s row and answer its request at once: the rest of the batch runs on."""
        if job.finish_reason is not None:
            return
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

    def fail(self, job: Job, error: BaseException) -> None:
        """End ``job``'s row with ``error`` (reported to its request as ``generation_failed``); ended rows keep their answer."""
        if job.finish_reason is None:
            logger.error("a request failed", exc_info=error)
            job.error = error
            self.end(job, "error")


class Batcher:
    """The generation worker: a bounded queue of :class:`Job` and the running batch it feeds.

    Args:
        model: A loaded :class:`~monkeytune.model.MonkeyForCausalLM` in eval mode.
        tokenizer: Its tokenizer.
        template: The prompt template (for its stop tokens).
        max_batch_size: Most requests generated together.
        max_queue: Most requests waiting for a slot; more are refused (:class:`QueueFull`).
        arriving: How many requests are being read or checked and will be submitted soon. An
            idle worker waits up to ``gather_s`` for them, so that requests arriving together
            are prefilled together instead of the first one alone.
        gather_s: Longest such wait.

    Attributes:
        running: Rows in the running batch. step_count, step_rows: Decoding steps run and
            their rows summed (their ratio is the mean batch; ``/health`` reports both).
        recent: The rows of the latest steps.
    """

    def __init__(self, model: Any, tokenizer: Any, template: str, max_batch_size: int = 8,
                 max_queue: int = 64, arriving: Callable[[], int] = lambda: 0, gather_s: float = 0.05) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"need a batch size >= 1 and a queue size >= 0, got {max_batch_size}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.stops = stop_ids(tokenizer, template)
        self.decoder = Decoder(model, int(tokenizer.vocab_size), tokenizer.pad_id)
        self.answers = _Answers(tokenizer, self.stops)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.arriving, self.gather_s = arriving, gather_s
        self._batch: Batch | None = None  # the running batch (worker thread only, read by close)
        compat = get_compat(model)
        self._ntk_length = compat.seq_length if compat is not None and compat.use_dynamic_ntk else None
        self._waiting: list[Job] = []
        # Images are cut into views in a thread of their own as their jobs are queued: Pillow and
        # torch code that mostly releases the GIL, so on a CPU it runs on the core the decoding
        # steps leave free, and a job starts with its views ready. One thread: a burst of
        # pictures does not crowd out the event loop, which answers refusals meanwhile.
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="monkeytune-api-views")
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0
        self.step_count = self.step_rows = 0
        self.recent: deque[int] = deque(maxlen=1000)
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
            if job.images:
                job.views = self._preparer.submit(self.decoder.views, job.images)
                job.views.add_done_callback(self._wake)
            self._waiting.append(job)
            self._cond.notify()

    def _wake(self, _: Any = None) -> None:
        with self._cond:
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: dropped if it still waits, ended at its next token if it runs."""
        job.cancel()
        with self._cond:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
        if waiting:
            if job.views is not None:
                job.views.cancel()  # not prepared yet: never will be
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
        batch = self._batch
        for job in batch.rows if batch is not None else ():
            job.cancel()  # ends at its next token
        for job in waiting:
            job.cancel()
            job.finish_reason = "cancelled"
            job.emit(("done", job))
        self._thread.join(timeout)
        self._preparer.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ taking jobs
    def _key(self, job: Job) -> float:
        """What rows must share to be batched: for official checkpoints, their prompt's rotary scale.

        Those scale their rotary embedding by the longest prompt of the batch (dynamic NTK,
        above ``seq_length`` tokens): a row batched with longer prompts would not answer as it
        does alone, so only prompts of one scale share a batch. Everything else shares.
        """
        return ntk_alpha(len(job.ids), self._ntk_length) if self._ntk_length else 1.0

    def _take(self, batch: Batch | None) -> list[Job]:
        """The waiting jobs to start now: beside ``batch`` (None: idle), at most ``max_batch_size`` in all.

        Idle, the oldest job and the compatible ones after it start. Beside a running batch,
        jobs join oldest first, and none past one that cannot join: that one waits for the
        batch to end, and would wait for ever if later ones kept it running. Either way none
        past one whose views are not ready yet: it joins at a later step, and the batch does
        not wait for it.
        """
        taken: list[Job] = []
        key = self._key(self._waiting[0] if batch is None else batch.rows[0])
        room = self.max_batch_size - (0 if batch is None else len(batch.rows))
        for job in self._waiting:
            if len(taken) == room:
                break
            if self._key(job) != key:
                if batch is None:
                    continue
                break
            if not _ready(job) or (batch is not None and not self.decoder.fits(batch, [*taken, job])):
                break
            taken.append(job)
        for job in taken:
            self._waiting.remove(job)
        return taken

    def _gather(self) -> None:
        """Wait (at most ``gather_s``) for requests that are on their way to an idle worker.

        Those being read or checked arrived with the waiting ones: prefilled together, they
        start in one forward rather than joining one by one. Nothing else is waited for: a
        request that comes later joins at the next step anyway.
        """
        end = time.monotonic() + self.gather_s
        while len(self._waiting) < self.max_batch_size and not self._closed and self.arriving():
            left = end - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(min(left, 0.005))  # submit() wakes it at once

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        batch: Batch | None = None
        while True:
            with self._cond:
                if batch is None:
                    self._cond.wait_for(lambda: self._waiting or self._closed)
                    self._gather()
                    # Idle, the oldest job's views are worth waiting for (their thread wakes us).
                    self._cond.wait_for(lambda: self._closed or not self._waiting or _ready(self._waiting[0]))
                if self._closed and batch is None:
                    return
                new = self._take(batch) if self._waiting and not self._closed else []
                self.running += len(new)
            try:
                batch = self._advance(batch, new)
            except BaseException as e:  # the worker must outlive any batch: later requests depend on it
                logger.exception("the generation worker lost a batch")
                for job in [*(batch.rows if batch is not None else ()), *new]:
                    self.answers.fail(job, e)
                batch = None
            self._batch = batch
            self.running = 0 if batch is None else sum(j.finish_reason is None for j in batch.rows)

    def _start(self, jobs: list[Job]) -> Batch | None:
        """Prefill ``jobs`` into a batch of their own; None when none could start (each is answered)."""
        fitting, views = [], []
        for job in jobs:
            try:  # a prompt that cannot fit with its answer, or an image that cannot be read, fails alone
                check_prompt_length(len(job.ids), self.model.config, job.max_tokens)
                views.append(job.views.result() if job.views is not None else None)
                fitting.append(job)
            except Exception as e:  # noqa: BLE001 - reported to that request
                self.answers.fail(job, e)
            job.views = None  # the batch's cache holds what the views gave; the tensors go
        if not fitting:
            return None
        try:
            return self.decoder.start(fitting, views)
        except Exception as e:  # noqa: BLE001 - these requests get the error; the running rows go on
            logger.exception("starting %d requests failed", len(fitting))
            for job in fitting:
                self.answers.fail(job, e)
            return None

    def _advance(self, batch: Batch | None, new: list[Job]) -> Batch | None:
        """Start ``new`` beside ``batch``, pick every row's next token and run one step; the batch after."""
        started = self._start(new) if new else None
        if started is not None:
            batch = started if batch is None else self.decoder.join(batch, started)
        if batch is None:
            return None
        try:
            tokens = self.decoder.pick(batch)
            now = time.monotonic()
            rows = sum(job.finish_reason is None for job in batch.rows)
            self.step_count += 1
            self.step_rows += rows
            self.recent.append(rows)
            open_rows = [row for row, (job, token) in enumerate(zip(batch.rows, tokens))
                         if job.finish_reason is None and self.answers.record(job, token, now)]
            picked = dict(zip(batch.rows, tokens))
            batch = self.decoder.keep(batch, open_rows)
            if batch is not None:
                self.decoder.step(batch, [picked[job] for job in batch.rows])
            return batch
        except Exception as e:  # the open rows get the error (ended ones have their answer)
            logger.exception("generation failed for a batch of %d", len(batch.rows))
            for job in batch.rows:
                self.answers.fail(job, e)
            return None
