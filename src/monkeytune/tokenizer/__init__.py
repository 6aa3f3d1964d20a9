"""Tokenizers: the protocol every tokenizer meets, and the inline ``<img>path</img>`` syntax."""

from monkeytune.tokenizer.base import ImageSpan, Tokenizer, encode_with_images, split_image_tags

__all__ = ["ImageSpan", "Tokenizer", "encode_with_images", "split_image_tags"]
