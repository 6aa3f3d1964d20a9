"""Reading an OpenAI chat-completions request body into a checked :class:`ChatRequest`.

Everything here is cheap and needs no model: types, ranges, roles, content parts and the
base64 of data URLs are checked, and the first problem becomes an
:class:`~monkeytune.serve.api_errors.APIError` naming the field (``param``), so a bad request is
refused before it waits for anything. Images are decoded later (:mod:`.api_inputs`).

Accepted: ``messages`` (roles ``system``/``developer``, ``user``, ``assistant``; content a
string or a list of ``text`` and ``image_url`` parts), ``max_tokens`` or
``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``,
``stream_options.include_usage``, ``n`` (1 only) and ``model`` (any: the server has one).
Parameters that would change the answer's meaning and cannot be honoured (``tools``,
``logprobs``, ``response_format`` other than text, ``n > 1``) are refused; other OpenAI
parameters (penalties, ``user``, ``metadata`` ...) are accepted and ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from monkeytune.serve.api_errors import APIError, bad_request

__all__ = ["ChatRequest", "ImagePart", "Message", "RequestLimits", "parse_body", "parse_chat_request"]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # stop strings are searched at every token: keep that bounded


@dataclass(frozen=True)
class RequestLimits:
    """Limits on what one request may carry.

    Attributes:
        max_body_bytes: Largest request body.
        max_image_bytes: Largest image file (decoded from base64 or read from disk).
        max_image_pixels: Largest ``width * height``, read from the header before decoding.
        max_images: Most images in one request.
        image_root: Folder ``file://`` image URLs may point into; None: file URLs are refused.
    """

    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 50_000_000
    max_images: int = 8
    image_root: Path | None = None


@dataclass
class ImagePart:
    """One ``image_url`` part: decoded bytes of a data URL, or a checked file under the image root."""

    param: str
    data: bytes | None = None
    path: Path | None = None


@dataclass
class Message:
    """One turn: role ``system``, ``user`` or ``assistant``, its text and images."""

    role: str
    text: str
    images: list[ImagePart] = field(default_factory=list)


@dataclass
class ChatRequest:
    """A checked chat-completions request.

    ``messages`` holds at most one leading system turn, then user and assistant turns
    alternating (consecutive turns of one role merged), the last a user turn.
    ``max_tokens`` is None when the request set none (the server's default applies).
    """

    messages: list[Message]
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def images(self) -> list[ImagePart]:
        return [im for m in self.messages for im in m.images]


def parse_body(body: bytes) -> Any:
    """The JSON object of a request body (400 when it is not one)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply", "invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}", "invalid_json")
    return payload


def _number(payload: dict, name: str, low: float, high: float, default: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low:g} and {high:g}, got {value!r}", name)
    return float(value)


def _integer(payload: dict, name: str, low: int, high: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _refuse_unsupported(payload: dict) -> None:
    """Refuse parameters whose meaning cannot be honoured (ignoring them would answer wrongly)."""
    n = payload.get("n")
    if n is not None and n != 1:
        raise bad_request(f"only n=1 is supported, got {n!r}", "n")
    for name in ("tools", "functions"):
        if payload.get(name):
            raise bad_request(f"{name} are not supported by this server", name, "unsupported_parameter")
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise bad_request("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    fmt = payload.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format",
                          "unsupported_parameter")


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"stop must be a string or a list of strings, got {value!r}", "stop")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"each stop string must have 1 to {MAX_STOP_CHARS} characters", "stop")
    return stops


def _data_url(url: str, param: str, limits: RequestLimits) -> ImagePart:
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request("a data URL image must be base64: data:image/png;base64,...", param, "invalid_image_url")
    # The size is known from the text's length: a huge image is refused before it is decoded.
    if len(data) // 4 * 3 > limits.max_image_bytes + 3:
        raise APIError(413, f"the image is about {len(data) // 4 * 3 / 2**20:.1f} MiB; the largest accepted is "
                       f"{limits.max_image_bytes / 2**20:.1f} MiB", "image_too_large", param)
    try:
        raw = base64.b64decode(data.translate({ord(c): None for c in " \t\r\n"}), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the image's data URL is not valid base64", param, "invalid_base64") from None
    if not raw:
        raise bad_request("the image's data URL is empty", param, "invalid_image")
    return ImagePart(param, data=raw)


def _file_url(url: str, param: str, limits: RequestLimits) -> ImagePart:
    if limits.image_root is None:
        raise bad_request("file:// image URLs are off; start the server with --image-root DIR to allow files under "
                          "DIR, or send the image as a base64 data URL", param, "file_urls_disabled")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"file URLs must name a local file, not host {parsed.netloc!r}", param, "invalid_image_url")
    root = limits.image_root.resolve()
    # Relative paths are taken under the root; symlinks are followed before the containment check.
    path = (root / unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise bad_request("the file URL points outside the server's image root", param, "invalid_image_url")
    if not path.is_file():
        raise bad_request(f"no image file at {unquote(parsed.path)!r} under the server's image root", param,
                          "invalid_image_url")
    return ImagePart(param, path=path)


def _image_part(part: dict, param: str, limits: RequestLimits) -> ImagePart:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    param = f"{param}.image_url"
    if not isinstance(url, str) or not url:
        raise bad_request("an image_url part needs image_url.url, a data: or file:// URL", param, "invalid_image_url")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, param, limits)
    if scheme == "file":
        return _file_url(url, param, limits)
    raise bad_request("image URLs must be base64 data: URLs (or file:// URLs when the server has --image-root); "
                      "the server fetches nothing from the network", param, "unsupported_image_url")


def _check_text(text: str, param: str) -> str:
    if "<img>" in text or "</img>" in text:
        # Image tags name files on the server: only image_url parts may bring images.
        raise bad_request("text may not contain <img> or </img>; send images as image_url parts", param)
    return text


def _message(raw: Any, i: int, limits: RequestLimits) -> Message:
    param = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise bad_request(f"each message must be an object, got {type(raw).__name__}", param)
    role = ROLES.get(raw.get("role"))
    if role is None:
        raise bad_request(f"unsupported role {raw.get('role')!r}; use system, user or assistant", f"{param}.role")
    content = raw.get("content")
    if isinstance(content, str):
        return Message(role, _check_text(content, f"{param}.content"))
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of content parts", f"{param}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(_check_text(part["text"], f"{where}.text"))
        elif kind == "image_url" and role == "user":
            images.append(_image_part(part, where, limits))
        elif kind == "image_url":
            raise bad_request(f"images are only accepted in user messages, not {role}", f"{where}.type")
        else:
            raise bad_request(f"unknown content part type {kind!r}; use text or image_url", f"{where}.type",
                              "invalid_content_part")
    return Message(role, "\n".join(texts), images)


def _conversation(raw: Any, limits: RequestLimits) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list", "messages")
    merged: list[Message] = []
    for i, item in enumerate(raw):
        msg = _message(item, i, limits)
        if msg.role == "system" and any(m.role != "system" for m in merged):
            raise bad_request("system messages must come before the conversation", f"messages[{i}].role")
        if merged and merged[-1].role == msg.role:
            last = merged[-1]
            merged[-1] = Message(msg.role, "\n".join(t for t in (last.text, msg.text) if t), last.images + msg.images)
        else:
            merged.append(msg)
    if merged[-1].role != "user":
        raise bad_request("the last message must be from the user", f"messages[{len(raw) - 1}].role")
    count = sum(len(m.images) for m in merged)
    if count > limits.max_images:
        raise bad_request(f"{count} images in one request; at most {limits.max_images} are accepted", "messages",
                          "too_many_images")
    return merged


def parse_chat_request(payload: dict, limits: RequestLimits = RequestLimits()) -> ChatRequest:
    """Check a decoded request body and return its :class:`ChatRequest`.

    Raises:
        APIError: 400 naming the field at fault; 413 for an image over the size limit.
    """
    _refuse_unsupported(payload)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    max_tokens = _integer(payload, "max_completion_tokens", 1, 2**31)
    if max_tokens is None:
        max_tokens = _integer(payload, "max_tokens", 1, 2**31)
    # Greedy when unset, as `monkeytune chat` and eval decode (OpenAI's own default is 1).
    temperature = _number(payload, "temperature", 0.0, 2.0, 0.0)
    top_p = _number(payload, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:  # only the likeliest token is left: greedy
        temperature, top_p = 0.0, 1.0
    return ChatRequest(
        messages=_conversation(payload.get("messages"), limits),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stops(payload.get("stop")),
        seed=_integer(payload, "seed", -(2**63), 2**64 - 1),
        stream=stream,
        include_usage=bool(options.get("include_usage")) and stream,
    )
