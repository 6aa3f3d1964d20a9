"""The tokenizer protocol and the ``<img>path</img>`` inline syntax shared by data, chat and eval.

Any tokenizer (the Qwen tiktoken one for official checkpoints, the small one the demo trains)
meets :class:`Tokenizer`. Text between ``<img>`` and ``</img>`` names an image file; it never
reaches the tokenizer as text. Instead the image becomes ``image_start_id``, ``tokens_per_image``
copies of ``image_pad_id`` and ``image_end_id``, and the model later writes visual features over
the pad positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

IMAGE_TAG = re.compile(r"<img>(.*?)</img>", re.DOTALL)

# ChatML's markers and Qwen's default system prompt: one definition for the tokenizers that add
# them and the conversation templates that write them.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."


@runtime_checkable
class Tokenizer(Protocol):
    """What monkeytune needs from a tokenizer.

    ``encode`` treats its input as plain text: special-token strings inside user text are
    encoded as ordinary characters, never as control tokens (a caption that mentions
    ``<|endoftext|>`` must not end the sample). Control tokens are inserted by id.
    """

    eos_id: int
    pad_id: int
    image_start_id: int
    image_end_id: int
    image_pad_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def special_id(self, token: str) -> int:
        """Id of a named special token such as ``<|im_start|>``; ``KeyError`` if absent."""


def checked_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """``ids`` as ints (0-d tensors and the like accepted), every tokenizer's ``decode`` input.

    Raises:
        ValueError: for an id outside ``0 .. vocab_size-1`` (decoders would drop or garble it).
    """
    clean = [int(i) for i in ids]
    for i in clean:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{vocab_size - 1})")
    return clean


def special_token_id(specials: dict[str, int], token: str) -> int:
    """``specials[token]``, or ``KeyError`` naming the token (every tokenizer's ``special_id``)."""
    try:
        return specials[token]
    except KeyError:
        raise KeyError(f"{token!r} is not a special token of this tokenizer") from None


@dataclass(frozen=True)
class ImageSpan:
    """One ``<img>...</img>`` occurrence: the path as written and its character span."""

    path: str
    start: int
    end: int


def split_image_tags(text: str) -> tuple[list[str], list[ImageSpan]]:
    """Split ``text`` into the text pieces around image tags and the tags themselves.

    Returns:
        ``(pieces, images)`` with ``len(pieces) == len(images) + 1``.

    Raises:
        ValueError: when ``<img>`` / ``</img>`` do not balance (an unclosed or stray tag).
    """
    pieces: list[str] = []
    images: list[ImageSpan] = []
    pos = 0
    for m in IMAGE_TAG.finditer(text):
        pieces.append(text[pos : m.start()])
        path = m.group(1).strip()
        if not path or "<img>" in path:
            raise ValueError(f"malformed image tag at character {m.start()}: {m.group(0)[:80]!r}")
        images.append(ImageSpan(path, m.start(), m.end()))
        pos = m.end()
    pieces.append(text[pos:])
    for piece in pieces:
        if "<img>" in piece or "</img>" in piece:
            raise ValueError("unbalanced <img>/</img> tags in text: " + repr(text[:120]))
    return pieces, images


def encode_with_images(
    tokenizer: Tokenizer, text: str, tokens_per_image: int
) -> tuple[list[int], list[str]]:
    """Encode text that may contain ``<img>path</img>`` tags.

    Args:
        tokenizer: Any :class:`Tokenizer`.
        text: Prompt or conversation turn.
        tokens_per_image: Placeholders per image (views x queries of the model).

    Returns:
        ``(ids, paths)``: token ids with each image expanded to start, pads and end, and the
        image paths in order of appearance.
    """
    pieces, images = split_image_tags(text)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids.extend(tokenizer.encode(piece))
        if i < len(images):
            ids.extend(image_block(tokenizer, tokens_per_image))
    return ids, [im.path for im in images]


def image_block(tokenizer: Tokenizer, tokens_per_image: int) -> list[int]:
    """An image's ids in a prompt: start, ``tokens_per_image`` pads (the visual tokens' places), end."""
    return [tokenizer.image_start_id, *[tokenizer.image_pad_id] * tokens_per_image, tokenizer.image_end_id]
