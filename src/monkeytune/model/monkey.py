"""The assembled Monkey model: shared ViT with per-window LoRA, resampler, and a transformers causal LM.

Data flow for a batch::

    pixel_values [N_views, 3, S, S], view_slots [N_views]
        -> VisionTower (one batched pass over every view of every image)   [N_views, L, width]
        -> Resampler                                                       [N_views, Q, D]
        -> flattened in view order                                         [N_views * Q, D]
    input_ids [B, T] -> LLM input embeddings                               [B, T, D]
        -> visual tokens written (out of place) over the image-pad positions, in order
        -> LLM decoder -> hidden [B, T, D] -> LM head on supervised positions only

The model takes tensors only; images are decoded and tiled by the data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from monkeytune.config import LLMConfig, ModelConfig
from monkeytune.model.auto import MonkeyConfig, resolve_device, resolve_dtype
from monkeytune.model.loss import LOSS_CHUNK, supervised_loss
from monkeytune.model.qwen_compat import get_compat
from monkeytune.vision.encoder import EncoderTower, enable_checkpointing
from monkeytune.vision.projector import Projector
from monkeytune.vision.resampler import Resampler
from monkeytune.vision.vit import VisionTower


def build_llm(cfg: LLMConfig) -> nn.Module:
    """The causal LM: ``cfg.hf_config``'s transformers model (a composed model), else a
    ``Qwen2ForCausalLM`` in the Qwen-7B layout (q/k/v bias, no o_proj bias, RMSNorm, SwiGLU)."""
    if cfg.hf_config is not None:
        from transformers import AutoConfig  # noqa: PLC0415
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: PLC0415

        hf = AutoConfig.for_model(**cfg.hf_config, attn_implementation="sdpa")
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf)](hf)  # the class itself: see build_encoder
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_cache=True,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(hf_cfg)


def enable_llm_checkpointing(llm: nn.Module) -> None:
    """transformers' activation checkpointing of the decoder layers (non-reentrant)."""
    enable_checkpointing(llm)


@dataclass
class MonkeyOutput:
    """Result of :meth:`MonkeyForCausalLM.forward`.

    Attributes:
        loss: Mean cross-entropy over this batch's supervised tokens (when labels were given).
        loss_sum: Sum of the per-token losses (for normalising over accumulation or ranks).
        num_tokens: Number of supervised tokens.
        logits: ``[B, T, vocab]`` (only when no labels were given).
    """

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ImageTokenMismatch(ValueError):
    """The prompt's image placeholders do not match the visual features supplied."""


class ImageTokenEmbeddings(nn.Module):
    """The embeddings of ``<img>`` and ``</img>``, new to a composed model's LLM vocabulary.

    They live outside the LLM's table so that they train with the connector while the table stays
    frozen, with no gradient or optimizer state for the whole vocabulary. A module of its own
    (not a bare parameter of the model) so that engines that gather weights per module call
    (ZeRO-3) see it used, in forward and in backward.

    Attributes:
        weight: ``[2, hidden]``: the ``<img>`` row, then the ``</img>`` row.
    """

    def __init__(self, start_id: int, end_id: int, hidden: int):
        super().__init__()
        self.ids = (start_id, end_id)
        self.weight = nn.Parameter(torch.zeros(2, hidden))

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Args: input_ids ``[B, T]``; embeds ``[B, T, D]``. Returns embeds with the two tokens' rows written."""
        for row, token in enumerate(self.ids):
            embeds = torch.where((input_ids == token)[..., None], self.weight[row].to(embeds.dtype), embeds)
        return embeds


class MonkeyForCausalLM(nn.Module):
    """Monkey-style multimodal causal LM.

    Args:
        config: The model configuration (validated here).
        llm: An existing causal LM to use instead of building one from ``config.llm`` (any
            transformers causal LM whose hidden size equals ``config.vision.output_dim``).
        encoder: An existing transformers vision encoder for a composed model's tower (it
            gains the per-window adapters), instead of a fresh one from ``config.vision.encoder``.
    """

    #: For transformers' Auto classes (``AutoModelForCausalLM.register``); ``self.config`` is the
    #: typed :class:`ModelConfig`.
    config_class = MonkeyConfig

    def __init__(self, config: ModelConfig, llm: nn.Module | None = None, encoder: nn.Module | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.vision = EncoderTower(config.vision, encoder) if config.composed else VisionTower(config.vision)
        if config.vision.connector == "mlp":
            self.projector = Projector(config.vision)
        else:
            self.resampler = Resampler(config.vision)
        self.llm = llm if llm is not None else build_llm(config.llm)
        hidden = self.llm.get_input_embeddings().weight.shape[1]
        if hidden != config.vision.output_dim:
            raise ValueError(f"LLM hidden size {hidden} != vision.output_dim {config.vision.output_dim}")
        if config.composed:
            self.image_tokens = ImageTokenEmbeddings(config.image_start_id, config.image_end_id, hidden)

    @property
    def connector(self) -> nn.Module:
        """What turns a view's patch features into LLM tokens: the resampler or the projector."""
        return self.projector if self.config.vision.connector == "mlp" else self.resampler

    @property
    def device(self) -> torch.device:
        """Where the weights are (as transformers models report it, for ``inputs.to(model.device)``)."""
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The LLM's weight dtype."""
        return self.llm.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ folders
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        torch_dtype: Any = None,
        dtype: Any = None,
        device_map: Any = None,
        base: str | Path | None = None,
        **ignored: Any,
    ) -> "MonkeyForCausalLM":
        """Load a monkeytune or official Monkey / Qwen-VL folder, as transformers models load.

        Args:
            pretrained_model_name_or_path: A local folder (nothing is downloaded).
            torch_dtype, dtype: A torch dtype, its name, or ``"auto"``/None to keep the stored
                dtypes (``dtype`` is transformers 5's name, ``torch_dtype`` the older one).
            device_map: ``"auto"`` (first GPU if any), a device, or ``{"": device}``.
            base: Base folder of a trainable-only folder (default: the one it records).
            **ignored: transformers' Auto-class arguments (``config``, ``revision``,
                ``trust_remote_code`` ...), which do not apply to a local folder.

        Returns:
            The model in eval mode; its tokenizer is :class:`monkeytune.MonkeyProcessor`'s
            (or ``monkeytune.model.io.load_model``'s second value).

        Raises:
            ModelFolderError: the folder cannot be read (named file and field).
        """
        # The loader builds this class, so it is imported when called, not at module import.
        from monkeytune.model.io import load_model  # noqa: PLC0415

        model, tokenizer = load_model(
            pretrained_model_name_or_path,
            dtype=resolve_dtype(dtype if dtype is not None else torch_dtype),
            device=resolve_device(device_map),
            base=base,
        )
        if tokenizer is not None:
            # What transformers keeps in generation_config.json: generate() then stops at the
            # end of an answer and pads with the tokenizer's id without being told.
            gen = model.llm.generation_config
            gen.eos_token_id = [tokenizer.eos_id]
            try:
                gen.eos_token_id.append(tokenizer.special_id("<|im_end|>"))
            except KeyError:
                pass
            gen.pad_token_id = tokenizer.pad_id
        return model

    def save_pretrained(self, save_directory: str | Path, tokenizer: Any = None, **kwargs: Any) -> Path:
        """Write a monkeytune folder (see :func:`monkeytune.model.io.save_model` for ``kwargs``).

        The folder's ``config.json`` states ``model_type`` and ``architectures``, so
        ``AutoModelForCausalLM.from_pretrained`` reads it after ``import monkeytune``.
        """
        from monkeytune.model.io import save_model  # noqa: PLC0415 - see from_pretrained

        return save_model(self, save_directory, tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor, view_slots: torch.Tensor) -> torch.Tensor:
        """Visual tokens of every view.

        Args:
            pixel_values: ``[N, 3, S, S]`` normalised views, images contiguous, each image's
                windows (row-major) then its global view.
            view_slots: ``[N]`` int64 adapter slot per view (-1: no adapter). A tower built
                without adapters (``vision.lora_slots == 0``, which the config allows with
                windows) runs every view through the shared weights and ignores the slots.

        Returns:
            ``[N, n_queries, output_dim]``.
        """
        if pixel_values.shape[0] != view_slots.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} views but view_slots has {view_slots.shape[0]}")
        max_slot = int(view_slots.max()) if view_slots.numel() else -1
        if self.config.vision.lora_slots and max_slot >= self.config.vision.lora_slots:
            raise ValueError(f"view slot {max_slot} used but the model has {self.config.vision.lora_slots} adapter slots")
        patch = self.config.vision.patch_size
        grid_hw = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        # The slots stay where they are: on the CPU (as the processor makes them) the tower reads
        # their layout for free and runs each view's own adapter only (see MultiLoRA).
        feats = self.vision(pixel_values, view_slots)
        return self.connector(feats, grid_hw)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        view_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with visual tokens written over the image-pad positions.

        Pad positions are filled in row-major order (batch row, then position) with the visual
        tokens of the views in order, so image ``i`` of the batch takes placeholders
        ``[i * tokens_per_image, (i + 1) * tokens_per_image)`` of the flattened order. The write is
        out of place (``masked_scatter``), which keeps autograd valid when adapters train.

        Args:
            input_ids: ``[B, T]``.
            pixel_values: ``[N, 3, S, S]`` or None for text-only batches.
            view_slots: ``[N]``.

        Returns:
            ``[B, T, D]`` input embeddings.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        if self.config.composed:
            embeds = self.image_tokens(input_ids, embeds)
        pad_mask = input_ids == self.config.image_pad_id
        n_pad = int(pad_mask.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_pad:
                raise ImageTokenMismatch(f"the batch has {n_pad} image placeholder tokens but no images")
            return embeds
        if view_slots is None:
            raise ValueError("view_slots is required with pixel_values")
        visual = self.encode_images(pixel_values, view_slots)  # [N, Q, D]
        n_feat = visual.shape[0] * visual.shape[1]
        if n_feat != n_pad:
            per_image = self.config.tokens_per_image
            raise ImageTokenMismatch(
                f"the batch has {n_pad} image placeholder tokens ({n_pad / per_image:g} images at {per_image} tokens "
                f"each) but {visual.shape[0]} views x {visual.shape[1]} queries = {n_feat} visual tokens"
            )
        visual = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(pad_mask.unsqueeze(-1), visual)

    def _idle_vision_path(self, embeds: torch.Tensor) -> torch.Tensor:
        """A zero that has run the vision tower and resampler, for a training batch without images.

        Data-parallel engines need every rank to run the same modules in every micro-batch:
        FSDP2 and ZeRO-3 all-gather each module's weights when it runs, and DDP and ZeRO-2 reduce
        the gradients of every trained weight. A rank whose micro-batch is text-only would skip
        the tower and leave the others waiting (a hang under NCCL). So blank views go through the
        tower and resampler, and their output is added multiplied by zero: the loss and every
        gradient are exactly those of the text-only batch.

        The blank views are laid out as an image's are, so the tower runs them the way it runs
        images: a window view (slot 0) beside a global view (slot -1) when the layout has both
        (the tower then runs each block on the windows with autograd and on the global views
        without, and ZeRO-3, which gathers weights per submodule call, sees the same calls on
        every rank), else one view of slot -1 (every adapter runs, gated, see ``MultiLoRA``).
        The slots are on the CPU, where the tower reads their layout.

        Args:
            embeds: ``[B, T, D]`` the batch's input embeddings (for dtype and device).

        Returns:
            ``[]`` a zero scalar in ``embeds``' dtype, connected to every vision weight.
        """
        image = self.config.image
        slots = torch.tensor([0, -1] if image.num_windows and image.global_view and self.config.vision.lora_slots
                             else [-1])
        blank = torch.zeros(len(slots), 3, image.window_size, image.window_size, device=embeds.device)
        return self.encode_images(blank, slots).sum().to(embeds.dtype) * 0.0

    # ------------------------------------------------------------------ LM
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        view_slots: torch.Tensor | None = None,
        loss_chunk_size: int = LOSS_CHUNK,
        token_weights: torch.Tensor | None = None,
        loss_chunks: int | None = None,
        **varlen: Any,
    ) -> MonkeyOutput:
        """Run the model.

        Args:
            input_ids: ``[B, T]``.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding. Leave None for packed
                rows: with ``position_ids`` restarting at 0 for each packed sample, the LLM builds
                a block-diagonal causal mask so attention never crosses samples.
            position_ids: ``[B, T]`` or None (0..T-1).
            labels: ``[B, T]`` aligned with ``input_ids`` (-100 = unsupervised). When given, only
                the loss is computed; logits are produced only at supervised positions.
            pixel_values: ``[N, 3, S, S]`` all views of all images, in order of appearance.
            view_slots: ``[N]`` adapter slot per view.
            loss_chunk_size: Supervised positions per LM-head chunk.
            token_weights: Optional ``[B, T]`` weight of each target ``labels[b, t]``;
                ``loss_sum`` is then the weighted sum (used for the per-sample loss).
            loss_chunks: Exact number of LM-head calls for the loss (see
                :func:`~monkeytune.model.loss.supervised_loss`); data-parallel trainers pass the
                same number on every rank, since a sharded head is gathered at each call.
            **varlen: transformers' flash-attention varlen arguments of a padding-free batch
                (``cu_seq_lens_q``/``_k`` ``[K + 1]`` int32, ``max_length_q``/``_k`` int, with
                ``B = 1``; see :mod:`monkeytune.data.collate`), passed to the decoder.

        Returns:
            :class:`MonkeyOutput` with ``loss``/``loss_sum``/``num_tokens`` when labels were
            given, else ``logits`` ``[B, T, vocab]``.
        """
        unknown = set(varlen) - {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(unknown)}")
        embeds = self.embed_inputs(input_ids, pixel_values, view_slots)
        if self.training and (pixel_values is None or pixel_values.shape[0] == 0):
            embeds = embeds + self._idle_vision_path(embeds)
        decoder = self.llm.get_decoder()
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,  # a cache would also disable packed-sequence masking
            **varlen,
        )
        hidden = out.last_hidden_state
        head = self.llm.get_output_embeddings()
        if labels is None:
            return MonkeyOutput(logits=head(hidden))
        loss_sum, num_tokens = supervised_loss(
            hidden, labels, head, chunk_size=loss_chunk_size, weights=token_weights, num_chunks=loss_chunks
        )
        loss = loss_sum / num_tokens.clamp(min=1)
        return MonkeyOutput(loss=loss, loss_sum=loss_sum, num_tokens=num_tokens)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        view_slots: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate with the LLM's own ``generate`` (KV cache, greedy or sampling).

        The prompt's embeddings (with visual tokens written in) are computed once; decoding then
        runs on the cached keys and values. Batched prompts must be left-padded.

        Args:
            input_ids: ``[B, T]`` prompt ids.
            attention_mask: ``[B, T]`` (required when left-padded).
            pixel_values, view_slots: As in :meth:`forward`.
            **generate_kwargs: Passed to ``transformers.GenerationMixin.generate``
                (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``streamer`` ...).

        Returns:
            ``[B, T_new]`` the generated ids only (without the prompt).
        """
        # A processor's output (CPU, float32 views) works as is, as with transformers models.
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=self.dtype)
        if get_compat(self) is not None:
            cache = generate_kwargs.get("cache_implementation")
            if cache not in (None, "dynamic") or generate_kwargs.get("prefill_chunk_size"):
                # The official log-n index and NTK alpha are read from what one forward sees:
                # a preallocated cache or a prompt fed in chunks would give wrong ones.
                raise ValueError("models from official checkpoints generate with the dynamic KV cache and the whole "
                                 f"prompt at once; got cache_implementation={cache!r}, prefill_chunk_size="
                                 f"{generate_kwargs.get('prefill_chunk_size')!r}")
        embeds = self.embed_inputs(input_ids, pixel_values, view_slots)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = generate_kwargs.get("eos_token_id")
        if "pad_token_id" not in generate_kwargs and isinstance(eos, int) and eos >= 0:
            generate_kwargs["pad_token_id"] = eos
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        return out
