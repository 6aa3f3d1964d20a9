"""A model's size from its configuration alone, and the check that refuses what cannot fit before it is built."""

from __future__ import annotations

from monkeytune.config import ModelConfig

GIB = 1024**3


def estimate_parameters(config: ModelConfig) -> int:
    """The model's parameter count from its configuration alone (nothing is built).

    Exact up to LayerNorm / bias terms of the resampler's cross-attention; used to refuse a
    configuration that cannot fit before spending minutes building it.
    """
    v, llm = config.vision, config.llm
    w, m, d = v.width, v.mlp_width, v.output_dim
    block = (3 * w * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w) + 4 * w
    if v.lora_slots > 0:
        block += v.lora_slots * (v.lora_rank_attn * 4 * w + v.lora_rank_attn * 2 * w + v.lora_rank_mlp * 2 * w + 3)
    tower = 3 * v.patch_size**2 * w + v.pos_grid**2 * w + 2 * w + v.layers * block
    resampler = v.n_queries * d + (w * d if w != d else 0) + 4 * (d * d + d) + 6 * d + d * d
    h = llm.hidden_size
    kv = llm.num_kv_heads * (h // max(llm.num_heads, 1))
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * llm.intermediate_size + 2 * h
    embeddings = llm.vocab_size * h * (1 if llm.tie_word_embeddings else 2)
    return tower + resampler + llm.num_layers * layer + embeddings + h


def memory_capacity() -> int:
    """Bytes of host memory plus the memory of every visible GPU."""
    import os

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        import torch

        if torch.cuda.is_available():
            total += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a broken CUDA set-up only means the GPUs are not counted
        pass
    return total


def check_fits_in_memory(config: ModelConfig, bytes_per_param: int = 2) -> int:
    """Refuse a configuration whose weights alone exceed this machine's memory.

    Args:
        config: The model configuration (e.g. read from a folder's ``config.json``).
        bytes_per_param: 2 when loading (the smallest dtype a model is used in), 4 for fp32
            training.

    Returns:
        The estimated parameter count.

    Raises:
        ValueError: stating the count, the bytes it needs and the memory available.
    """
    count = estimate_parameters(config)
    need, have = count * bytes_per_param, memory_capacity()
    if need > have:
        raise ValueError(
            f"the model config describes about {count:.3g} parameters ({need / GIB:,.1f} GiB at {bytes_per_param} "
            f"bytes each), more than this machine's memory ({have / GIB:,.1f} GiB)"
        )
    return count

