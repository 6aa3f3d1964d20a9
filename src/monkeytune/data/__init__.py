"""Conversation data: records, templates, the training dataset, batching, packing and checks."""

from monkeytune.data.check import Report, check_dataset
from monkeytune.data.collate import MODEL_KEYS, Collator, model_inputs, packed_attention_mask
from monkeytune.data.dataset import ConversationDataset
from monkeytune.data.packing import PackedDataset, first_fit_pack, pack_items
from monkeytune.data.records import DataError, Sample, Turn, load_samples
from monkeytune.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    Encoded,
    build_prompt,
    encode_conversation,
)

__all__ = [
    "IGNORE_INDEX",
    "MODEL_KEYS",
    "TEMPLATES",
    "Collator",
    "ConversationDataset",
    "DataError",
    "Encoded",
    "PackedDataset",
    "Report",
    "Sample",
    "Turn",
    "build_prompt",
    "check_dataset",
    "encode_conversation",
    "first_fit_pack",
    "load_samples",
    "model_inputs",
    "pack_items",
    "packed_attention_mask",
]
