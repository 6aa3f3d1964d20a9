"""Training-memory estimate per GPU: weights, gradients, optimizer states and activations.

The estimate is a planning aid (does this plan fit on N GPUs?), not a measurement. It ignores
the CUDA context (~0.5-1 GiB), allocator fragmentation, communication buffers and temporary
tensors of individual kernels; expect real peaks 10-30% above it.

**Model states** (P = all parameters, T = trainable parameters, N = GPUs, AdamW):

===============  ===================================  ==============  ==================================
precision        weights                              gradients       optimizer states
===============  ===================================  ==============  ==================================
bf16/fp16 DDP,   2 B x (P - T) frozen in half,        4 B x T         8 B x T (m and v)
FSDP2            4 B x T trained (fp32 masters)
bf16/fp16 ZeRO   2 B x P (half copy)                  2 B x T         12 B x T (fp32 master, m and v)
fp32             4 B x P                              4 B x T         8 B x T (m and v)
===============  ===================================  ==============  ==================================

With ``optim="adamw_bnb_8bit"`` or ``"paged_adamw_8bit"`` (bitsandbytes, single process or DDP
only) the moments take 2 bytes per parameter plus one fp32 scale per 256 values each
(:data:`ADAM8BIT_BYTES` = 2.03125), except in tensors under 4096 elements, which bitsandbytes
keeps in fp32 (8 bytes). Paged states are counted on the GPU: paging only moves them out
under memory pressure, at a cost in speed.

**4-bit weights (``llm-qlora``)**: the LLM's LoRA target linear weights and the frozen ViT block
projections (qkv, attention output, MLP fc and proj) are bitsandbytes NF4 with blocksize 64 and
double quantization: half a byte per weight, one uint8 scale per 64 weights and one fp32 scale
per 256 of those (:data:`NF4_BYTES` = 0.5159). Everything else (embeddings, LM head, norms,
biases, the patch embedding and position table, the resampler) stays at the precision's dtype,
trained LoRA and adapter weights fp32. The forward and backward of each 4-bit layer dequantize
its weight to the compute dtype, so one such copy of the largest quantized layer is added to the
weights. QLoRA is counted for a single process or DDP only.

Frozen weights follow the compute dtype under every engine (the trainer casts the parameters no
unfreezing stage trains; DeepSpeed casts the whole module), and trained ones keep fp32 masters.

* ``ddp``: nothing sharded (gradient buckets assumed to be views, ``gradient_as_bucket_view``).
  Mixed precision under DDP is autocast, so activations are in half precision.
* ``zero1``: optimizer states / N. ``zero2``: optimizer states and gradients / N.
* ``zero3``: weights, gradients and optimizer states / N, plus the gathered half-precision
  weights of the root unit (everything outside the transformer blocks: embeddings, LM head,
  patch embedding, resampler) and of two blocks (the one computing and the one prefetched).
* ``fsdp`` (FSDP2 with a ``MixedPrecisionPolicy``): the DDP row's weights, gradients and
  optimizer states / N, plus the same gathered half-precision units as ``zero3``. With fp32 it
  equals ``zero3``.

**Activations** (per GPU, per micro-batch of ``batch_size`` sequences of ``seq_len`` tokens and
``images_per_sample`` images each; ``a`` = activation bytes, 2 for bf16/fp16, 4 for fp32).
Elements saved for backward per token and layer, assuming memory-efficient attention (PyTorch
SDPA / flash attention stores no ``seq x seq`` score matrix):

* LLM decoder layer (hidden ``h``, key/value width ``kv``, MLP width ``f``):
  ``6h + 2kv + 4f`` - two RMSNorm inputs and outputs, q/k/v, attention output, gate and up
  outputs, the SiLU output and the gated product; ``+ 6h + f`` with peft LoRA on the LLM (the
  dropout output each adapted projection keeps).
* ViT block (width ``w``, MLP width ``m``, adapter ranks ``r_attn``, ``r_mlp``):
  ``10w + 2m + 2 r_attn + r_mlp`` - LayerNorms, qkv, attention output, MLP hidden and GELU
  output, and the inputs and low-rank intermediates of the three per-window adapters. The patch
  embedding adds ``3w`` per vision token, the resampler ``5 d`` (``d`` = output width).
* The loss: the LM head runs on at most ``LOSS_CHUNK`` (128) supervised positions at a time,
  keeping fp32 logits, log-probabilities and their gradient: ``min(tokens, 128) x vocab x 12`` bytes.

Only the parts that backward must traverse are stored: the ViT from its first trainable block
(nothing if no vision parameter trains), the resampler if it or the ViT trains, and the LLM
from layer 0 when anything before it trains (its inputs need gradients) or else from its first
trainable layer. With gradient checkpointing each layer keeps only its input (``h`` or ``w``
per token) and one layer at a time is recomputed during backward, so the peak adds the largest
single layer's full activations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from monkeytune.config import ModelConfig
# Sizing a configuration before it is built lives in model_size; re-exported for callers of this module.
from monkeytune.model_size import check_fits_in_memory, estimate_parameters, memory_capacity  # noqa: F401

if TYPE_CHECKING:
    from monkeytune.policy.plan import Decision

# The policy and loss modules import torch: they are imported where used, so that reading this
# module's tables (the CLI's choices) loads nothing heavy.

PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit")
GIB = 1024**3
# bitsandbytes' 8-bit blockwise Adam: two uint8 moments + two fp32 absmax per 256-value block.
ADAM8BIT_BYTES = 2 + 2 * 4 / 256
ADAM8BIT_MIN_SIZE = 4096  # smaller tensors keep fp32 moments (bitsandbytes' min_8bit_size)
# NF4, blocksize 64, double quantization: 4 bits + a uint8 absmax per 64 + an fp32 absmax per 64 * 256.
NF4_BLOCK = 64
NF4_BYTES = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)

# A ViT block (Monkey's, or a composed transformers encoder's layer) or an LLM decoder layer.
_BLOCK = re.compile(r"^(vision\.(?:blocks|encoder\.(?:\w+\.)*?layers?)\.(\d+)|llm\.model\.layers\.(\d+))\.")


@dataclass(frozen=True)
class ParamSummary:
    """What the memory estimate needs to know about a resolved plan.

    Attributes:
        total: All parameters.
        trainable: Trainable parameters.
        root_unit: Parameters outside the transformer blocks (gathered whole under ZeRO-3/FSDP).
        largest_block: Parameters of the largest ViT block or LLM layer.
        vision_from: First ViT block backward must reach (``None``: the ViT needs no backward).
        resampler_grad: Whether backward runs through the resampler.
        llm_from: First LLM layer backward must reach (``num_layers`` when only the final norm
            or head trains).
        llm_lora: Whether peft LoRA adapters sit in the LLM.
        trainable_small: Trainable parameters in tensors under :data:`ADAM8BIT_MIN_SIZE`
            elements (fp32 moments under the 8-bit optimizers).
        quantized: Frozen parameters stored as 4-bit NF4 (QLoRA's LLM and ViT linear weights).
        largest_quantized: Elements of the largest 4-bit weight (dequantized while it computes).
    """

    total: int
    trainable: int
    root_unit: int
    largest_block: int
    vision_from: int | None
    resampler_grad: bool
    llm_from: int
    llm_lora: bool
    trainable_small: int = 0
    quantized: int = 0
    largest_quantized: int = 0


def summarize(decisions: Iterable[Decision], config: ModelConfig, quantize: Iterable[str] = ()) -> ParamSummary:
    """Reduce per-parameter decisions (``resolve_plan``/``plan_report``) to a :class:`ParamSummary`.

    Args:
        decisions: One per parameter, of a model with unquantized weights (e.g. built on the
            meta device, where QLoRA's layers stay ``nn.Linear``).
        config: The model configuration.
        quantize: ``llm-qlora``'s LLM LoRA targets (e.g. ``q_proj``), empty when nothing is
            4-bit. When given, the frozen ``weight`` of those LLM layers and of the ViT block
            projections (:func:`~monkeytune.policy.quantize.is_vision_4bit_weight`) counts as
            NF4, as ``llm-qlora`` quantises both.
    """
    from monkeytune.policy.components import canonical_name  # noqa: PLC0415 - see the imports

    decisions = list(decisions)
    targets = tuple(quantize)
    quantized = [d.numel for d in decisions if targets and _is_quantized(d, targets)]
    blocks: dict[str, int] = {}
    root = 0
    vision_first: int | None = None
    llm_first: int | None = None
    upstream = False
    for d in decisions:
        canon = canonical_name(d.name)
        m = _BLOCK.match(canon)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + d.numel
        else:
            root += d.numel
        if not d.trainable:
            continue
        if d.component in ("vision_tower", "vision_adapters"):
            idx = int(m.group(2)) if m and m.group(2) is not None else 0
            vision_first = idx if vision_first is None else min(vision_first, idx)
        if d.component in ("vision_tower", "vision_adapters", "resampler", "projector", "image_tokens", "embeddings"):
            upstream = True
        if m and m.group(3) is not None:
            idx = int(m.group(3))
            llm_first = idx if llm_first is None else min(llm_first, idx)
    resampler_grad = vision_first is not None or any(d.trainable and d.component in ("resampler", "projector") for d in decisions)
    llm_from = 0 if upstream else (llm_first if llm_first is not None else config.llm.num_layers)
    return ParamSummary(
        total=sum(d.numel for d in decisions),
        trainable=sum(d.numel for d in decisions if d.trainable),
        root_unit=root,
        largest_block=max(blocks.values(), default=0),
        vision_from=vision_first,
        resampler_grad=resampler_grad,
        llm_from=llm_from,
        llm_lora=any(d.component == "llm_lora" for d in decisions),
        trainable_small=sum(d.numel for d in decisions if d.trainable and d.numel < ADAM8BIT_MIN_SIZE),
        quantized=sum(quantized),
        largest_quantized=max(quantized, default=0),
    )


def _is_quantized(d: Decision, targets: tuple[str, ...]) -> bool:
    """A frozen ViT block projection weight or LLM target linear weight (peft: ``<target>.base_layer``)."""
    from monkeytune.policy.components import canonical_name  # noqa: PLC0415
    from monkeytune.policy.quantize import is_vision_4bit_weight  # noqa: PLC0415

    if d.trainable or d.component not in ("llm_layers", "vision_tower"):
        return False
    canon = canonical_name(d.name)
    if d.component == "vision_tower":
        return is_vision_4bit_weight(canon)
    parts = canon.split(".")
    if parts[-1] != "weight":
        return False
    owner = parts[-3] if parts[-2] == "base_layer" else parts[-2]
    return owner in targets


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU for one precision, strategy and optimizer (``activations_ckpt``: with checkpointing)."""

    precision: str
    strategy: str
    gpus: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_ckpt: int
    optim: str = "adamw_torch"

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations

    @property
    def total_ckpt(self) -> int:
        return self.states + self.activations_ckpt

    def to_dict(self) -> dict[str, int | str]:
        return {
            "precision": self.precision, "strategy": self.strategy, "gpus": self.gpus, "optim": self.optim,
            "weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "activations_ckpt": self.activations_ckpt,
            "total": self.total, "total_ckpt": self.total_ckpt,
        }


def strategies_for(s: ParamSummary, optim: str = "adamw_torch") -> tuple[str, ...]:
    """The strategies a plan can train under: 8-bit optimizers and 4-bit weights only single-process/DDP."""
    if optim != "adamw_torch" or s.quantized:
        return ("ddp",)
    return STRATEGIES


def optimizer_state_bytes(s: ParamSummary, optim: str) -> int:
    """AdamW moments of every trained parameter, unsharded (see the module docstring)."""
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim must be one of {list(OPTIMIZERS)}, got {optim!r}")
    if optim == "adamw_torch":
        return 8 * s.trainable
    return round(ADAM8BIT_BYTES * (s.trainable - s.trainable_small)) + 8 * s.trainable_small


def model_state_bytes(s: ParamSummary, precision: str, strategy: str, gpus: int,
                      optim: str = "adamw_torch") -> tuple[int, int, int]:
    """``(weights, gradients, optimizer)`` bytes per GPU; see the module docstring for the rules."""
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim must be one of {list(OPTIMIZERS)}, got {optim!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy not in strategies_for(s, optim):
        what = "4-bit weights" if s.quantized else optim
        raise ValueError(f"{what} train single-process or under DDP only, not under {strategy}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    half = precision != "fp32"
    a = PRECISIONS[precision]
    # 4-bit weights, plus one dequantized copy (compute dtype: bf16 under fp32, as QLoRA computes).
    quant = round(NF4_BYTES * s.quantized) + (2 if not half else a) * s.largest_quantized
    frozen = s.total - s.trainable - s.quantized
    moments = optimizer_state_bytes(s, optim)
    if not half:
        weights, grads, optim_bytes = 4 * (frozen + s.trainable) + quant, 4 * s.trainable, moments
    elif strategy in ("ddp", "fsdp"):
        # Frozen weights are held in the compute dtype; trained ones stay fp32 masters with fp32
        # gradients (autocast under DDP, FSDP2's MixedPrecisionPolicy computes in half).
        weights, grads, optim_bytes = 2 * frozen + 4 * s.trainable + quant, 4 * s.trainable, moments
    else:
        # DeepSpeed: the module in half precision, fp32 masters and moments in the optimizer.
        weights, grads, optim_bytes = 2 * s.total, 2 * s.trainable, 12 * s.trainable
    optim = optim_bytes
    n = gpus
    if strategy in ("zero1", "zero2", "zero3", "fsdp"):
        optim = -(-optim // n)
    if strategy in ("zero2", "zero3", "fsdp"):
        grads = -(-grads // n)
    if strategy in ("zero3", "fsdp"):
        gathered = PRECISIONS[precision] * (s.root_unit + 2 * s.largest_block) if n > 1 else 0
        weights = -(-weights // n) + gathered
    return weights, grads, optim


def activation_bytes(
    s: ParamSummary,
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    precision: str = "bf16",
    checkpointing: bool = False,
    images_per_sample: int = 1,
) -> dict[str, int]:
    """Approximate activation memory per GPU, split into ``vision``, ``resampler``, ``llm``, ``loss``.

    Args:
        s: From :func:`summarize`.
        config: The model configuration (sizes).
        batch_size: Sequences per GPU per micro-batch.
        seq_len: Tokens per sequence (visual tokens included).
        precision: ``bf16``, ``fp16`` or ``fp32``.
        checkpointing: Gradient checkpointing on the ViT blocks and LLM layers.
        images_per_sample: Images per sequence.

    Returns:
        Bytes per part plus ``total``.
    """
    if batch_size < 1 or seq_len < 1 or images_per_sample < 0:
        raise ValueError("batch_size and seq_len must be >= 1 and images_per_sample >= 0")
    a = PRECISIONS[precision]
    v, im, llm = config.vision, config.image, config.llm
    patches = (im.window_size // v.patch_size) ** 2
    vis_tokens = batch_size * images_per_sample * im.num_views * patches
    tokens = batch_size * seq_len

    w, m = v.width, v.mlp_width
    vit_layer = 10 * w + 2 * m + 2 * v.lora_rank_attn + v.lora_rank_mlp
    h, f = llm.hidden_size, llm.intermediate_size
    kv = h * llm.num_kv_heads // llm.num_heads
    llm_layer = 6 * h + 2 * kv + 4 * f + ((6 * h + f) if s.llm_lora else 0)

    vit_layers = 0 if s.vision_from is None else max(0, v.layers - s.vision_from)
    llm_layers = max(0, llm.num_layers - s.llm_from)
    peak_layer = 0
    if checkpointing:
        vision = vis_tokens * (vit_layers * w + (3 * w if s.vision_from == 0 else 0)) * a
        lm = tokens * llm_layers * h * a
        if vit_layers:
            peak_layer = max(peak_layer, vis_tokens * vit_layer * a)
        if llm_layers:
            peak_layer = max(peak_layer, tokens * llm_layer * a)
    else:
        vision = vis_tokens * (vit_layers * vit_layer + (3 * w if s.vision_from == 0 else 0)) * a
        lm = tokens * llm_layers * llm_layer * a
    resampler = vis_tokens * 5 * v.output_dim * a if s.resampler_grad else 0
    # Final norm input/output sit before the head whenever anything trains.
    from monkeytune.model.loss import LOSS_CHUNK  # noqa: PLC0415 - see the imports

    loss = min(tokens, LOSS_CHUNK) * llm.vocab_size * 12 + tokens * 2 * h * a
    parts = {"vision": vision, "resampler": resampler, "llm": lm + peak_layer, "loss": loss}
    parts["total"] = sum(parts.values())
    return parts


def estimate_memory(
    s: ParamSummary,
    config: ModelConfig,
    precision: str = "bf16",
    strategy: str = "ddp",
    gpus: int = 1,
    batch_size: int = 1,
    seq_len: int = 2048,
    images_per_sample: int = 1,
    optim: str = "adamw_torch",
) -> MemoryEstimate:
    """Per-GPU memory of one precision/strategy/optimizer, with and without gradient checkpointing."""
    weights, grads, moments = model_state_bytes(s, precision, strategy, gpus, optim)
    act = activation_bytes(s, config, batch_size, seq_len, precision, False, images_per_sample)["total"]
    act_ck = activation_bytes(s, config, batch_size, seq_len, precision, True, images_per_sample)["total"]
    return MemoryEstimate(precision, strategy, gpus, weights, grads, moments, act, act_ck, optim)


def estimate_all(
    s: ParamSummary,
    config: ModelConfig,
    gpus: int = 1,
    batch_size: int = 1,
    seq_len: int = 2048,
    images_per_sample: int = 1,
    precisions: Iterable[str] = tuple(PRECISIONS),
    optim: str = "adamw_torch",
) -> list[MemoryEstimate]:
    """Every precision x strategy combination the plan and optimizer can train under (:func:`strategies_for`)."""
    return [
        estimate_memory(s, config, p, st, gpus, batch_size, seq_len, images_per_sample, optim)
        for p in precisions
        for st in strategies_for(s, optim)
    ]


def format_memory(estimates: list[MemoryEstimate], batch_size: int, seq_len: int) -> str:
    """Fixed-width GiB table of :func:`estimate_all` output."""
    if not estimates:
        return ""
    gpus = estimates[0].gpus
    header = ("precision", "strategy", "weights", "grads", "optim", "activ", "activ+ckpt", "total", "total+ckpt")
    rows = [
        (e.precision, e.strategy, *(f"{x / GIB:.2f}" for x in (
            e.weights, e.gradients, e.optimizer, e.activations, e.activations_ckpt, e.total, e.total_ckpt)))
        for e in estimates
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(cells, widths)))

    optim = {"adamw_torch": "AdamW", "adamw_bnb_8bit": "8-bit AdamW",
             "paged_adamw_8bit": "paged 8-bit AdamW"}[estimates[0].optim]
    title = (f"training memory per GPU (GiB), {gpus} GPU(s), {optim}, micro-batch {batch_size} x {seq_len} tokens"
             " (approximate; see monkeytune.memory)")
    return "\n".join([title, "", fmt(header), fmt(tuple("-" * wd for wd in widths)), *[fmt(r) for r in rows]])
