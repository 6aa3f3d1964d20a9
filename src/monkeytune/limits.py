"""Per-request limits of inference: how long a prompt may be and how long an answer may take.

A prompt may use at most ``max_position_embeddings - max_new_tokens`` positions (images and the
template included); longer ones are refused before any model work. The raw text is checked
first, without tokenizing: no token covers more characters than the longest token of the
vocabulary, so a text longer than ``budget x longest`` characters cannot fit, and a
multi-megabyte question is refused in microseconds instead of being tokenized and embedded.
Memory per request is then bounded by the model's own maximum sequence, plus the upload limits
on images.

A time limit ends a generation at the next token once it has run too long (a
``StoppingCriteria``), and :class:`GenerationTimeout` reports it with the text so far. The
limits apply in ``serve``, ``chat``, ``score`` and ``eval`` alike.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Sequence

import torch
from transformers import StoppingCriteria

__all__ = ["Deadline", "GenerationTimeout", "PromptTooLongError", "check_prompt_length", "check_raw_length",
           "longest_token_chars", "prompt_budget"]

_LONGEST: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


class PromptTooLongError(ValueError):
    """A prompt the model cannot take; the message gives the length and the limit."""


class GenerationTimeout(TimeoutError):
    """A generation stopped by the time limit.

    Attributes:
        partial: The answer ids generated before it stopped, one list per prompt.
    """

    def __init__(self, message: str, partial: list[list[int]] | None = None):
        super().__init__(message)
        self.partial = partial or []


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest token of ``tokenizer``'s vocabulary (computed once per tokenizer)."""
    try:
        return _LONGEST[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = 1
    for i in range(int(tokenizer.vocab_size)):
        try:
            longest = max(longest, len(tokenizer.decode([i], skip_special=False)))
        except Exception:  # noqa: BLE001 - ids without a token (gaps in the vocabulary) cover nothing
            continue
    try:
        _LONGEST[tokenizer] = longest
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return longest


def prompt_budget(config: Any, max_new_tokens: int = 0) -> int:
    """Prompt tokens the model can take when ``max_new_tokens`` are to follow.

    Raises:
        PromptTooLongError: ``max_new_tokens`` alone fills the model's positions.
    """
    positions = int(config.llm.max_position_embeddings)
    budget = positions - int(max_new_tokens)
    if budget < 1:
        raise PromptTooLongError(
            f"max new tokens ({max_new_tokens:,}) leaves no room for a prompt: the model takes {positions:,} "
            "positions in all; lower max new tokens"
        )
    return budget


def _limit_text(config: Any, budget: int, max_new_tokens: int) -> str:
    positions = int(config.llm.max_position_embeddings)
    if max_new_tokens:
        return f"{budget:,} tokens ({positions:,} positions minus {max_new_tokens:,} new tokens)"
    return f"{budget:,} tokens"


def check_raw_length(texts: Sequence[str], tokenizer: Any, config: Any, max_new_tokens: int = 0,
                     what: str = "the prompt") -> None:
    """Refuse text that cannot fit, from its length alone (nothing is tokenized).

    Raises:
        PromptTooLongError: naming the length in characters and the model's limit.
    """
    budget = prompt_budget(config, max_new_tokens)
    chars = sum(len(t) for t in texts if t)
    most = budget * longest_token_chars(tokenizer)
    if chars > most:
        raise PromptTooLongError(
            f"{what} is {chars:,} characters long, more than this model can take: at most "
            f"{_limit_text(config, budget, max_new_tokens)}, i.e. {most:,} characters at the very most; shorten it"
        )


def check_prompt_length(num_tokens: int, config: Any, max_new_tokens: int = 0, what: str = "the prompt") -> None:
    """Refuse a tokenized prompt longer than the model can take.

    Raises:
        PromptTooLongError: naming the token count and the limit.
    """
    budget = prompt_budget(config, max_new_tokens)
    if num_tokens > budget:
        raise PromptTooLongError(
            f"{what} is {num_tokens:,} tokens (images and template included), more than this model can take: "
            f"at most {_limit_text(config, budget, max_new_tokens)}; shorten it"
            + (" or lower max new tokens" if max_new_tokens else "")
        )


class Deadline(StoppingCriteria):
    """Ends generation at the next token once ``seconds`` have passed since it was made.

    Attributes:
        seconds: The limit.
        expired: Whether it stopped a generation.
    """

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds
        self.expired = False

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if time.monotonic() > self.end:
            self.expired = True
        return torch.full((input_ids.shape[0],), self.expired, dtype=torch.bool, device=input_ids.device)
