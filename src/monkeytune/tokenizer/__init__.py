"""Tokenizers: the protocol every tokenizer meets, the inline ``<img>path</img>`` syntax,
Qwen's tiktoken tokenizer (official checkpoints), a small trainable one (the embedded demo) and
any transformers tokenizer (:class:`PretrainedTokenizer`, for models built from a transformers LLM)."""

from typing import Any

from monkeytune.tokenizer.base import ImageSpan, Tokenizer, encode_with_images, split_image_tags
from monkeytune.tokenizer.loading import load_tokenizer
from monkeytune.tokenizer.qwen import QwenTokenizer
from monkeytune.tokenizer.simple import SimpleTokenizer

__all__ = [
    "ImageSpan",
    "PretrainedTokenizer",
    "QwenTokenizer",
    "SimpleTokenizer",
    "Tokenizer",
    "encode_with_images",
    "load_tokenizer",
    "split_image_tags",
]


def __getattr__(name: str) -> Any:
    # PretrainedTokenizer imports transformers (seconds); load it only when asked for.
    if name == "PretrainedTokenizer":
        from monkeytune.tokenizer.pretrained import PretrainedTokenizer

        return PretrainedTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
