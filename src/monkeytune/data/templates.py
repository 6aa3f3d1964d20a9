"""Conversation templates: how turns become token ids and which ids are supervised.

Three templates, used identically for training (:func:`encode_conversation`) and for inference
(:func:`build_prompt`) so a fine-tuned model is always prompted the way it was trained:

``monkey`` (the official Monkey fine-tuning format)
    Every exchange is the user text immediately followed by the answer and ``<|endoftext|>``,
    with no separator and no role names: ``user1 answer1 <eos> user2 answer2 <eos>``. The user
    text carries its own prompt wording (e.g. ``"<img>a.jpg</img> What is it? Answer: "``).
    The answer and its ``<eos>`` are supervised. User text and answer are tokenized separately,
    as the official code does, so the label boundary never falls inside a token. The official
    multi-turn script repeats this pattern for every exchange, as here (its single-turn script
    reads only the first exchange). There is no system prompt; a ``system`` turn is refused.

``chatml`` (Qwen-VL-Chat)
    ``<|im_start|>system\\n{system}<|im_end|>\\n`` then, per turn,
    ``<|im_start|>{role}\\n{text}<|im_end|>\\n``. The default system prompt is
    ``"You are a helpful assistant."``. The assistant text and its ``<|im_end|>`` are supervised;
    the role header and the newline after ``<|im_end|>`` are not (generation stops at
    ``<|im_end|>``, so nothing after it needs learning). Role names, the newline and the text
    are tokenized separately, matching Qwen's own training and inference code.

``tokenizer`` (a composed model's LLM)
    The tokenizer's own Jinja chat template, with the assistant messages and the end-of-turn
    token after each supervised (see :mod:`monkeytune.data.chat_template`).

In all, every image of a turn (an :class:`~monkeytune.data.messages.ImageRef` in its parts, in
place of its placeholder) expands to ``<img>``, ``tokens_per_image`` x ``<imgpad>``, ``</img>``
and every image token has label ``IGNORE_INDEX``. :func:`render` is one pure function of the
parsed turns: the dataset, ``data check`` and inference all call it. The fit of a rendered
sample to ``max_length`` (:func:`size_problem`, :func:`fit_to_length`) and the compact form a
dataset renders (:class:`Compact`) are here too: rendering is this module's alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from monkeytune.data.chat_template import render_chat_template
from monkeytune.data.errors import TOO_LONG, DataError
from monkeytune.data.messages import (
    ASSISTANT,
    ROLE_ALIASES,
    SYSTEM,
    USER,
    ImageRef,
    Part,
    turn_order_problem,
    Sample,
    Turn,
)
from monkeytune.model.loss import IGNORE_INDEX  # the label the loss skips, defined beside it
from monkeytune.tokenizer.base import DEFAULT_SYSTEM, IM_END, IM_START, Tokenizer, image_block  # noqa: F401 - re-exported

CONVERSATION_TEMPLATES = ("monkey", "chatml", "tokenizer")


@dataclass
class Encoded:
    """A tokenized conversation.

    Attributes:
        input_ids: Token ids, length ``L``.
        labels: Same length; ``IGNORE_INDEX`` where nothing is learned, else the id itself
            (aligned with ``input_ids``: the model shifts them).
        images: The images in order of appearance, one per ``<img>`` block.
        exchange_ends: ``exchange_ends[k]`` is the length of the prefix holding exchanges
            ``0..k`` (an exchange is a user turn plus its answer), so cutting there drops whole
            trailing exchanges and never an image span.
        exchange_images: Number of images in each exchange.
    """

    input_ids: list[int]
    labels: list[int]
    images: list[ImageRef]
    exchange_ends: list[int] = field(default_factory=list)
    exchange_images: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def image_paths(self) -> list[str]:
        return [ref.source for ref in self.images]

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def keep_exchanges(self, n: int) -> "Encoded":
        """The conversation cut after its first ``n`` exchanges (``n >= 1``)."""
        end = self.exchange_ends[n - 1]
        n_img = sum(self.exchange_images[:n])
        return Encoded(
            self.input_ids[:end],
            self.labels[:end],
            self.images[:n_img],
            self.exchange_ends[:n],
            self.exchange_images[:n],
        )


def normalize_messages(messages: Iterable[Any]) -> tuple[str | None, list[Turn]]:
    """Accept :class:`Turn` objects or dicts (``role``/``content`` or ``from``/``value``).

    Dict text is Monkey's inline syntax: ``<img>path</img>`` tags become images (paths kept as
    written).

    Returns:
        ``(system, turns)`` where ``system`` comes from an optional first system message.

    Raises:
        ValueError: unknown roles or turns that do not alternate user/assistant from user.
    """
    system: str | None = None
    turns: list[Turn] = []
    for i, m in enumerate(messages):
        if isinstance(m, Turn):
            role, text = m.role, m
        elif isinstance(m, dict):
            role = m.get("role", m.get("from"))
            text = m.get("content", m.get("value"))
        else:
            raise ValueError(f"message {i}: expected a dict or Turn, got {type(m).__name__}")
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise ValueError(f"message {i}: unknown role {role!r}")
        if not isinstance(text, (str, Turn)):
            raise ValueError(f"message {i}: content must be a string")
        role = ROLE_ALIASES[role.lower()]
        turn = text if isinstance(text, Turn) else Turn.from_text(role, text, field=f"message {i}")
        problem = turn_order_problem(role, i, len(turns))
        if problem:
            raise ValueError(f"message {i}: {problem}, got {role!r}")
        if role == SYSTEM:
            system = turn.text
            continue
        turns.append(turn)
    return system, turns


class TokenBuilder:
    """Accumulates ids and labels, expanding images."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_image: int):
        self.tok = tokenizer
        self.tpi = tokens_per_image
        self.out = Encoded([], [], [])
        self._images_in_exchange = 0

    def ids(self, ids: Sequence[int], supervised: bool) -> None:
        self.out.input_ids.extend(ids)
        self.out.labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

    def parts(self, parts: Sequence[Part], supervised: bool) -> None:
        for part in parts:
            if isinstance(part, str):
                if part:
                    self.ids(self.tok.encode(part), supervised)
                continue
            self.ids(image_block(self.tok, self.tpi), supervised=False)
            self.out.images.append(part)
            self._images_in_exchange += 1

    def end_exchange(self) -> None:
        self.out.exchange_ends.append(len(self.out.input_ids))
        self.out.exchange_images.append(self._images_in_exchange)
        self._images_in_exchange = 0


def _special(tokenizer: Tokenizer, token: str) -> int:
    try:
        return tokenizer.special_id(token)
    except KeyError:
        raise ValueError(f"the chatml template needs the special token {token} in the tokenizer") from None


def render(
    template: str,
    system: str | None,
    turns: Sequence[Turn],
    tokenizer: Tokenizer,
    tokens_per_image: int,
    add_generation_prompt: bool = False,
) -> Encoded:
    """Token ids and labels of parsed turns: the one rendering of training and inference.

    A pure function of its arguments; it never opens an image.

    Args:
        template: ``monkey`` or ``chatml``.
        system: System prompt (``chatml`` only; ``None`` for the default).
        turns: Parsed turns (images already in place as :class:`ImageRef` parts).
        tokenizer: Any tokenizer.
        tokens_per_image: Placeholders per image.
        add_generation_prompt: End with the assistant header (``chatml``).

    Returns:
        :class:`Encoded`: ``input_ids`` and ``labels`` ``[L]``, images and exchange boundaries.
    """
    if template not in CONVERSATION_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {CONVERSATION_TEMPLATES}")
    b = TokenBuilder(tokenizer, tokens_per_image)
    if template == "tokenizer":
        return render_chat_template(b, system, turns, add_generation_prompt)
    if template == "monkey":
        if system is not None:
            raise ValueError("the monkey template has no system prompt; remove the system turn")
        for t in turns:
            if t.role == USER:
                b.parts(t.parts, supervised=False)
            else:
                b.parts(t.parts, supervised=True)
                b.ids([tokenizer.eos_id], supervised=True)
                b.end_exchange()
        # The generation prompt is empty: the answer follows the user text directly.
        return b.out

    im_start, im_end = _special(tokenizer, IM_START), _special(tokenizer, IM_END)
    nl = tokenizer.encode("\n")

    def header(role: str) -> None:
        b.ids([im_start], False)
        b.ids(tokenizer.encode(role), False)
        b.ids(nl, False)

    header("system")
    b.parts([DEFAULT_SYSTEM if system is None else system], supervised=False)
    b.ids([im_end], False)
    b.ids(nl, False)
    for t in turns:
        header(t.role)
        b.parts(t.parts, supervised=t.role == ASSISTANT)
        b.ids([im_end], supervised=t.role == ASSISTANT)
        b.ids(nl, False)
        if t.role == ASSISTANT:
            b.end_exchange()
    if add_generation_prompt:
        header("assistant")
    return b.out


def encode_conversation(
    template: str,
    turns: list[Turn],
    tokenizer: Tokenizer,
    tokens_per_image: int,
    system: str | None = None,
) -> Encoded:
    """Tokenize a training conversation and build its labels.

    Args:
        template: ``monkey`` or ``chatml``.
        turns: Alternating user/assistant turns, first user, last assistant.
        tokenizer: Any :class:`~monkeytune.tokenizer.base.Tokenizer`.
        tokens_per_image: Placeholders per image (``ModelConfig.tokens_per_image``).
        system: System prompt for ``chatml`` (default prompt when ``None``).

    Returns:
        :class:`Encoded` with ids, labels, image paths and exchange boundaries.

    Raises:
        ValueError: unknown template, a system prompt with ``monkey``, or a tokenizer lacking
            the template's special tokens.
    """
    return render(template, system, turns, tokenizer, tokens_per_image, add_generation_prompt=False)


def build_prompt(
    template: str,
    messages: Iterable[Any],
    tokenizer: Tokenizer,
    tokens_per_image: int,
    add_generation_prompt: bool = True,
) -> tuple[list[int], list[str]]:
    """Token ids of a prompt for inference, exactly as training renders the same turns.

    Args:
        template: ``monkey`` or ``chatml``.
        messages: Dicts with ``role``/``content`` (or ``from``/``value``) or :class:`Turn`s; an
            optional first ``system`` message (``chatml`` only); usually ending with a user turn.
        tokenizer: Any tokenizer.
        tokens_per_image: Placeholders per image.
        add_generation_prompt: Append ``<|im_start|>assistant\\n`` (``chatml``). The ``monkey``
            template has no generation prompt, so this changes nothing there.

    Returns:
        ``(ids, image_paths)``: the prompt ids and the images in order of appearance.
    """
    system, turns = normalize_messages(messages)
    enc = render(template, system, turns, tokenizer, tokens_per_image, add_generation_prompt)
    return enc.input_ids, enc.image_paths


# -- the fit to max_length, and the compact form the dataset keeps -----------------------------

# No tokenizer in use puts more than this many characters into one token of real text, so a
# text longer than max_length x this cannot fit and is refused before it is tokenized (a 10 MB
# field would otherwise cost a minute and gigabytes). Qwen's longest tokens are runs of
# whitespace well under 64 characters.
MAX_CHARS_PER_TOKEN = 64


@dataclass
class Prepared:
    """A rendered sample before its images are decoded.

    Attributes:
        encoded: Ids, labels and images after the fit to ``max_length``.
        truncated_exchanges: Trailing exchanges dropped by ``truncate_turns``.
    """

    encoded: Encoded
    truncated_exchanges: int


def fit_to_length(
    enc: Encoded, max_length: int, truncate_turns: bool, extra_per_image: int = 0
) -> tuple[Encoded, int] | str:
    """Return ``(encoded, dropped_exchanges)`` fitting ``max_length``, or the reason it cannot.

    Only whole trailing exchanges without images are dropped, and at least one always remains.
    ``extra_per_image`` counts tokens each image block will gain when ``enc`` was rendered with
    fewer placeholders per image than the model takes (the compact cache renders one).
    """
    cum = [0]
    for n_img in enc.exchange_images:
        cum.append(cum[-1] + n_img)

    def end(k: int) -> int:  # true length of exchanges 0..k-1
        return enc.exchange_ends[k - 1] + extra_per_image * cum[k]

    total = len(enc) + extra_per_image * len(enc.images)
    if total <= max_length:
        return enc, 0
    n = len(enc.exchange_ends)
    if truncate_turns:
        keep = n
        while keep > 1 and enc.exchange_images[keep - 1] == 0:
            keep -= 1
            if end(keep) <= max_length:
                return enc.keep_exchanges(keep), n - keep
        return (
            f"{total} tokens > max_length {max_length}, and dropping trailing text-only "
            f"exchanges cannot make it fit (first exchange alone: {end(1)} tokens)"
        )
    return f"{total} tokens > max_length {max_length} (samples are never cut; see truncate_turns)"


def size_problem(sample: Sample, max_length: int) -> DataError | None:
    """A ``too_long`` error when the text alone cannot fit ``max_length`` tokens, checked
    from character counts before any tokenization (see :data:`MAX_CHARS_PER_TOKEN`)."""
    limit = max_length * MAX_CHARS_PER_TOKEN
    sizes = [(len(p), t.field) for t in sample.turns for p in t.parts if isinstance(p, str)]
    total = sum(n for n, _ in sizes) + len(sample.system or "")
    if total <= limit:
        return None
    n, fld = max(sizes, default=(0, ""))
    return sample.error(
        TOO_LONG,
        f"{total} characters of text cannot fit in max_length {max_length} tokens "
        f"(at most {MAX_CHARS_PER_TOKEN} characters per token; the longest field has {n}); "
        "refused before tokenizing",
        fld,
    )


class Compact:
    """A sample rendered with one placeholder per image, small while it lives: ids as int32,
    labels as one supervised bit per token. :meth:`expand` gives the model-ready form."""

    __slots__ = ("ids", "supervised", "n_images", "dropped")

    def __init__(self, enc: Encoded, dropped: int):
        self.ids = np.asarray(enc.input_ids, dtype=np.int32)
        self.supervised = np.asarray(enc.labels, dtype=np.int64) != IGNORE_INDEX
        self.n_images = len(enc.images)
        self.dropped = dropped

    def expand(self, pad_id: int, tokens_per_image: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids [L], labels [L])`` int64 with every image block at full size."""
        repeats = np.where(self.ids == pad_id, tokens_per_image, 1)
        ids = np.repeat(self.ids.astype(np.int64), repeats)
        labels = np.where(np.repeat(self.supervised, repeats), ids, IGNORE_INDEX)
        return ids, labels
