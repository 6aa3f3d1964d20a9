"""A transformers vision encoder as the shared tower, with per-window adapters on its linear layers.

A composed model (see :mod:`monkeytune.model.compose`) replaces the Qwen-VL ViT with any encoder
that ``AutoModel.from_config`` builds (CLIP, SigLIP, DINOv2 ...). Monkey's recipe needs two things
from it, both obtained through public module APIs only:

* **per-window adapters.** Each targeted ``nn.Linear`` is replaced by an :class:`AdaptedLinear`
  holding the original layer (``linear``) and a
  :class:`~monkeytune.vision.multi_lora.MultiLoRA` with one adapter per window slot. The encoder's
  own forward runs unchanged; the slots of the current batch reach the adapters through a small
  shared :class:`_Slots` holder that the tower fills before each pass.
* **one batched pass over all views**, exactly as the Monkey tower: every view of every image goes
  through the encoder at once, each view's adapters chosen by its slot.

Zero-initialised adapters (``lora_b = 0``) leave the encoder's output unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from monkeytune.config import VisionConfig
from monkeytune.vision.multi_lora import MultiLoRA, SlotIndex, WindowLayout

# Adapter targets tried when none are given: the attention and MLP projections of CLIP, SigLIP
# and DINOv2 (and most ViTs in transformers). Those that match nothing are dropped.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "fc1", "fc2")
_MLP_HINTS = ("fc1", "fc2", "mlp", "fc_", "dense_")


class AdapterTargetError(ValueError):
    """An adapter target pattern that names no linear layer of the encoder."""


class _Slots:
    """The slot index of the views in flight, shared by every adapted layer of one tower.

    Set before each encoder pass (None: views without adapters); it stays set until the next
    one, so that activation checkpointing, which reruns layers during backward, sees the same slots.
    """

    index: SlotIndex | None = None


class AdaptedLinear(nn.Module):
    """``linear(x) + lora(x, slots)``: an encoder's linear layer with per-window adapters.

    The original layer keeps its own name (``linear``, not peft's ``base_layer``, which names
    are stripped of: these adapters are part of the model, not a wrapper added for training).

    Args:
        linear: The encoder's original layer.
        adapter: K adapters shaped like it.
        slots: The tower's shared slot holder.
    """

    def __init__(self, linear: nn.Linear, adapter: MultiLoRA, slots: _Slots):
        super().__init__()
        self.linear = linear
        self.lora = adapter
        self._slots = slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[N, L, in]``, one row per view. Returns ``[N, L, out]``."""
        index = self._slots.index
        return self.linear(x) if index is None else self.linear(x) + self.lora(x, index)


def layer_stack(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the encoder's transformer layers: its longest ``nn.ModuleList``."""
    return max(((n, m) for n, m in encoder.named_modules() if isinstance(m, nn.ModuleList)), key=lambda nm: len(nm[1]))


def match_targets(encoder: nn.Module, targets: list[str] | tuple[str, ...], strict: bool = True) -> dict[str, list[str]]:
    """The ``nn.Linear`` paths in the encoder's layers that each target pattern matches (as a path
    suffix). Layers outside the stack (SigLIP's pooling head, whose attention reads its
    projection's weight directly) keep no adapters: the features are taken before them.

    Args:
        encoder: The transformers vision model.
        targets: Module-name suffixes such as ``q_proj`` or ``mlp.fc1``.
        strict: Raise :class:`AdapterTargetError` for a pattern that matches nothing.

    Returns:
        ``{pattern: [module path, ...]}`` for the patterns that match.
    """
    stack = layer_stack(encoder)[0] + "."
    linears = [name for name, m in encoder.named_modules() if isinstance(m, nn.Linear) and name.startswith(stack)]
    found = {t: [n for n in linears if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, names in found.items() if not names]
    if strict and missing:
        sample = ", ".join(linears[:8]) or "none"
        raise AdapterTargetError(f"vision.encoder.adapter_targets {missing} match no linear layer of the encoder "
                                 f"(its linear layers include: {sample})")
    return {t: names for t, names in found.items() if names}


def default_targets(encoder: nn.Module) -> list[str]:
    """Those of :data:`DEFAULT_TARGETS` that the encoder has; :class:`AdapterTargetError` if none."""
    found = list(match_targets(encoder, DEFAULT_TARGETS, strict=False))
    if not found:
        raise AdapterTargetError(f"none of the default adapter targets {list(DEFAULT_TARGETS)} is a linear layer of "
                                 "this encoder; name its layers in vision.encoder.adapter_targets")
    return found


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing of a model's layers (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the current name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_encoder(cfg: VisionConfig) -> nn.Module:
    """The bare transformers vision model that ``cfg.encoder.hf_config`` describes (random weights)."""
    from transformers import AutoConfig  # noqa: PLC0415 - transformers loads with the model
    from transformers.models.auto.modeling_auto import MODEL_MAPPING  # noqa: PLC0415

    # SDPA: the same attention kernel the Monkey tower uses, and available for every encoder here.
    hf_config = AutoConfig.for_model(**cfg.encoder.hf_config, attn_implementation="sdpa")
    # The class itself, not AutoModel.from_config: under DeepSpeed ZeRO-3 that partitions the
    # weights as it builds them, which a model built on the meta device to be filled from its
    # folder cannot take. The engine shards the whole model later, as it does a Monkey model.
    return MODEL_MAPPING[type(hf_config)](hf_config)


class EncoderTower(nn.Module):
    """Patch features of every view from a transformers vision encoder with per-window adapters.

    Args:
        cfg: The vision configuration; ``cfg.encoder`` describes the encoder, ``cfg.lora_slots``
            and the ranks the adapters.
        encoder: An already built (e.g. pretrained) encoder to adapt instead of a fresh one.

    Attributes:
        encoder: The transformers model; targeted layers are :class:`AdaptedLinear`.
    """

    def __init__(self, cfg: VisionConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else build_encoder(cfg)
        self._slots = _Slots()
        if cfg.lora_slots:
            self._add_adapters(cfg.encoder.adapter_targets or default_targets(self.encoder))

    def _add_adapters(self, targets: list[str]) -> None:
        cfg = self.cfg
        for pattern, paths in match_targets(self.encoder, targets).items():
            for path in paths:
                parent_path, _, attr = path.rpartition(".")
                parent = self.encoder.get_submodule(parent_path)
                base = getattr(parent, attr)
                if isinstance(base, AdaptedLinear):
                    continue  # matched by two patterns
                mlp = any(h in path.rsplit(".", 1)[-1] or h in parent_path.rsplit(".", 1)[-1] for h in _MLP_HINTS)
                rank = cfg.lora_rank_mlp if mlp else cfg.lora_rank_attn
                adapter = MultiLoRA(cfg.lora_slots, base.in_features, base.out_features, rank, cfg.lora_dropout)
                adapter.to(device=base.weight.device, dtype=base.weight.dtype)
                setattr(parent, attr, AdaptedLinear(base, adapter, self._slots))

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's transformer layers (what FSDP2 shards one by one)."""
        return layer_stack(self.encoder)[1]

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the encoder's layers are recomputed in backward (``train.gradient_checkpointing: [vit]``)."""
        return bool(getattr(self.encoder, "is_activation_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        if on:
            enable_checkpointing(self.encoder)

    def forward(self, pixel_values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Encode views.

        Args:
            pixel_values: ``[N, 3, S, S]`` normalised views.
            slots: ``[N]`` int64 adapter slot per view (-1 for views without adapters).

        Returns:
            ``[N, T, width]``: the chosen layer's patch tokens, ``T = (S / patch)^2``, with the
            class token(s) in front when ``keep_cls``.
        """
        index = SlotIndex.from_slots(slots, self.cfg.lora_slots, device=pixel_values.device)
        layout = index.layout
        if layout is None or layout.windows == layout.views_per_image or not torch.is_grad_enabled() \
                or not self._base_frozen():
            return self._encode(pixel_values, index)
        # Training with the encoder frozen (Monkey's recipe): the views without an adapter (the
        # global view) have nothing in the encoder to train and no input that needs a gradient,
        # so they go through it without autograd: no activations kept, no backward through them.
        # (The Monkey tower does this inside each block call; a transformers encoder runs its
        # own layer loop, so here it is a second encoder call: under FSDP2 the encoder's
        # layers are gathered twice in forward, a small cost beside the LLM's.)
        b, v, first, w = layout.images, layout.views_per_image, layout.first_view, layout.windows
        views = pixel_values.unflatten(0, (b, v))
        pick = index.pick.unflatten(0, (b, v))[:, first : first + w].flatten(0, 1)
        windows = self._encode(views[:, first : first + w].flatten(0, 1),
                               SlotIndex(pick, WindowLayout(b, w, 0, layout.first_slot, w)))
        with torch.no_grad():
            aside = self._encode(torch.cat([views[:, :first], views[:, first + w :]], dim=1).flatten(0, 1), None)
        aside = aside.unflatten(0, (b, v - w))
        out = torch.cat([aside[:, :first], windows.unflatten(0, (b, w)), aside[:, first:]], dim=1)
        return out.flatten(0, 1)

    def _base_frozen(self) -> bool:
        return not any(p.requires_grad for name, p in self.encoder.named_parameters() if ".lora." not in name)

    def _encode(self, pixel_values: torch.Tensor, index: SlotIndex | None) -> torch.Tensor:
        """One encoder pass over ``[N, 3, S, S]`` views with ``index``'s adapters (None: none)."""
        enc = self.cfg.encoder
        self._slots.index = index
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True,
                           interpolate_pos_encoding=True)
        hidden = out.hidden_states[enc.feature_layer]  # [N, extra + T, width]
        patches = (pixel_values.shape[-2] // self.cfg.patch_size) * (pixel_values.shape[-1] // self.cfg.patch_size)
        extra = hidden.shape[1] - patches  # class and register tokens, in front
        if enc.keep_cls:
            return hidden
        return hidden[:, extra:]
