"""Tokenizers: the protocol every tokenizer meets, the inline ``<img>path</img>`` syntax,
Qwen's tiktoken tokenizer (official checkpoints) and a small trainable one (the embedded demo)."""

from monkeytune.tokenizer.base import ImageSpan, Tokenizer, encode_with_images, split_image_tags
from monkeytune.tokenizer.loading import load_tokenizer
from monkeytune.tokenizer.qwen import QwenTokenizer
from monkeytune.tokenizer.simple import SimpleTokenizer

__all__ = [
    "ImageSpan",
    "QwenTokenizer",
    "SimpleTokenizer",
    "Tokenizer",
    "encode_with_images",
    "load_tokenizer",
    "split_image_tags",
]
