"""Compose a Monkey-style model from a pretrained transformers vision encoder and causal LM.

``monkeytune compose --vision DIR --llm DIR --out DIR`` (and :func:`compose`) writes a monkeytune
model folder holding:

* the encoder's and the LLM's weights as they came (the encoder's adapted linear layers gain a
  ``linear`` segment in their names: ``...q_proj.linear.weight`` beside ``...q_proj.lora.lora_a``);
* zero-initialised per-window adapters on the encoder's linear layers (Monkey's windows);
* a freshly initialised connector: Monkey's resampler or LLaVA's MLP projector;
* the embeddings of the new ``<img>`` and ``</img>`` tokens (``image_tokens``), initialised to the
  mean of the LLM's embeddings (a frozen LLM's table is not trained; see
  :class:`~monkeytune.model.MonkeyForCausalLM`);
* the LLM's tokenizer with ``<img>``, ``</img>`` and ``<imgpad>`` added;
* the configuration, with both parts' transformers configurations inside, so the source folders
  are not needed afterwards.

Folders that hold only a ``config.json`` compose too, on the meta device: the output then holds the
configuration (and the tokenizer, when there is one) without weights, which ``monkeytune inspect``
reads to plan memory for full-size pairs nobody has downloaded.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monkeytune.config import EncoderConfig, ImageConfig, LLMConfig, ModelConfig, VisionConfig
from monkeytune.model.weights import ModelFolderError, read_tensors, weight_files

logger = logging.getLogger(__name__)

# Marks a composed folder written from config-only parts (for planning; it has no weights).
NO_WEIGHTS = "no_weights"


class ComposeError(ValueError):
    """A part folder that cannot be composed; the message names the folder and the reason."""


@dataclass
class ComposeOptions:
    """How the two parts are joined (``monkeytune compose``'s options).

    Attributes:
        grid: ``[rows, cols]`` of windows (``[0, 0]``: the global view only).
        global_view: Add the whole image as a last view.
        window_size: Side of a view in pixels; None takes the encoder's native image size.
        connector: ``resampler`` (Monkey's) or ``mlp`` (LLaVA's).
        queries: The resampler's tokens per view (a perfect square).
        pixel_shuffle: The ``mlp`` connector's folding factor.
        feature_layer: The encoder's hidden state that feeds the connector (-1 last, -2 LLaVA's).
        keep_cls: Keep the encoder's class token (``mlp`` without pixel shuffle).
        adapter_targets: Encoder linear layers that get per-window adapters (default: the
            attention and MLP projections).
        lora_rank_attn, lora_rank_mlp: Adapter ranks.
        seed: Seeds the new parts' initialisation (the connector, the adapters' down
            projections), so one composition always gives the same folder.
        dtype: Weight dtype of the output; None keeps the LLM's stored dtype.
    """

    grid: list[int] = field(default_factory=lambda: [2, 2])
    global_view: bool = True
    window_size: int | None = None
    connector: str = "resampler"
    queries: int = 256
    pixel_shuffle: int = 1
    feature_layer: int = -1
    keep_cls: bool = False
    adapter_targets: list[str] | None = None
    lora_rank_attn: int = 16
    lora_rank_mlp: int = 32
    seed: int = 0
    dtype: torch.dtype | None = None


def options_from_mapping(mapping: dict[str, Any]) -> tuple[str, str, ComposeOptions]:
    """``(vision_dir, llm_dir, options)`` from a training config's ``model.compose`` mapping.

    Raises:
        ComposeError: not a mapping, ``vision`` or ``llm`` missing, or an unknown key (the known
            ones listed).
    """
    if not isinstance(mapping, dict):
        raise ComposeError(f"expected a mapping with vision and llm folders, got {type(mapping).__name__}")
    known = {f.name for f in dataclasses.fields(ComposeOptions)} - {"dtype"}
    unknown = sorted(set(mapping) - known - {"vision", "llm"})
    if unknown:
        raise ComposeError(f"unknown keys {unknown}; known: vision, llm, {', '.join(sorted(known))}")
    missing = [k for k in ("vision", "llm") if not mapping.get(k)]
    if missing:
        raise ComposeError(f"needs {' and '.join(missing)} (a folder)")
    options = ComposeOptions(**{k: v for k, v in mapping.items() if k in known})
    return str(mapping["vision"]), str(mapping["llm"]), options


def _hf_config(directory: Path, what: str):
    from transformers import AutoConfig  # noqa: PLC0415 - heavy, only when composing

    if not (directory / "config.json").is_file():
        raise ComposeError(f"--{what} {directory}: no config.json there")
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise ComposeError(f"--{what} {directory}: transformers cannot read its config.json: {e}") from None


def vision_config_of(directory: str | Path):
    """The vision encoder's transformers config in a folder: the folder's own, or the
    ``vision_config`` inside it (a CLIP or SigLIP pair, a LLaVA-family model)."""
    cfg = _hf_config(Path(directory), "vision")
    return getattr(cfg, "vision_config", None) or cfg


def _normalisation(vision_dir: Path, enc_cfg) -> tuple[list[float], list[float]] | None:
    """The encoder's image mean and std: its processor's (``preprocessor_config.json``), else its
    config's, else None (CLIP's, the default)."""
    from monkeytune.model.folder import read_json_object  # noqa: PLC0415

    path = vision_dir / "preprocessor_config.json"
    found = read_json_object(path) if path.is_file() else {}
    mean = found.get("image_mean", getattr(enc_cfg, "image_mean", None))
    std = found.get("image_std", getattr(enc_cfg, "image_std", None))
    return (list(mean), list(std)) if mean is not None and std is not None else None


def _encoder_section(vision_dir: Path, enc_cfg, options: ComposeOptions) -> tuple[VisionConfig, ImageConfig]:
    hidden, patch = enc_cfg.hidden_size, enc_cfg.patch_size
    image_size = enc_cfg.image_size if isinstance(enc_cfg.image_size, int) else enc_cfg.image_size[0]
    # The native size in whole patches (SigLIP so400m: 384 px of 14-px patches -> 27 patches, 378 px).
    window = options.window_size or image_size // patch * patch
    # DINOv2 states its MLP width as a ratio.
    mlp_ratio = enc_cfg.intermediate_size / hidden if hasattr(enc_cfg, "intermediate_size") else enc_cfg.mlp_ratio
    vision = VisionConfig(
        patch_size=patch, width=hidden, layers=enc_cfg.num_hidden_layers, heads=enc_cfg.num_attention_heads,
        mlp_ratio=float(mlp_ratio), pos_grid=image_size // patch,
        n_queries=options.queries, resampler_heads=0,
        lora_slots=(options.grid[0] * options.grid[1]), lora_rank_attn=options.lora_rank_attn,
        lora_rank_mlp=options.lora_rank_mlp, layer_norm_eps=float(getattr(enc_cfg, "layer_norm_eps", 1e-6)),
        connector=options.connector, pixel_shuffle=options.pixel_shuffle,
        encoder=EncoderConfig(hf_config=enc_cfg.to_dict(), feature_layer=options.feature_layer,
                              keep_cls=options.keep_cls, adapter_targets=list(options.adapter_targets or [])),
    )
    image = ImageConfig(grid=list(options.grid), window_size=window, global_view=options.global_view)
    norm = _normalisation(vision_dir, enc_cfg)
    return vision, image if norm is None else dataclasses.replace(image, mean=norm[0], std=norm[1])


def _llm_section(llm_cfg, vocab_size: int) -> LLMConfig:
    text = llm_cfg.get_text_config()
    hf = text.to_dict()
    hf["vocab_size"] = vocab_size
    rope = getattr(text, "rope_parameters", None) or {}
    return LLMConfig(
        hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        intermediate_size=text.intermediate_size, vocab_size=vocab_size,
        rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)), rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)), hf_config=hf,
    )


def composed_config(vision_dir: str | Path, llm_dir: str | Path, tokenizer: Any, options: ComposeOptions) -> ModelConfig:
    """The :class:`ModelConfig` of a composition, from the two folders' configs alone.

    Args:
        vision_dir, llm_dir: The part folders.
        tokenizer: The LLM's tokenizer with the image tokens added (gives their ids and the
            vocabulary the embedding table must hold), or None to take ids after the LLM's
            vocabulary (a config-only plan).
        options: How to join them.

    Raises:
        ComposeError: a folder transformers cannot read, or sizes that do not fit together.
    """
    llm_cfg = _hf_config(Path(llm_dir), "llm")
    vision, image = _encoder_section(Path(vision_dir), vision_config_of(vision_dir), options)
    vocab = llm_cfg.get_text_config().vocab_size
    if tokenizer is not None:
        ids = [int(tokenizer.image_start_id), int(tokenizer.image_end_id), int(tokenizer.image_pad_id)]
        vocab = max(vocab, int(tokenizer.vocab_size))
    else:
        ids, vocab = [vocab, vocab + 1, vocab + 2], vocab + 3
    llm = _llm_section(llm_cfg, vocab)
    vision.output_dim = llm.hidden_size
    name = f"{Path(vision_dir).name}+{Path(llm_dir).name}"
    config = ModelConfig(name=name, vision=vision, image=image, llm=llm,
                         image_start_id=ids[0], image_end_id=ids[1], image_pad_id=ids[2])
    try:
        config.validate()
    except ValueError as e:
        raise ComposeError(f"cannot compose {vision_dir} with {llm_dir}: {e}") from None
    return config


def _strip_to(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """``tensors`` renamed to ``model``'s state-dict keys: a folder may nest the encoder under a
    prefix (``vision_model.`` in a CLIP pair, ``model.vision_tower.`` in a LLaVA model)."""
    wanted = list(model.state_dict())
    first = wanted[0]
    prefixes = [k[: len(k) - len(first)] for k in tensors if k.endswith(first) and (k == first or k[-len(first) - 1] == ".")]
    for prefix in prefixes:
        found = {k: tensors[prefix + k] for k in wanted if prefix + k in tensors}
        if len(found) == len(wanted):
            return found
    raise ComposeError(f"--vision {where}: its weights do not hold the encoder's tensors (looked for {first!r} "
                       f"under any prefix, and all {len(wanted)} tensors beside it)")


def load_encoder(vision_dir: str | Path, vision: VisionConfig) -> nn.Module | None:
    """The pretrained encoder of a folder, or None when the folder holds no weights."""
    from monkeytune.vision.encoder import build_encoder  # noqa: PLC0415

    vision_dir = Path(vision_dir)
    if not weight_files_or_none(vision_dir):
        return None
    encoder = build_encoder(vision)
    # transformers' own loading first: it renames checkpoints saved under older module names
    # (DINOv2's attention.attention.query) and takes the vision half of a CLIP or SigLIP pair.
    try:
        loaded, info = type(encoder).from_pretrained(vision_dir, config=encoder.config, local_files_only=True,
                                                     output_loading_info=True, attn_implementation="sdpa")
        if not info["missing_keys"] and not info["mismatched_keys"]:
            return loaded
    except (OSError, ValueError, RuntimeError) as e:
        logger.info("%s: transformers could not load the encoder by itself (%s); reading its tensors", vision_dir, e)
    # A model holding the encoder under another prefix (a LLaVA folder's vision tower).
    tensors = _strip_to(encoder, read_tensors(vision_dir), vision_dir)
    encoder.load_state_dict(tensors, strict=True)
    return encoder


def load_llm(llm_dir: str | Path, vocab_size: int) -> nn.Module | None:
    """The pretrained causal LM of a folder with room for ``vocab_size`` tokens, or None when the
    folder holds no weights. New embedding rows are the mean of the old ones."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    llm_dir = Path(llm_dir)
    if not weight_files_or_none(llm_dir):
        return None
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype="auto")
    if llm.get_input_embeddings().weight.shape[0] < vocab_size:
        llm.resize_token_embeddings(vocab_size, mean_resizing=True)
    return llm


def llm_tokenizer(llm_dir: str | Path) -> Any:
    """The LLM folder's own tokenizer with ``<img>``, ``</img>`` and ``<imgpad>`` added, or None
    when the folder has none (a config-only folder for planning)."""
    from monkeytune.tokenizer.pretrained import PretrainedTokenizer  # noqa: PLC0415

    llm_dir = Path(llm_dir)
    if not any((llm_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return PretrainedTokenizer.from_dir(llm_dir, add_image_tokens=True)
    except (ValueError, OSError) as e:
        raise ComposeError(f"--llm {llm_dir}: cannot load its tokenizer: {e}") from None


def weight_files_or_none(directory: Path) -> list[Path]:
    """The folder's weight files; an empty list for a config-only folder."""
    try:
        return weight_files(directory)
    except ModelFolderError:
        return []


def compose(vision_dir: str | Path, llm_dir: str | Path, out: str | Path, options: ComposeOptions | None = None) -> Path:
    """Compose and write a monkeytune model folder (see the module docstring).

    Returns:
        ``out``.

    Raises:
        ComposeError: a folder that cannot be composed (named, with the reason).
    """
    from monkeytune.model import MonkeyForCausalLM  # noqa: PLC0415
    from monkeytune.model.io import save_model  # noqa: PLC0415
    options = options or ComposeOptions()
    tokenizer = llm_tokenizer(llm_dir)
    config = composed_config(vision_dir, llm_dir, tokenizer, options)
    encoder = load_encoder(vision_dir, config.vision)
    llm = load_llm(llm_dir, config.llm.vocab_size)
    metadata = {"composed_from": {"vision": str(vision_dir), "llm": str(llm_dir)}}
    if encoder is None or llm is None:
        return _write_plan(config, tokenizer, out, metadata)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        model = MonkeyForCausalLM(config, llm=llm, encoder=encoder)
    with torch.no_grad():
        table = llm.get_input_embeddings().weight
        mean = table[: llm.config.get_text_config().vocab_size].float().mean(0)
        model.image_tokens.weight.copy_(mean.expand_as(model.image_tokens.weight))
    dtype = options.dtype or table.dtype
    model.to(dtype)
    if _has_token(tokenizer, "<|im_start|>"):
        metadata["chat_format"] = "chatml"
    return save_model(model, out, tokenizer=tokenizer, metadata=metadata)


def _has_token(tokenizer: Any, token: str) -> bool:
    try:
        tokenizer.special_id(token)
    except KeyError:
        return False
    return True


def _write_plan(config: ModelConfig, tokenizer: Any, out: str | Path, metadata: dict[str, Any]) -> Path:
    """A config-only composed folder (a part had no weights): enough for ``inspect``."""
    import json  # noqa: PLC0415

    from monkeytune.model.auto import ARCHITECTURE, MODEL_TYPE  # noqa: PLC0415
    from monkeytune.model.folder import FORMAT, FORMAT_VERSION, MODEL_CONFIG_FILE, save_tokenizer  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "format": FORMAT, "version": FORMAT_VERSION,
            "model": config.to_dict(), "complete": True, NO_WEIGHTS: True, "metadata": metadata}
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    logger.warning("%s: a part folder holds no weights; wrote the configuration only (for monkeytune inspect)", out)
    return out
