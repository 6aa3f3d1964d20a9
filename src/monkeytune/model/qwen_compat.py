"""Inference-time behaviour of the original Qwen-7B code, on top of transformers' ``Qwen2ForCausalLM``.

Official Monkey / Qwen-VL checkpoints were written for Qwen's own modelling code, which at
inference (``model.eval()``) does two things a plain Qwen2 model does not:

* **dynamic NTK rotary scaling**: when a prompt is processed without a cache, the rotary base
  becomes ``base * alpha ** (dim / (dim - 2))`` with
  ``alpha = max(2 ** ceil(log2(T / seq_length) + 1) - 1, 1)`` for a prompt of ``T`` tokens
  (``alpha`` is 1 up to ``seq_length`` tokens and 3 just above). Decoding steps that follow keep
  the ``alpha`` chosen for the prompt.
* **log-n attention scaling**: the query at 0-based position ``p`` is multiplied by
  ``log(p + 1) / log(seq_length)`` when ``p + 1 > seq_length`` (after the rotary embedding).

Both are off in training mode, as in the official code. The rotary embedding is also applied in
float32 and rounded back, as the official code does, so bf16/fp16 inference matches it more
closely. :func:`apply_compat` installs all of this on a loaded LLM; models loaded from official
folders get it automatically and keep it through monkeytune save/load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.qwen2 import modeling_qwen2 as q2


@dataclass
class CompatConfig:
    """The official flags (same names as in the official ``config.json``)."""

    seq_length: int = 2048
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompatConfig":
        unknown = set(data) - {"seq_length", "use_dynamic_ntk", "use_logn_attn"}
        if unknown:
            raise ValueError(f"unknown qwen_compat keys: {sorted(unknown)}")
        cfg = cls(**data)
        if cfg.seq_length < 2:
            raise ValueError(f"qwen_compat.seq_length must be at least 2, got {cfg.seq_length}")
        return cfg


def ntk_alpha(length: int, seq_length: int) -> float:
    """The official dynamic-NTK factor for a prompt of ``length`` tokens."""
    context_value = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def logn_scale(position_ids: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-position query scale ``[B, 1, T, 1]``: ``log_{seq_length}(p + 1)`` beyond ``seq_length``, else 1.

    Computed in float64, rounded to float32 (the official table's dtype), then to ``dtype``.
    """
    p1 = position_ids.to(torch.float64) + 1
    scale = torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
    return scale.to(torch.float32).to(dtype)[:, None, :, None]


class QwenRotaryEmbedding(nn.Module):
    """Rotary tables with the official dynamic-NTK rule; returns float32 ``(cos, sin)`` ``[B, T, dim]``.

    ``ntk_alpha`` is set by the pre-hook :func:`apply_compat` installs on the decoder; the
    inverse frequencies for each alpha are computed once and cached.
    """

    def __init__(self, dim: int, base: float, compat: CompatConfig):
        super().__init__()
        self.dim, self.base, self.compat = dim, float(base), compat
        self.ntk_alpha = 1.0
        self._inv_freq: dict[tuple[float, str], torch.Tensor] = {}

    def inv_freq(self, alpha: float, device: torch.device) -> torch.Tensor:
        key = (alpha, str(device))
        if key not in self._inv_freq:
            base = self.base * alpha ** (self.dim / (self.dim - 2))
            exponents = torch.arange(0, self.dim, 2, device=device).float() / self.dim
            self._inv_freq[key] = 1.0 / (base**exponents)
        return self._inv_freq[key]

    def rebuild(self, device) -> None:  # nothing persistent to rebuild; tables are made on demand
        self._inv_freq.clear()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq(self.ntk_alpha, x.device)
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in float32 (``t`` ``[B, H, T, D]``, cos/sin ``[B, T, D]``), back to ``t``'s dtype."""
    tf = t.float()
    cos, sin = cos[:, None], sin[:, None]
    half = tf.shape[-1] // 2
    rotated = torch.cat((-tf[..., half:], tf[..., :half]), dim=-1)
    return (tf * cos + rotated * sin).to(t.dtype)


class QwenCompatAttention(q2.Qwen2Attention):
    """``Qwen2Attention`` with float32 rotary and the official log-n query scaling at inference.

    Installed by changing the class of existing attention modules, so their projections
    (possibly wrapped by adapters) and attention backend stay as they are.
    """

    compat: CompatConfig

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        if self.compat.use_logn_attn and not self.training:
            positions = kwargs.get("position_ids")
            if positions is None:
                past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
                positions = torch.arange(past, past + query.shape[2], device=query.device)[None]
            query = query * logn_scale(positions, self.compat.seq_length, query.dtype)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = q2.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, q2.eager_attention_forward)
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _choose_alpha(decoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the decoder: pick the NTK alpha for a fresh prompt, keep it while decoding."""
    rotary = decoder.rotary_emb
    compat = rotary.compat
    if decoder.training or not compat.use_dynamic_ntk:
        rotary.ntk_alpha = 1.0
        return
    past = kwargs.get("past_key_values")
    if past is not None and past.get_seq_length() > 0:
        return
    inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        return
    rotary.ntk_alpha = ntk_alpha(int(inputs.shape[1]), compat.seq_length)


def apply_compat(llm: nn.Module, compat: CompatConfig) -> nn.Module:
    """Install the official inference behaviour on a ``Qwen2ForCausalLM`` (idempotent).

    Args:
        llm: The causal LM (``model.llm``).
        compat: The flags from the official config.

    Returns:
        ``llm``, modified in place.
    """
    decoder = llm.model
    cfg = llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = cfg.rope_parameters["rope_theta"]
    device = decoder.embed_tokens.weight.device
    decoder.rotary_emb = QwenRotaryEmbedding(head_dim, base, compat).to(device)
    for layer in decoder.layers:
        attn = layer.self_attn
        if not isinstance(attn, q2.Qwen2Attention):
            raise TypeError(f"expected Qwen2Attention layers, got {type(attn).__name__}")
        attn.__class__ = QwenCompatAttention
        attn.compat = compat
    old = getattr(decoder, "_monkeytune_ntk_hook", None)
    if old is not None:
        old.remove()
    decoder._monkeytune_ntk_hook = decoder.register_forward_pre_hook(_choose_alpha, with_kwargs=True)
    llm._monkeytune_compat = compat
    return llm


def get_compat(model: nn.Module) -> CompatConfig | None:
    """The compat flags installed on a model (or its ``.llm``), None when plain Qwen2."""
    llm = getattr(model, "llm", model)
    return getattr(llm, "_monkeytune_compat", None)
