"""``monkeytune api``: an OpenAI-compatible HTTP server (Starlette on uvicorn) for one model folder.

Endpoints: ``POST /v1/chat/completions`` (plain or ``stream: true`` server-sent events),
``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``. Every refusal is an
OpenAI-shaped JSON error (:mod:`.api_errors`) and is decided in the request's own handler,
from the request alone (key, body size, fields, prompt length, images) or the queue's length,
so it is answered at once, never after waiting for the model. Accepted requests go to the
:class:`~monkeytune.serve.batching.Batcher`, whose worker thread generates them in one
continuous batch (a request joins it at the next token) while the event loop keeps answering.

A request holds a slot only while someone reads it: the handler watches the connection, and a
client that goes away (or a request past its time limit) is cancelled: dropped if it still
waits, ended at its next token if it runs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from monkeytune.limits import longest_token_chars
from monkeytune.serve.api_errors import APIError, error_body
from monkeytune.serve.api_inputs import ImageStore, render_prompt
from monkeytune.serve.api_request import ChatRequest, RequestLimits, parse_body, parse_chat_request
from monkeytune.serve.batching import Batcher, Job, QueueFull

__all__ = ["APIServer", "APISettings"]

logger = logging.getLogger(__name__)
DRAIN_FACTOR = 4  # an oversized body up to this many times the limit is read (and dropped) before the 413
KEEPALIVE_S = 15.0  # an SSE comment this often while a streamed request waits: proxies keep the connection
BIG_BODY = 64 * 2**10  # bodies above this are parsed in a worker thread, off the event loop


@dataclass(frozen=True)
class APISettings:
    """How the API serves one model.

    Attributes:
        model_name: The id ``/v1/models`` lists and responses carry.
        template: The prompt template (as the folder records, see ``default_template``).
        api_key: Required as ``Authorization: Bearer KEY`` when set.
        limits: Per-request limits (body, images, ``file://`` root).
        default_max_tokens: Tokens generated when a request sets no ``max_tokens`` (fewer when
            the prompt leaves less room).
        time_limit_s: Longest a request may take, waiting included (None: no limit).
        max_batch_size: Most requests generated together.
        max_queue: Most requests waiting for a slot; beyond it, 429.
    """

    model_name: str = "model"
    template: str = "vqa"
    api_key: str | None = None
    limits: RequestLimits = RequestLimits()
    default_max_tokens: int = 256
    time_limit_s: float | None = 120.0
    max_batch_size: int = 8
    max_queue: int = 64


async def _disconnected(receive: Any) -> None:
    """Returns once the client has gone away (the request body must already be read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class _ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class _EventStream(StreamingResponse):
    """A server-sent event response that tells its source when the client goes away."""

    def __init__(self, events: AsyncIterator[bytes], on_gone: Any) -> None:
        # Proxies must pass each event on at once (nginx reads X-Accel-Buffering).
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_gone = on_gone

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (_ClientGone, OSError):
            self.on_gone()
        finally:
            await self.body_iterator.aclose()  # its watcher of the connection stops with it


class APIServer:
    """The Starlette app of one loaded model and its batcher.

    Args:
        model: A loaded :class:`~monkeytune.model.MonkeyForCausalLM` in eval mode.
        tokenizer: Its tokenizer.
        settings: Limits, key, template and batching.
    """

    def __init__(self, model: Any, tokenizer: Any, settings: APISettings = APISettings()) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.arriving = 0  # requests past the queue check and not yet submitted or refused (event loop only)
        self.batcher = Batcher(model, tokenizer, settings.template, settings.max_batch_size, settings.max_queue,
                               arriving=lambda: self.arriving)
        self.images = ImageStore(settings.limits)
        self.created = int(time.time())
        # Computed once per tokenizer by the prompt-length check; here rather than in a request.
        longest_token_chars(tokenizer)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={APIError: self._api_error, HTTPException: self._http_error, Exception: self._crash},
        )

    def close(self) -> None:
        """Stop the batcher (waiting requests are cancelled) and remove the image files."""
        self.batcher.close()
        self.images.close()

    # ------------------------------------------------------------------ errors
    @staticmethod
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers())

    @staticmethod
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(exc.status_code, message, code), exc.status_code)

    @staticmethod
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}", "internal_error"), 500)

    # ------------------------------------------------------------------ small endpoints
    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", "invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key", "invalid_api_key")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "monkeytune"}

    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: Request) -> JSONResponse:
        self._authorize(request)
        if request.path_params["model_id"] != self.settings.model_name:
            raise APIError(404, f"the model {request.path_params['model_id']!r} does not exist; this server has "
                           f"{self.settings.model_name!r}", "model_not_found", "model")
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> JSONResponse:
        b = self.batcher
        return JSONResponse({"status": "ok", "model": self.settings.model_name, "waiting": b.waiting,
                             "running": b.running, "max_batch_size": b.max_batch_size, "max_queue": b.max_queue,
                             "steps": b.step_count, "step_rows": b.step_rows})

    # ------------------------------------------------------------------ chat completions
    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is over the limit of {limit / 2**20:.1f} MiB",
                           "request_too_large")
        if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
            raise too_big  # not worth reading: the connection is closed after the answer
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_FACTOR * limit:
                raise too_big
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise too_big  # read to the end, so the client gets the answer rather than a broken pipe
        return b"".join(chunks)

    async def _parse(self, request: Request) -> ChatRequest:
        body = await self._read_body(request)
        if len(body) > BIG_BODY:
            return await run_in_threadpool(lambda: parse_chat_request(parse_body(body), self.settings.limits))
        return parse_chat_request(parse_body(body), self.settings.limits)

    def _queue_full(self) -> APIError:
        return APIError(429, f"the server is busy: {self.batcher.waiting} requests are waiting (at most "
                        f"{self.settings.max_queue}); retry shortly", "queue_full", retry_after=1)

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        if self.batcher.waiting >= self.settings.max_queue:
            raise self._queue_full()  # before reading or decoding anything
        started = time.monotonic()
        self.arriving += 1
        try:
            try:
                chat = await self._parse(request)
            except ClientDisconnect:
                return Response(status_code=499)  # gone while sending the body
            big = sum(len(m.text) for m in chat.messages) > BIG_BODY
            job, paths = await self._prepare(chat, started, big)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()

            def on_event(event: tuple) -> None:
                if event[0] == "done":
                    self.images.release(paths)  # the worker has read them (or never will)
                loop.call_soon_threadsafe(events.put_nowait, event)

            job.on_event = on_event
            try:
                self.batcher.submit(job)
            except QueueFull:
                self.images.release(paths)
                raise self._queue_full() from None
        finally:
            self.arriving -= 1
        reply = _Reply(self, job, chat, events)
        if chat.stream:
            return _EventStream(reply.stream(request.receive), lambda: self.batcher.cancel(job))
        if not await reply.wait(request.receive):
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        return JSONResponse(reply.completion())

    async def _prepare(self, chat: ChatRequest, started: float, big: bool = False) -> tuple[Job, list[str]]:
        """The job of a checked request: prompt rendered and length-checked, images written and checked.

        A ``big`` prompt is tokenized in a worker thread, so the event loop keeps answering meanwhile.
        """
        s = self.settings
        config = self.model.config
        paths = self.images.plan(chat)
        args = (chat, s.template, self.tokenizer, config, chat.max_tokens or 0, paths)
        ids, images = await run_in_threadpool(render_prompt, *args) if big else render_prompt(*args)
        max_new = chat.max_tokens
        if max_new is None:  # the default, as far as the prompt leaves room
            room = int(config.llm.max_position_embeddings) - len(ids)
            if room < 1:
                raise APIError(400, f"the prompt is {len(ids):,} tokens (images and template included): it fills all "
                               f"{len(ids) + room:,} positions of the model and leaves no room for an answer",
                               "context_length_exceeded", "messages")
            max_new = min(s.default_max_tokens, room)
        if paths:
            await run_in_threadpool(self.images.write_and_check, chat, paths)
        deadline = started + s.time_limit_s if s.time_limit_s else None
        job = Job(ids, images, max_new, on_event=lambda event: None, temperature=chat.temperature,
                  top_p=chat.top_p, seed=chat.seed, stop=chat.stop, stream=chat.stream, deadline=deadline)
        return job, paths


class _Reply:
    """The answer to one accepted request: waits for its job and shapes what OpenAI clients read."""

    def __init__(self, server: APIServer, job: Job, chat: ChatRequest, events: asyncio.Queue) -> None:
        self.server, self.job, self.chat, self.events = server, job, chat, events
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.timed_out = False  # decided here: the worker may still be ending the row

    def _remaining(self) -> float | None:
        return None if self.job.deadline is None else max(0.0, self.job.deadline - time.monotonic())

    def _failure(self) -> APIError | None:
        job, limit = self.job, self.server.settings.time_limit_s
        if self.timed_out or job.finish_reason == "timeout":
            return APIError(503, f"the request took longer than the time limit of {limit:g} s", "timeout",
                            retry_after=1)
        if job.finish_reason == "cancelled":
            return APIError(503, "the server is shutting down", "shutting_down")
        if job.finish_reason == "error":
            return APIError(500, f"generation failed: {type(job.error).__name__}: {job.error}", "generation_failed")
        return None

    async def _next(self, gone: asyncio.Future, timeout: float | None) -> tuple | None:
        """The next event of the job; None when ``timeout`` passed; :class:`_ClientGone` if the client left."""
        getter = asyncio.ensure_future(self.events.get())
        done, _ = await asyncio.wait({getter, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if gone in done:
            raise _ClientGone()
        return None

    def _timed_out(self) -> None:
        self.timed_out = True
        self.server.batcher.cancel(self.job)

    async def wait(self, receive: Any) -> bool:
        """Until the job is done (True) or the client left (False; the job is cancelled).

        Raises:
            APIError: the job timed out (503, also when time ran out while it waited) or failed.
        """
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            while True:
                event = await self._next(gone, self._remaining())
                if event is None:
                    self._timed_out()
                    break
                if event[0] == "done":
                    break
        except _ClientGone:
            self.server.batcher.cancel(self.job)
            return False
        finally:
            gone.cancel()
        failure = self._failure()
        if failure is not None:
            raise failure
        return True

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.job.ids), len(self.job.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.server.settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.job.text},
                             "finish_reason": self.job.finish_reason, "logprobs": None}],
                "usage": self.usage()}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.server.settings.model_name,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if self.chat.include_usage:
            body["usage"] = None
        return b"data: " + _dumps(body) + b"\n\n"

    async def stream(self, receive: Any) -> AsyncIterator[bytes]:
        """Server-sent events: the role, the text as it comes, the finish reason, usage, ``[DONE]``."""
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                remaining = self._remaining()
                event = await self._next(gone, KEEPALIVE_S if remaining is None else min(remaining, KEEPALIVE_S))
                if event is None:
                    if self._remaining() == 0:
                        self._timed_out()
                        break
                    yield b": keep-alive\n\n"
                elif event[0] == "text":
                    yield self._chunk({"content": event[1]})
                else:
                    break
            failure = self._failure()
            if failure is not None:
                yield b"data: " + _dumps(failure.body()) + b"\n\n"
            else:
                yield self._chunk({}, self.job.finish_reason)
                if self.chat.include_usage:
                    yield b"data: " + _dumps({"id": self.id, "object": "chat.completion.chunk",
                                              "created": self.created, "model": self.server.settings.model_name,
                                              "choices": [], "usage": self.usage()}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            gone.cancel()
