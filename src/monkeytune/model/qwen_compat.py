"""Inference-time behaviour of the original Qwen-7B code, on top of transformers' ``Qwen2ForCausalLM``.

Official Monkey / Qwen-VL checkpoints were written for Qwen's own modelling code, which at
inference (``model.eval()``) does two things a plain Qwen2 model does not:

* **dynamic NTK rotary scaling**: when a prompt is processed without a cache, the rotary base
  becomes ``base * alpha ** (dim / (dim - 2))`` with
  ``alpha = max(2 ** ceil(log2(T / seq_length) + 1) - 1, 1)`` for a prompt of ``T`` tokens
  (``alpha`` is 1 up to ``seq_length`` tokens and 3 just above). Decoding steps that follow keep
  the ``alpha`` chosen for the prompt. A left-padded batch gets one ``alpha``, from its padded
  length, as in the official code.
* **log-n attention scaling**: the query at cache index ``p`` (0-based, left padding counted, as
  in the official code) is multiplied by ``log(p + 1) / log(seq_length)`` when
  ``p + 1 > seq_length`` (after the rotary embedding).

Both are off in training mode, as in the official code. The rotary embedding is also computed in
float32 and rounded back to the compute dtype, as the official code does.

Everything goes through transformers' public extension points, so no transformers internals are
copied or patched:

* :class:`QwenRotaryEmbedding` replaces the decoder's ``rotary_emb`` module. It sees only the
  position ids, and chooses ``alpha`` from them: a forward whose positions start at 0 is a fresh
  prompt (``alpha`` from its length), any other continues a cached sequence (``alpha`` kept).
  Its cos/sin tables are float32, so the attention modules rotate q and k in float32.
* A function registered with ``transformers.AttentionInterface`` under ``monkeytune_qwen_<base>``
  (and the base implementation's mask builder with ``AttentionMaskInterface``) rounds q, k and v
  to the compute dtype, applies log-n from the query and key lengths it is given, and calls the
  base implementation (``sdpa`` by default, or ``flash_attention_2``).

How the base implementation is dispatched: transformers keys some work on the implementation
*name*, and only the base's own name works there. :func:`apply_compat` therefore first selects
the base with ``set_attn_implementation(base)``, so transformers checks it and loads its kernels
(the flash-attn kernels load only for the exact name ``flash_attention_2``), and then names the
compat function in ``config._attn_implementation``; the name keeps the base as its suffix, so
name-keyed checks (``"flash" in name``: generation, chunked masks, packed-sequence lengths) still
see a flash implementation. The compat function calls the base with a view of the attention
module whose ``config._attn_implementation`` is the base's name (everything else is the module
itself), because the flash function passes that name to its kernel loader. The base function and
mask builder are looked up at call time, so a later registration under the base name is used.
Padding-free packing (varlen ``cu_seq_lens_*`` keyword arguments) reaches the base unchanged.

Under bf16/fp16 the KV cache therefore keeps keys in float32 (and values too in transformers
releases whose cache takes the first key's dtype): they are rounded to the compute dtype when
attention reads them, which is what the official code computes, at the cost of up to 2x the
key/value cache memory during generation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface

#: Prefix of the attention implementations registered here; the base implementation follows it.
ATTENTION_PREFIX = "monkeytune_qwen_"


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


def logn_scale(positions: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Query scale ``log_{seq_length}(p + 1)`` beyond ``seq_length``, else 1, same shape as ``positions``.

    Computed in float64, rounded to float32 (the official table's dtype), then to ``dtype``.
    """
    p1 = positions.to(torch.float64) + 1
    scale = torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))
    return scale.to(torch.float32).to(dtype)


class QwenRotaryEmbedding(nn.Module):
    """Rotary tables with the official dynamic-NTK rule; returns float32 ``(cos, sin)`` ``[B, T, dim]``.

    The NTK ``alpha`` is chosen from the position ids alone: positions that include 0 begin a new
    sequence (``alpha`` from the longest row, ``max(position) + 1``, which is the padded length of
    a left-padded batch); positions past 0 continue the cached one and keep its ``alpha``.

    Attributes:
        alpha: The ``alpha`` of the sequence being decoded.
        pinned_alpha: When set, used for every forward (e.g. to recompute a cached generation
            without a cache, where each full-length forward would otherwise choose anew).
    """

    def __init__(self, dim: int, base: float, compat: CompatConfig):
        super().__init__()
        self.dim, self.base, self.compat = dim, float(base), compat
        self.alpha = 1.0
        self.pinned_alpha: float | None = None
        self._inv_freq: dict[tuple[float, str], torch.Tensor] = {}

    def inv_freq(self, alpha: float, device: torch.device) -> torch.Tensor:
        key = (alpha, str(device))
        if key not in self._inv_freq:
            base = self.base * alpha ** (self.dim / (self.dim - 2))
            exponents = torch.arange(0, self.dim, 2, device=device).float() / self.dim
            self._inv_freq[key] = 1.0 / (base**exponents)
        return self._inv_freq[key]

    def choose_alpha(self, position_ids: torch.Tensor) -> float:
        """The ``alpha`` for a forward over ``position_ids`` ``[B, T]`` (updates :attr:`alpha`)."""
        if self.training or not self.compat.use_dynamic_ntk:
            return 1.0
        if self.pinned_alpha is not None:
            return self.pinned_alpha
        if int(position_ids.min()) == 0:  # a new prompt: decoding steps never revisit position 0
            self.alpha = ntk_alpha(int(position_ids.max()) + 1, self.compat.seq_length)
        return self.alpha

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq(self.choose_alpha(position_ids), x.device)
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        # float32 on purpose: q * cos then runs in float32, as the official rotary does.
        return emb.cos(), emb.sin()


def _compute_dtype(module: nn.Module, value: torch.Tensor) -> torch.dtype:
    """The dtype the attention computes in: autocast's when it is on, else the output projection's."""
    device = value.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    weight = getattr(module.o_proj, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else value.dtype


class _BaseView:
    """``target`` as the base attention implementation sees it: ``target`` itself, but for ``overrides``."""

    def __init__(self, target: Any, **overrides: Any):
        self.__dict__.update(overrides)
        self._target = target

    def __getattr__(self, attr: str) -> Any:  # only reached for names not in ``overrides``
        return getattr(self._target, attr)


def _as_base(module: nn.Module, base: str) -> _BaseView:
    """``module`` whose ``config._attn_implementation`` reads ``base`` (flash loads its kernel by this name)."""
    config = _BaseView(module.config, _attn_implementation=base, _attn_implementation_internal=base)
    return _BaseView(module, config=config)


def _compat_attention(base: str):
    """An attention function for ``AttentionInterface``: official rounding and log-n, then ``base``."""

    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        # q and k come out of the float32 rotary in float32; the official code rounds them back
        # to the compute dtype. Cached keys (and, in some transformers releases, values) were
        # stored at the float32 key's dtype, so all three are rounded.
        dtype = _compute_dtype(module, value)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        settings = module.config.qwen_compat
        if settings["use_logn_attn"] and not module.training:
            # Queries are the last query-length entries of the key sequence (cache included).
            end = key.shape[-2]
            index = torch.arange(end - query.shape[-2], end, device=query.device)
            query = query * logn_scale(index, settings["seq_length"], query.dtype)[:, None]
        inner = AttentionInterface()[base]
        return inner(_as_base(module, base), query, key, value, attention_mask, **kwargs)

    return attention


def _compat_mask(base: str):
    """A mask builder for ``AttentionMaskInterface``: the one registered for ``base``."""

    def mask(*args, **kwargs):
        return AttentionMaskInterface()[base](*args, **kwargs)

    return mask


def _register(base: str) -> str:
    """Register the compat attention over ``base`` (once) and return its name."""
    attention_names = AttentionInterface()
    if base not in attention_names:
        raise ValueError(
            f"attention implementation {base!r} has no registered function to build the Qwen compat layer on; "
            f"use one of {sorted(k for k in attention_names if not k.startswith(ATTENTION_PREFIX))}"
        )
    name = ATTENTION_PREFIX + base
    if name not in attention_names:
        AttentionInterface.register(name, _compat_attention(base))
        AttentionMaskInterface.register(name, _compat_mask(base))
    return name


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
    decoder.rotary_emb = QwenRotaryEmbedding(head_dim, base, compat)
    current = cfg._attn_implementation or "sdpa"
    underlying = current.removeprefix(ATTENTION_PREFIX)
    # "eager" has no entry in the interface (models fall back to their own eager code); sdpa
    # computes the same attention.
    requested = "sdpa" if underlying == "eager" else underlying
    _register(requested)  # refuses an unknown base before the attention is switched
    # transformers checks the base and loads its kernels under the base's own name; it may
    # resolve it to another implementation (e.g. a kernels-hub flash build), which is then wrapped.
    llm.set_attn_implementation(requested)
    name = _register(cfg._attn_implementation or requested)
    cfg.qwen_compat = compat.to_dict()
    # Named on the config, not through set_attn_implementation: transformers would try to load
    # flash kernels under the compat name. The compat function hands the base its own name.
    cfg._attn_implementation = name
    return llm


def get_compat(model: nn.Module) -> CompatConfig | None:
    """The compat flags installed on a model (or its ``.llm``), None when plain Qwen2."""
    llm = getattr(model, "llm", model)
    settings = getattr(getattr(llm, "config", None), "qwen_compat", None)
    return CompatConfig.from_dict(settings) if settings else None
