"""FSDP2's mixed precision leaves the official rotary in fp32 (one process, a real gloo group)."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist

from monkeytune.config import get_config
from monkeytune.model import build_model
from monkeytune.model.qwen_compat import CompatConfig, apply_compat
from monkeytune.train.engine import shard_fsdp2
from monkeytune.train.step import TrainingModule


@pytest.fixture
def gloo_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def micro_compat_model():
    cfg = get_config("tiny")
    cfg.vision = dataclasses.replace(cfg.vision, layers=1, n_queries=4)
    cfg.image = dataclasses.replace(cfg.image, window_size=28)
    cfg.llm = dataclasses.replace(cfg.llm, num_layers=2)
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_compat(model.llm, CompatConfig(seq_length=16))  # as an official checkpoint loads
    return model


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_decoder_layers_receive_the_fp32_rotary_and_compute_in_the_param_dtype(gloo_group, precision):
    # The official code rotates q and k in fp32; DDP and DeepSpeed pass the compat layer's fp32
    # cos/sin through untouched, and FSDP2's input casting must not round them to bf16.
    model = micro_compat_model()
    module = shard_fsdp2(TrainingModule(model), precision)
    seen = []

    def record(layer, args, kwargs):
        cos, _ = kwargs["position_embeddings"]
        seen.append((cos.dtype, args[0].dtype if args else kwargs["hidden_states"].dtype))

    for layer in model.llm.get_decoder().layers:
        layer.register_forward_pre_hook(record, with_kwargs=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    loss = module({"input_ids": ids, "labels": ids})
    loss.backward()
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen == [(torch.float32, compute)] * 2
    assert torch.isfinite(loss)
