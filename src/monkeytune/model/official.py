"""Official Monkey / Qwen-VL checkpoint folders: reading them and writing them back.

An official folder (echo840/Monkey, echo840/Monkey-Chat, Qwen/Qwen-VL, Qwen/Qwen-VL-Chat) holds
``config.json`` (``model_type`` ``monkey`` or ``qwen`` and a ``visual`` block), weights as
``pytorch_model*.bin`` or ``*.safetensors`` (single or sharded with an ``*.index.json``), and
``qwen.tiktoken``. No code shipped with the checkpoint is run: ``.bin`` files are read with
``torch.load(weights_only=True)``, which refuses pickles that would run code.

Config mapping (official -> :class:`~monkeytune.config.ModelConfig`):

* ``visual.image_size`` S: Monkey cuts S x S into 448-pixel windows, so ``grid = [S/448, S/448]``,
  ``window_size = 448``, plus the global view; Qwen-VL (``model_type: qwen``) is one 448 view,
  ``grid = [0, 0]``, no adapters.
* ``visual.lora_repeat_num`` -> ``vision.lora_slots`` (official default 4); adapter ranks come
  from the tensors (official: 16 for attention, 32 for the MLP).
* ``intermediate_size`` is stored doubled in the official config (``w1``/``w2`` are each half).
* ``visual.image_start_id`` -> ``<img>``; ``</img>`` and ``<imgpad>`` follow it.
* ``seq_length``, ``use_dynamic_ntk``, ``use_logn_attn`` install the inference behaviour of
  :mod:`monkeytune.model.qwen_compat`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monkeytune.config import CLIP_MEAN, CLIP_STD, ImageConfig, LLMConfig, ModelConfig, VisionConfig
from monkeytune.model.assembly import build_on_meta, check_size, finish_model
from monkeytune.model.folder import MODEL_CONFIG_FILE, load_tokenizer_if_any, read_json_object
from monkeytune.model.weights import (
    DEFAULT_SHARD_BYTES,
    ModelFolderError,
    assign_state_dict,
    iter_tensors,
    unique_state_dict,
    write_tensors,
)
from monkeytune.model.official_names import V, NameMapError, from_official, to_official
from monkeytune.model.qwen_compat import CompatConfig, get_compat

WINDOW = 448  # the official Monkey code hard-codes 448-pixel windows
OFFICIAL_DEFAULTS: dict[str, Any] = {
    # Values the official QWenConfig uses when config.json leaves them out.
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "kv_channels": 128,
    "rotary_pct": 1.0,
    "no_bias": True,
    "max_position_embeddings": 8192,
    "seq_length": 2048,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "tie_word_embeddings": False,
}
# Fields of the official config that monkeytune does not use, written when exporting a model that
# did not come from an official folder.
FRESH_EXTRAS: dict[str, Any] = {
    "attn_dropout_prob": 0.0,
    "emb_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "use_cache": True,
    "use_flash_attn": "auto",
    "tokenizer_type": "QWenTokenizer",
}
_MISSING = object()
LLM_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
VISUAL_REQUIRED = ("image_size", "width", "layers", "heads", "mlp_ratio", "patch_size", "output_dim", "image_start_id")


def _field(cfg: dict, key: str, where: str, kind=(int, float)):
    if key not in cfg:
        raise ModelFolderError(f"{where}: missing field {key!r}")
    value = cfg[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ModelFolderError(f"{where}: field {key!r} has the wrong type ({value!r})")
    return value


def config_from_official(
    cfg: dict[str, Any], where: str, tensors: dict[str, torch.Tensor] | None = None
) -> tuple[ModelConfig, CompatConfig]:
    """Translate an official ``config.json`` (parsed) into a model config and the Qwen flags.

    Args:
        cfg: The parsed official config.
        where: The file, for error messages.
        tensors: The checkpoint's tensors, to read adapter ranks and the position-table size.

    Raises:
        ModelFolderError: a missing or ill-typed field, or a feature Qwen2 cannot express.
    """
    tensors = tensors or {}
    g = {**OFFICIAL_DEFAULTS, **cfg}
    for key in LLM_REQUIRED:
        _field(g, key, where, int)
    visual = cfg.get("visual")
    if not isinstance(visual, dict):
        raise ModelFolderError(f"{where}: missing field 'visual' (the vision tower's settings)")
    for key in VISUAL_REQUIRED:
        _field(visual, key, f"{where} (visual)", (int, float, list) if key == "image_size" else (int, float))
    hidden, heads = g["hidden_size"], g["num_attention_heads"]
    if g["kv_channels"] * heads != hidden:
        raise ModelFolderError(
            f"{where}: kv_channels ({g['kv_channels']}) x num_attention_heads ({heads}) != hidden_size ({hidden})"
        )
    if float(g["rotary_pct"]) != 1.0:
        raise ModelFolderError(
            f"{where}: rotary_pct {g['rotary_pct']} is not supported (only 1.0, rotary on the whole head)"
        )
    if not g["no_bias"]:
        raise ModelFolderError(f"{where}: no_bias=false (biases on c_proj/w1/w2) is not supported by the Qwen2 layout")
    if g["intermediate_size"] % 2:
        raise ModelFolderError(f"{where}: intermediate_size {g['intermediate_size']} must be even (it holds w1 + w2)")

    model_type = cfg.get("model_type") or ("monkey" if "lora_repeat_num" in visual else "qwen")
    size = visual["image_size"]
    side = size if isinstance(size, (int, float)) else size[0]
    if isinstance(size, list) and (len(size) != 2 or size[0] != size[1]):
        raise ModelFolderError(f"{where}: visual.image_size {size} must be square")
    if model_type == "monkey":
        if side % WINDOW:
            raise ModelFolderError(f"{where}: visual.image_size {side} is not a multiple of the {WINDOW}-pixel windows")
        n = int(side) // WINDOW
        image = ImageConfig(grid=[n, n], window_size=WINDOW, global_view=True, resize_mode="stretch")
        slots = int(visual.get("lora_repeat_num", 4))
    else:
        image = ImageConfig(grid=[0, 0], window_size=int(side), global_view=True, resize_mode="stretch")
        slots = 0
    image.mean, image.std = list(CLIP_MEAN), list(CLIP_STD)

    def rank(key: str, default: int) -> int:
        t = tensors.get(f"{V}transformer.resblocks.0.{key}.0.lora_a.weight")
        return int(t.shape[0]) if t is not None else default

    pos = tensors.get(V + "positional_embedding")
    pos_grid = int(round(math.sqrt(pos.shape[0]))) if pos is not None else 16
    output_dim = int(visual["output_dim"])
    vision = VisionConfig(
        patch_size=int(visual["patch_size"]),
        width=int(visual["width"]),
        layers=int(visual["layers"]),
        heads=int(visual["heads"]),
        mlp_ratio=float(visual["mlp_ratio"]),
        pos_grid=pos_grid,
        output_dim=output_dim,
        n_queries=int(visual.get("n_queries", 256)),
        resampler_heads=max(1, output_dim // 128),
        lora_slots=slots,
        lora_rank_attn=rank("attn.in_proj_lora", 16),
        lora_rank_mlp=rank("mlp_lora", 32),
        layer_norm_eps=1e-6,
    )
    llm = LLMConfig(
        hidden_size=hidden,
        num_layers=g["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=g["intermediate_size"] // 2,
        vocab_size=g["vocab_size"],
        rms_norm_eps=float(g["layer_norm_epsilon"]),
        rope_theta=float(g["rotary_emb_base"]),
        max_position_embeddings=int(g["max_position_embeddings"]),
        tie_word_embeddings=bool(g["tie_word_embeddings"]),
    )
    start = int(visual["image_start_id"])
    model_cfg = ModelConfig(
        name=str(cfg.get("_name_or_path") or model_type), vision=vision, image=image, llm=llm,
        image_start_id=start, image_end_id=start + 1, image_pad_id=start + 2,
    )
    try:
        model_cfg.validate()
    except ValueError as e:
        raise ModelFolderError(f"{where}: {e}") from None
    compat = CompatConfig(int(g["seq_length"]), bool(g["use_dynamic_ntk"]), bool(g["use_logn_attn"]))
    return model_cfg, compat


def official_config(directory: str | Path) -> ModelConfig:
    """The model configuration of an official folder, from its ``config.json`` alone (no weights).

    The adapter ranks and the position-table size, which the official config does not state,
    take the official defaults (ranks 16 and 32, a 16x16 table).
    """
    path = Path(directory) / MODEL_CONFIG_FILE
    return config_from_official(read_json_object(path), str(path))[0]


def load_official(directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load an official Monkey / Qwen-VL folder as a :class:`MonkeyForCausalLM`.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with the official inference behaviour
        installed and ``model.metadata`` recording the source config (for :func:`export_official`)
        and ``chat_format`` (``chatml`` for chat checkpoints, from ``generation_config.json``).

    Raises:
        ModelFolderError: bad config, unsafe pickle, or missing/unexpected weights (named).
    """
    directory = Path(directory)
    cfg = read_json_object(directory / MODEL_CONFIG_FILE)
    tensors = dict(iter_tensors(directory, device))
    model_cfg, compat = config_from_official(cfg, str(directory / MODEL_CONFIG_FILE), tensors)
    check_size(model_cfg, directory / MODEL_CONFIG_FILE)
    try:
        ours = from_official(tensors, model_cfg, str(directory))
    except NameMapError as e:
        raise ModelFolderError(str(e)) from None
    model = build_on_meta(model_cfg)
    tied = {"llm.lm_head.weight": "llm.model.embed_tokens.weight"} if model_cfg.llm.tie_word_embeddings else {}
    if tied and "lm_head.weight" not in tensors:
        ours.pop("llm.lm_head.weight", None)
    assign_state_dict(model, ours, where=str(directory), allow_missing=tied)
    metadata: dict[str, Any] = {
        "source": "official",
        "official_model_type": cfg.get("model_type", "monkey" if model_cfg.vision.lora_slots else "qwen"),
        "official_config": cfg,
        "qwen_compat": compat.to_dict(),
    }
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        gen = read_json_object(gen_path)
        metadata["official_generation_config"] = gen
        if gen.get("chat_format"):
            metadata["chat_format"] = gen["chat_format"]
    model = finish_model(model, dtype, device, metadata)
    return model, load_tokenizer_if_any(directory)


def config_to_official(model: nn.Module, model_type: str, dtype: torch.dtype) -> dict[str, Any]:
    """The official ``config.json`` for a model (starting from the source config when it has one).

    Raises:
        ValueError: naming the setting the official code cannot express.
    """
    cfg: ModelConfig = model.config
    v, im, llm = cfg.vision, cfg.image, cfg.llm
    problems = []
    if model_type not in ("monkey", "qwen"):
        problems.append(f"model_type must be 'monkey' or 'qwen', got {model_type!r}")
    if model_type == "monkey":
        if im.window_size != WINDOW or im.grid[0] != im.grid[1] or im.num_windows == 0:
            problems.append(
                f"official Monkey needs a square grid of {WINDOW}-pixel windows "
                f"(image.grid {im.grid}, window {im.window_size})"
            )
        if v.lora_slots < im.num_windows:
            problems.append("vision.lora_slots is smaller than the number of windows")
    elif model_type == "qwen" and (im.num_windows or v.lora_slots):
        problems.append(
            "official Qwen-VL has a single view and no window adapters "
            "(image.grid must be [0, 0], vision.lora_slots 0)"
        )
    if not im.global_view or im.resize_mode != "stretch":
        problems.append(
            "official code always adds the global view and stretches "
            "(image.global_view true, image.resize_mode stretch)"
        )
    if v.num_resampler_heads != max(1, v.output_dim // 128) or v.pos_grid != 16 or v.layer_norm_eps != 1e-6:
        problems.append(
            "official code fixes resampler heads = output_dim // 128, a 16x16 position table and LayerNorm eps 1e-6"
        )
    if llm.num_kv_heads != llm.num_heads:
        problems.append("official Qwen has no grouped-query attention (llm.num_kv_heads must equal llm.num_heads)")
    if (cfg.image_end_id, cfg.image_pad_id) != (cfg.image_start_id + 1, cfg.image_start_id + 2):
        problems.append("official code needs image_end_id = image_start_id + 1 and image_pad_id = image_start_id + 2")
    if problems:
        raise ValueError("cannot export to the official layout: " + "; ".join(problems))

    compat = get_compat(model) or CompatConfig()
    meta = getattr(model, "metadata", {}) or {}
    out = dict(meta.get("official_config") or {})
    base_visual = dict(out.get("visual") or {})
    side = WINDOW * im.grid[0] if model_type == "monkey" else im.window_size
    visual = {
        "heads": v.heads, "image_size": side, "image_start_id": cfg.image_start_id, "layers": v.layers,
        "mlp_ratio": v.mlp_ratio, "output_dim": v.output_dim, "patch_size": v.patch_size, "width": v.width,
    }
    if model_type == "monkey":
        visual["lora_repeat_num"] = v.lora_slots
    if v.n_queries != 256 or "n_queries" in base_visual:
        visual["n_queries"] = v.n_queries
    flags = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16, "fp32": dtype == torch.float32}
    fresh = {
        "architectures": ["MonkeyLMHeadModel" if model_type == "monkey" else "QWenLMHeadModel"],
        "model_type": model_type,
        "hidden_size": llm.hidden_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "kv_channels": llm.hidden_size // llm.num_heads,
        "intermediate_size": 2 * llm.intermediate_size,
        "vocab_size": llm.vocab_size,
        "layer_norm_epsilon": llm.rms_norm_eps,
        "rotary_emb_base": llm.rope_theta,
        "rotary_pct": 1.0,
        "max_position_embeddings": llm.max_position_embeddings,
        "no_bias": True,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **compat.to_dict(),
        **flags,
    }
    if not out:
        out = {**FRESH_EXTRAS, "auto_map": _auto_map(model_type)}
    # Keep the source's own spelling (10000 vs 10000.0) where the value is unchanged.
    for key, value in fresh.items():
        old = out.get(key, _MISSING)
        if old is _MISSING or old != value or isinstance(old, bool) != isinstance(value, bool):
            out[key] = value
    for key, value in visual.items():
        if base_visual.get(key) != value:
            base_visual[key] = value
    out["visual"] = base_visual
    return out


def export_official(
    model: nn.Module,
    directory: str | Path,
    model_type: str | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    safe_serialization: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a model in the official layout (names, shapes, ``config.json``) for the official code.

    The folder holds weights, ``config.json``, the tokenizer vocabulary (``qwen.tiktoken``) and,
    when the source had one, ``generation_config.json``. The official Python files
    (``modeling_*.py`` ...) are not written: copy them from the official repository to run it.

    Args:
        model: The model.
        directory: Output folder.
        model_type: ``monkey`` or ``qwen``; default: the source's, else ``monkey`` when the model
            has windows and ``qwen`` when not.
        tokenizer: Saved beside the weights (must have ``save(dir)``).
        dtype: Cast floating tensors; None keeps the model's dtype.
        safe_serialization: ``model.safetensors`` when true, ``pytorch_model.bin`` when false.
        max_shard_bytes: Shard size limit.

    Returns:
        The folder.
    """
    meta = getattr(model, "metadata", {}) or {}
    if model_type is None:
        model_type = meta.get("official_model_type") or ("monkey" if model.config.image.num_windows else "qwen")
    state, _ = unique_state_dict(model)
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    if model.config.llm.tie_word_embeddings and "llm.lm_head.weight" not in state:
        state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"]
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    main_dtype = dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
    config = config_to_official(model, model_type, main_dtype)
    tensors = to_official(state, model.config)
    if model.config.llm.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_name = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    write_tensors(tensors, directory, weights_name, max_shard_bytes)

    def write_json(name: str, data: dict[str, Any]) -> None:
        (directory / name).write_text(json.dumps(data, indent=2) + "\n")

    write_json(MODEL_CONFIG_FILE, config)
    if "official_generation_config" in meta:
        write_json("generation_config.json", meta["official_generation_config"])
    if tokenizer is not None:
        tokenizer.save(directory)
        if (directory / "qwen.tiktoken").is_file():
            write_json("special_tokens_map.json", {"pad_token": "<|endoftext|>"})
            write_json("tokenizer_config.json", {
                "model_max_length": compat_len(model),
                "padding_side": "right",
                "tokenizer_class": "QWenTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            })
    return directory


def _auto_map(model_type: str) -> dict[str, str]:
    model_class = "modeling_monkey.MonkeyLMHeadModel" if model_type == "monkey" else "modeling_qwen.QWenLMHeadModel"
    return {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": model_class}


def compat_len(model: nn.Module) -> int:
    compat = get_compat(model)
    return compat.seq_length if compat else 2048
