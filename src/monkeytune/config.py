"""Typed model configuration: three small dataclasses and a named-preset registry.

A :class:`ModelConfig` fully describes a Monkey-style model: the vision tower (:class:`VisionConfig`),
how an image is cut into views (:class:`ImageConfig`) and the causal LM (:class:`LLMConfig`).
Everything is plain data so it round-trips through YAML/JSON and is saved beside each checkpoint.
Derived quantities (views per image, visual tokens per image) are computed, never stored, so that
changing the grid or the number of queries can never leave a stale constant behind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Pillow warns above its MAX_IMAGE_PIXELS (this many) and refuses above twice that; the
# decompression-bomb guard stops at the warning threshold (e.g. 9459x9459), well past any real
# page scan or photo Monkey's 896-pixel canvas can use (monkeytune.vision.image checks it).
DEFAULT_MAX_PIXELS = 89_478_485

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("stretch", "crop", "pad")
CONNECTORS = ("resampler", "mlp")


@dataclass
class EncoderConfig:
    """A transformers vision encoder in place of the Qwen-VL ViT (a composed model).

    Attributes:
        hf_config: The encoder's transformers configuration as a dict (``model_type`` included;
            e.g. a ``clip_vision_model``, ``siglip_vision_model`` or ``dinov2`` config), which
            ``AutoModel.from_config`` builds.
        feature_layer: Which hidden state feeds the connector: -1 the last layer's output (before
            any final norm), -2 the penultimate (as LLaVA uses).
        keep_cls: Keep the encoder's class token(s) in front of the patch tokens (``mlp``
            connector without pixel shuffle only).
        adapter_targets: Names of the encoder's ``nn.Linear`` layers that get per-window
            adapters, matched as a suffix of the module path (``q_proj`` matches
            ``...self_attn.q_proj``). Each must match at least one layer.
    """

    hf_config: dict[str, Any] = field(default_factory=dict)
    feature_layer: int = -1
    keep_cls: bool = False
    adapter_targets: list[str] = field(default_factory=list)


@dataclass
class VisionConfig:
    """Qwen-VL/Monkey ViT plus resampler sizes.

    Attributes:
        patch_size: Side of the square patches of the patch-embedding convolution.
        width: ViT hidden size.
        layers: Number of ViT blocks.
        heads: ViT attention heads.
        mlp_ratio: MLP width is ``int(width * mlp_ratio)`` (4.9231 gives 8192 for width 1664).
        pos_grid: Side of the learned absolute position table (resized to the patch grid).
        output_dim: Resampler and projection width; must equal the LLM hidden size.
        n_queries: Learnable resampler queries per view (a perfect square).
        resampler_heads: Cross-attention heads of the resampler; 0 means ``output_dim // 128``.
        lora_slots: Number of per-window adapter sets (one per window position).
        lora_rank_attn: Rank of the qkv and output-projection adapters.
        lora_rank_mlp: Rank of the parallel MLP adapter.
        lora_dropout: Dropout applied to adapter inputs during training.
        layer_norm_eps: Epsilon of every LayerNorm in the tower and resampler.
        output_scale: Fixed factor on the resampler's output (1.0 in every official model). An
            LLM trained from scratch starts with token embeddings of norm ~0.3 while the
            resampler emits tokens of norm ~16; visual tokens that dwarf the updates the LLM
            layers add to them make the fresh LLM much slower to learn to tell them apart (the
            embedded demo uses 0.2).
        connector: How a view's patch features become LLM tokens: ``resampler`` (Monkey's:
            ``n_queries`` tokens a view) or ``mlp`` (LLaVA's two-layer projector: one token per
            patch, or per ``pixel_shuffle x pixel_shuffle`` patches).
        pixel_shuffle: Side of the patch squares the ``mlp`` connector folds into one token.
        encoder: A transformers vision encoder instead of the Qwen-VL ViT; ``patch_size``,
            ``width``, ``layers`` and ``heads`` then mirror its configuration.

    Whether the ViT blocks are recomputed in backward is a training setting, not part of the
    model (``train.gradient_checkpointing``; ``VisionTower.gradient_checkpointing``).
    """

    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    pos_grid: int = 16
    output_dim: int = 4096
    n_queries: int = 256
    resampler_heads: int = 0
    lora_slots: int = 4
    lora_rank_attn: int = 16
    lora_rank_mlp: int = 32
    lora_dropout: float = 0.05
    layer_norm_eps: float = 1e-6
    output_scale: float = 1.0
    connector: str = "resampler"
    pixel_shuffle: int = 1
    encoder: EncoderConfig | None = None

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_resampler_heads(self) -> int:
        return self.resampler_heads or max(1, self.output_dim // 128)


@dataclass
class ImageConfig:
    """How one image becomes views.

    The image is resized to ``(grid[0] * window_size, grid[1] * window_size)`` and cut into
    ``grid[0] x grid[1]`` windows in row-major order; window ``k`` uses adapter slot ``k``.
    The optional global view (the whole image at ``window_size``) comes last and uses no adapter.
    ``grid = [0, 0]`` means no windows: a single global view (the Qwen-VL layout).

    Attributes:
        grid: ``[rows, cols]`` of windows.
        window_size: Side of every view in pixels.
        global_view: Whether to append the whole-image view.
        resize_mode: ``stretch`` (official: distorts non-square images), ``crop`` (resize the
            shorter side and centre-crop) or ``pad`` (letterbox on the mean colour).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        max_pixels: Images with more pixels are refused from the header, before decoding
            (decompression-bomb guard; default Pillow's warning threshold, about 89.5M).
    """

    grid: list[int] = field(default_factory=lambda: [2, 2])
    window_size: int = 448
    global_view: bool = True
    resize_mode: str = "stretch"
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def num_windows(self) -> int:
        return int(self.grid[0]) * int(self.grid[1])

    @property
    def num_views(self) -> int:
        return self.num_windows + int(self.global_view)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the views cannot be made (the one check
        of an image layout: the model config and the image processor both call it)."""
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"image.resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if len(self.grid) != 2 or any(not isinstance(g, int) or isinstance(g, bool) or g < 0 for g in self.grid):
            raise ValueError(f"image.grid must be two integers >= 0, got {self.grid!r}")
        if (self.grid[0] == 0) != (self.grid[1] == 0):
            raise ValueError(f"image.grid {self.grid}: use [0, 0] for no windows, not a half-empty grid")
        if not isinstance(self.window_size, int) or isinstance(self.window_size, bool) or self.window_size < 1:
            raise ValueError(f"image.window_size must be an integer >= 1, got {self.window_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"image.mean and image.std need 3 values, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"image.std must be positive, got {self.std}")
        if self.num_views == 0:
            raise ValueError("image.grid is [0, 0] and image.global_view is false: no views")

    @property
    def canvas_size(self) -> tuple[int, int]:
        """(height, width) the image is resized to before cutting windows."""
        if self.num_windows == 0:
            return (self.window_size, self.window_size)
        return (self.grid[0] * self.window_size, self.grid[1] * self.window_size)


@dataclass
class LLMConfig:
    """Causal LM sizes (a transformers ``Qwen2ForCausalLM`` in the Qwen-7B layout by default).

    ``hf_config`` (a composed model) holds any transformers causal LM's configuration as a dict,
    which ``AutoModelForCausalLM.from_config`` builds; the sizes then mirror it.
    Activation checkpointing is a training setting (``train.gradient_checkpointing``), not stored.
    """

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    hf_config: dict[str, Any] | None = None


# Sizes a config.json may state, with their smallest sensible values (anything smaller builds a
# broken model, or fails deep inside torch with an unhelpful message).
_MIN_VISION = {"patch_size": 1, "width": 1, "layers": 0, "heads": 1, "pos_grid": 1, "output_dim": 1,
               "n_queries": 1, "resampler_heads": 0, "lora_slots": 0, "lora_rank_attn": 1, "lora_rank_mlp": 1}
_MIN_LLM = {"hidden_size": 1, "num_layers": 0, "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 1,
            "vocab_size": 1, "max_position_embeddings": 1}
_SECTION_NAME = {VisionConfig: "vision", ImageConfig: "image", LLMConfig: "llm"}
# Runtime flags that folders saved before they became training settings still carry in their
# model config; they never changed the weights, so they are dropped on reading.
_RUNTIME_KEYS = {"gradient_checkpointing"}


@dataclass
class ModelConfig:
    """A whole model: vision tower, view layout, LLM and the image token ids.

    The prompt carries each image as ``image_start_id``, ``tokens_per_image`` copies of
    ``image_pad_id`` and ``image_end_id``. The ids default to Qwen's ``<img>``, ``</img>`` and
    ``<imgpad>``.
    """

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_start_id: int = 151857
    image_end_id: int = 151858
    image_pad_id: int = 151859

    @property
    def composed(self) -> bool:
        """Whether the model is composed from a transformers vision encoder and causal LM."""
        return self.vision.encoder is not None

    @property
    def tokens_per_view(self) -> int:
        """Visual tokens of one view: the resampler's queries, or the ``mlp`` connector's
        (folded) patches plus any kept class tokens."""
        v = self.vision
        if v.connector == "resampler":
            return v.n_queries
        side = self.image.window_size // v.patch_size // v.pixel_shuffle
        return side * side + int(v.encoder is not None and v.encoder.keep_cls)

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one image occupies in the prompt: views x tokens per view."""
        return self.image.num_views * self.tokens_per_view

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field when the sizes do not fit together."""
        v, im, llm = self.vision, self.image, self.llm
        im.validate()
        for section, at_least in ((v, _MIN_VISION), (llm, _MIN_LLM)):
            for name, low in at_least.items():
                value = getattr(section, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ValueError(f"{_SECTION_NAME[type(section)]}.{name} must be an integer >= {low}, got {value!r}")
        if v.output_dim != llm.hidden_size:
            raise ValueError(
                f"vision.output_dim ({v.output_dim}) must equal llm.hidden_size ({llm.hidden_size})"
            )
        if im.num_windows > v.lora_slots and v.lora_slots > 0:
            raise ValueError(
                f"image.grid {im.grid} has {im.num_windows} windows but vision.lora_slots is "
                f"{v.lora_slots}: every window position needs its own adapter slot. Raise "
                "vision.lora_slots (new slots start as zero adapters) or use a smaller grid."
            )
        if im.window_size % v.patch_size:
            raise ValueError(
                f"image.window_size ({im.window_size}) must be a multiple of "
                f"vision.patch_size ({v.patch_size})"
            )
        self._validate_connector()
        q = int(round(v.n_queries**0.5))
        if q * q != v.n_queries:
            raise ValueError(f"vision.n_queries ({v.n_queries}) must be a perfect square")
        if not v.output_scale > 0:
            raise ValueError(f"vision.output_scale must be positive, got {v.output_scale}")
        if v.width % v.heads:
            raise ValueError(f"vision.width ({v.width}) must be divisible by vision.heads ({v.heads})")
        if v.output_dim % v.num_resampler_heads:
            raise ValueError("vision.output_dim must be divisible by the resampler heads")
        if llm.hidden_size % llm.num_heads:
            raise ValueError("llm.hidden_size must be divisible by llm.num_heads")
        for name in ("image_start_id", "image_end_id", "image_pad_id"):
            if not 0 <= getattr(self, name) < llm.vocab_size:
                raise ValueError(f"{name} ({getattr(self, name)}) is outside llm.vocab_size ({llm.vocab_size})")

    def _validate_connector(self) -> None:
        v = self.vision
        if v.connector not in CONNECTORS:
            raise ValueError(f"vision.connector must be one of {CONNECTORS}, got {v.connector!r}")
        if not isinstance(v.pixel_shuffle, int) or v.pixel_shuffle < 1:
            raise ValueError(f"vision.pixel_shuffle must be an integer >= 1, got {v.pixel_shuffle!r}")
        if v.pixel_shuffle > 1 and v.connector != "mlp":
            raise ValueError("vision.pixel_shuffle applies to the mlp connector only")
        if (self.image.window_size // v.patch_size) % v.pixel_shuffle:
            raise ValueError(f"vision.pixel_shuffle ({v.pixel_shuffle}) must divide the patch grid side "
                             f"({self.image.window_size // v.patch_size})")
        if v.encoder is None:
            return
        if not v.encoder.hf_config.get("model_type"):
            raise ValueError("vision.encoder.hf_config needs a model_type")
        if v.encoder.keep_cls and (v.connector != "mlp" or v.pixel_shuffle > 1):
            raise ValueError("vision.encoder.keep_cls needs the mlp connector without pixel_shuffle")
        if v.encoder.feature_layer >= 0 or v.encoder.feature_layer < -v.layers:
            raise ValueError(f"vision.encoder.feature_layer must be in -1..-{v.layers}, got {v.encoder.feature_layer}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def matched_to_tokenizer(self, tokenizer: Any, pad_vocab_to: int = 64) -> "ModelConfig":
        """A copy whose image token ids and vocabulary fit ``tokenizer`` (for a model built fresh).

        The image ids are taken from the tokenizer, and ``llm.vocab_size`` becomes the tokenizer's
        vocabulary rounded up to a multiple of ``pad_vocab_to`` (aligned embedding tables are faster).
        A model loaded from weights must instead already agree with its tokenizer; see
        :meth:`check_tokenizer`.
        """
        vocab = -(-int(tokenizer.vocab_size) // pad_vocab_to) * pad_vocab_to
        return dataclasses.replace(
            self,
            llm=dataclasses.replace(self.llm, vocab_size=vocab),
            image_start_id=int(tokenizer.image_start_id),
            image_end_id=int(tokenizer.image_end_id),
            image_pad_id=int(tokenizer.image_pad_id),
        )

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``ValueError`` if ``tokenizer`` disagrees with this config's image ids or vocabulary."""
        for name in ("image_start_id", "image_end_id", "image_pad_id"):
            if int(getattr(tokenizer, name)) != getattr(self, name):
                raise ValueError(
                    f"tokenizer {name} is {getattr(tokenizer, name)} but the model config says {getattr(self, name)}"
                )
        if int(tokenizer.vocab_size) > self.llm.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than llm.vocab_size ({self.llm.vocab_size})"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        sections = {"vision": VisionConfig, "image": ImageConfig, "llm": LLMConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        for key, value in data.items():
            if key in sections:
                section_cls = sections[key]
                if not isinstance(value, dict):
                    raise ValueError(f"model config section {key!r} must be a mapping, got {type(value).__name__}")
                allowed = {f.name for f in dataclasses.fields(section_cls)}
                bad = set(value) - allowed - _RUNTIME_KEYS
                if bad:
                    raise ValueError(f"unknown keys in model config section {key!r}: {sorted(bad)}")
                fields = {k: v for k, v in value.items() if k in allowed}
                if key == "vision" and isinstance(fields.get("encoder"), dict):
                    fields["encoder"] = _encoder_from_dict(fields["encoder"])
                kwargs[key] = section_cls(**fields)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _encoder_from_dict(data: dict[str, Any]) -> EncoderConfig:
    bad = set(data) - {f.name for f in dataclasses.fields(EncoderConfig)}
    if bad:
        raise ValueError(f"unknown keys in model config section 'vision.encoder': {sorted(bad)}")
    return EncoderConfig(**data)


def _monkey_7b() -> ModelConfig:
    return ModelConfig(name="monkey-7b")


def _qwen_vl_7b() -> ModelConfig:
    return ModelConfig(
        name="qwen-vl-7b",
        image=ImageConfig(grid=[0, 0], window_size=448, global_view=True),
        vision=VisionConfig(lora_slots=0),
    )


def _tiny() -> ModelConfig:
    # A few million parameters. 224-pixel views with 14-pixel patches give a 16x16 patch grid,
    # which matches the learned position table exactly; 64 queries per view keep the LLM
    # sequence short (5 views -> 320 visual tokens) so forward+backward runs in about a second.
    return ModelConfig(
        name="tiny",
        vision=VisionConfig(
            patch_size=14,
            width=96,
            layers=3,
            heads=4,
            mlp_ratio=4.0,
            output_dim=128,
            n_queries=64,
            resampler_heads=4,
            lora_slots=4,
            lora_rank_attn=8,
            lora_rank_mlp=16,
        ),
        image=ImageConfig(grid=[2, 2], window_size=224, global_view=True),
        llm=LLMConfig(
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=344,
            vocab_size=1024,
            max_position_embeddings=4096,
        ),
        image_start_id=1021,
        image_end_id=1022,
        image_pad_id=1023,
    )


def _mid() -> ModelConfig:
    # A mid-size configuration for benchmarks: the real 448-pixel views and 256 queries, a
    # narrower and shallower tower and LLM so a CPU can run it.
    return ModelConfig(
        name="mid",
        vision=VisionConfig(
            width=256, layers=4, heads=4, mlp_ratio=4.0, output_dim=512, n_queries=256,
            resampler_heads=4,
        ),
        image=ImageConfig(grid=[2, 2], window_size=448, global_view=True),
        llm=LLMConfig(
            hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=1376,
            vocab_size=151936,
        ),
    )


MODEL_PRESETS = {
    "monkey-7b": _monkey_7b,
    "qwen-vl-7b": _qwen_vl_7b,
    "tiny": _tiny,
    "mid": _mid,
}


def get_config(name: str) -> ModelConfig:
    """Return a fresh copy of a named configuration (``tiny``, ``mid``, ``monkey-7b``, ``qwen-vl-7b``)."""
    try:
        return MODEL_PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}") from None
