"""Conversation data: formats, records, templates, the training dataset, batching, packing, checks."""

from monkeytune.data.check import Report, check_dataset
from monkeytune.data.collate import MODEL_KEYS, Collator, model_inputs, packed_attention_mask
from monkeytune.data.dataset import ConversationDataset
from monkeytune.data.formats import FORMAT_CHOICES, FORMATS, detect_format, parse_record
from monkeytune.data.images import resolve_image
from monkeytune.data.packing import PackedDataset, first_fit_pack, pack_items
from monkeytune.data.reading import load_samples
from monkeytune.data.records import DataError, ImageRef, Sample, Turn
from monkeytune.data.skipping import DEFAULT_MAX_SKIP_FRACTION, SkipBadSamples
from monkeytune.data.templates import (
    IGNORE_INDEX,
    CONVERSATION_TEMPLATES,
    Encoded,
    build_prompt,
    encode_conversation,
    render,
)

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
