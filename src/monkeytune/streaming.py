"""Streaming generated text as it comes, decoded with a monkeytune tokenizer."""

from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

import torch


class TokenStreamer:
    """Writes generated text as it comes (a transformers streamer over a monkeytune tokenizer).

    The first ``put`` (the prompt) is skipped. Text is decoded from all tokens so far and only
    the new suffix is written, holding back a trailing incomplete UTF-8 character.

    Args:
        tokenizer: Decodes ids (special tokens skipped).
        out: Stream to write to, or a callable taking each new piece of text.
    """

    def __init__(self, tokenizer: Any, out: TextIO | Callable[[str], Any] = sys.stdout):
        self.tokenizer = tokenizer
        self.out = out
        self.tokens: list[int] = []
        self.written = 0
        self._prompt_seen = False

    def _emit(self, text: str) -> None:
        if not text:
            return
        if callable(self.out) and not hasattr(self.out, "write"):
            self.out(text)
        else:
            self.out.write(text)
            self.out.flush()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TokenStreamer streams a single sequence")
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        self._emit(text[self.written :])
        self.written = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens)
        self._emit(text[self.written :])
        self.written = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens)
