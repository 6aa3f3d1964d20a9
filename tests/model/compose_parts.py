"""Tiny random transformers parts saved as folders, for composing (nothing comes from a hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
)

TEXTS = ["hello world what is this image a cat a dog the digit is seven"] * 8
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
                  "{% if add_generation_prompt %}[assistant] {% endif %}")


def _bpe(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def vision_kwargs(image_size: int = 28) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=image_size, patch_size=14)


def save_clip(directory: Path, seed: int = 0) -> Path:
    """A CLIP vision encoder folder (``clip_vision_model``)."""
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**vision_kwargs())).save_pretrained(directory)
    return directory


def save_dinov2(directory: Path, seed: int = 0) -> Path:
    """A DINOv2 encoder folder (class token first, an MLP width given as a ratio)."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in vision_kwargs().items() if k != "intermediate_size"}
    Dinov2Model(Dinov2Config(mlp_ratio=2, **kwargs)).save_pretrained(directory)
    return directory


def save_siglip_pair(directory: Path, seed: int = 0) -> Path:
    """A SigLIP text+vision pair folder (``siglip``), as the published checkpoints ship."""
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision_kwargs())).save_pretrained(directory)
    return directory


def save_qwen2(directory: Path, seed: int = 0) -> Path:
    """A Qwen2 causal LM with a ChatML byte-level BPE tokenizer (eos ``<|im_end|>``)."""
    torch.manual_seed(seed)
    fast = PreTrainedTokenizerFast(tokenizer_object=_bpe(CHATML), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024))
    llm.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def save_llama(directory: Path, seed: int = 0) -> Path:
    """A Llama causal LM with a tokenizer of its own chat template and no ChatML tokens."""
    torch.manual_seed(seed)
    fast = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<s>", "</s>", "<unk>"]), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=LLAMA_TEMPLATE)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                       tie_word_embeddings=True))
    llm.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
