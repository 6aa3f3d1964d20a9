"""Conversation data: reading, messages, templates, views, the training dataset, batching and packing, checks."""

from monkeytune.data.check import Report, check_dataset
from monkeytune.data.collate import (
    MODEL_KEYS,
    Collator,
    PackedDataset,
    first_fit_pack,
    model_inputs,
    pack_items,
    packed_attention_mask,
)
from monkeytune.data.dataset import ConversationDataset
from monkeytune.data.errors import DataError
from monkeytune.data.messages import FORMAT_CHOICES, FORMATS, ImageRef, Sample, Turn, parse_record
from monkeytune.data.reading import detect_format, load_samples
from monkeytune.data.skipping import DEFAULT_MAX_SKIP_FRACTION, SkipBadSamples
from monkeytune.data.templates import (
    IGNORE_INDEX,
    CONVERSATION_TEMPLATES,
    Encoded,
    build_prompt,
    encode_conversation,
    render,
)
from monkeytune.data.views import resolve_image

__all__ = [
    "DEFAULT_MAX_SKIP_FRACTION",
    "FORMATS",
    "FORMAT_CHOICES",
    "IGNORE_INDEX",
    "MODEL_KEYS",
    "CONVERSATION_TEMPLATES",
    "Collator",
    "ConversationDataset",
    "DataError",
    "Encoded",
    "ImageRef",
    "PackedDataset",
    "Report",
    "Sample",
    "SkipBadSamples",
    "Turn",
    "build_prompt",
    "check_dataset",
    "detect_format",
    "encode_conversation",
    "first_fit_pack",
    "load_samples",
    "model_inputs",
    "pack_items",
    "packed_attention_mask",
    "parse_record",
    "render",
    "resolve_image",
]
