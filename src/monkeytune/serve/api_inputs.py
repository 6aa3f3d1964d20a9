"""From a checked :class:`~monkeytune.serve.api_request.ChatRequest` to prompt ids and image files.

The prompt is rendered by :func:`monkeytune.generate.prompt_ids`, with the template the model
folder records (as ``monkeytune chat`` and ``serve`` prompt), and the whole conversation goes
through the model's conversation template:

* ``chatml``: system prompt, then every turn; images open their user turn as
  ``Picture k: <img>PATH</img>\\n``, numbered across the conversation (Qwen-VL-Chat's
  convention; one image in the first turn is exactly what ``chat`` renders);
* the ``monkey`` layouts (``vqa``, ``vqa-question-first``, ``caption``, ``raw``): each user turn
  in the template's wording with at most one image, then its answer and ``<|endoftext|>``, as
  training renders a multi-turn record. These have no system prompt: a system message is left
  out (logged once).

Prompt length is checked before any image is decoded: the image paths are only names in the
prompt, so the prompt is rendered against the files' future names first. Images are then
written to a private temporary folder and checked (size, pixels from the header, a full decode)
with :func:`monkeytune.serve.uploads.check_upload`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from monkeytune.generate import prompt_ids
from monkeytune.limits import PromptTooLongError
from monkeytune.prompts import CHAT_TEMPLATES, user_text
from monkeytune.serve.api_errors import APIError, bad_request
from monkeytune.serve.api_request import ChatRequest, ImagePart, Message, RequestLimits
from monkeytune.serve.uploads import UploadError, UploadLimits, check_upload

__all__ = ["ImageStore", "render_prompt"]

logger = logging.getLogger(__name__)
_warned_system = False


def _chatml_turn(message: Message, paths: list[str], first_picture: int) -> str:
    tags = "".join(f"Picture {first_picture + k}: <img>{p}</img>\n" for k, p in enumerate(paths))
    return tags + message.text


def _drop_system(template: str) -> None:
    global _warned_system
    if not _warned_system:
        _warned_system = True
        logger.warning("the %s template has no system prompt: system messages are left out", template)


def render_prompt(request: ChatRequest, template: str, tokenizer: Any, config: Any, max_new_tokens: int,
                  paths: list[str]) -> tuple[list[int], list[str]]:
    """Prompt ids of ``request`` and its image paths in prompt order.

    Args:
        request: The checked request.
        template: A prompt template (:data:`monkeytune.prompts.TEMPLATES`).
        tokenizer: The model's tokenizer.
        config: The model's ``ModelConfig`` (prompt length limit).
        max_new_tokens: Tokens to be generated after the prompt.
        paths: One path per image of the request, in order (see :meth:`ImageStore.plan`).

    Raises:
        APIError: 400 for a prompt too long for the model (``context_length_exceeded``) or more
            than one image in a user turn of a single-image layout.
    """
    messages = list(request.messages)
    system = messages.pop(0).text if messages[0].role == "system" else None
    if system is not None and template not in CHAT_TEMPLATES:
        _drop_system(template)
        system = None
    remaining = iter(paths)
    history: list[tuple[str, str]] = []
    picture = 1
    pending: tuple[str, str | None] = ("", None)
    for i, message in enumerate(messages):
        if message.role == "assistant":
            history.append((pending[0], message.text))
            continue
        own = [next(remaining) for _ in message.images]
        if template == "chatml":
            text, image = _chatml_turn(message, own, picture), None
            picture += len(own)
        elif len(own) > 1:
            raise bad_request(f"the {template} template takes one image per user message, this one has {len(own)}",
                              message.images[1].param, "too_many_images")
        else:
            text, image = message.text, (own[0] if own else None)
        is_last = i == len(messages) - 1
        pending = (text, image) if is_last else (user_text(template, text, image), None)
    try:
        return prompt_ids(template, tokenizer, config.tokens_per_image, pending[0], pending[1], history, system,
                          config=config, max_new_tokens=max_new_tokens)
    except PromptTooLongError as e:
        raise APIError(400, str(e), "context_length_exceeded", "messages") from None


def _pixels(path: Path) -> int | None:
    """``width * height`` from the header (nothing decoded); None when it is not an image PIL opens."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size[0] * image.size[1]
    except Image.DecompressionBombError:
        return 2**62
    except Exception:  # noqa: BLE001 - check_upload says what is wrong with it
        return None


class ImageStore:
    """Request images as files for the model, in a private temporary folder.

    Args:
        limits: Size limits on images.
    """

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.folder = Path(tempfile.mkdtemp(prefix="monkeytune-api-"))

    def plan(self, request: ChatRequest) -> list[str]:
        """The path each image of ``request`` will have (nothing is written yet)."""
        return [str(im.path) if im.path is not None else str(self.folder / f"{uuid.uuid4().hex}.img")
                for im in request.images]

    def write_and_check(self, request: ChatRequest, paths: list[str]) -> None:
        """Write the decoded images to their planned paths and check each one (blocking).

        Raises:
            APIError: 413 for an image over the byte or pixel limit, 400 for one that is not a
                usable image. Files written so far are removed.
        """
        try:
            for part, path in zip(request.images, paths):
                if part.data is not None:
                    Path(path).write_bytes(part.data)
                    part.data = None  # the file holds it now
                self._check(part, Path(path))
        except BaseException:
            self.release(paths)
            raise

    def _check(self, part: ImagePart, path: Path) -> None:
        limits = self.limits
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise APIError(413, f"the image is {size / 2**20:.1f} MiB; the largest accepted is "
                           f"{limits.max_image_bytes / 2**20:.1f} MiB", "image_too_large", part.param)
        pixels = _pixels(path)
        if pixels is not None and pixels > limits.max_image_pixels:
            raise APIError(413, f"the image has {pixels:,} pixels; the most accepted is {limits.max_image_pixels:,} "
                           "(decompression-bomb guard)", "image_too_large", part.param)
        try:
            check_upload(path, UploadLimits(limits.max_image_bytes, limits.max_image_pixels), name="the image")
        except UploadError as e:
            raise bad_request(str(e), part.param, "invalid_image") from None

    def release(self, paths: list[str]) -> None:
        """Remove the files of ``paths`` this store wrote (files under the image root stay)."""
        for path in paths:
            p = Path(path)
            if p.parent == self.folder:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
