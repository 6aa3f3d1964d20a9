"""Which engine the launcher asked for, read from the environment `accelerate launch` sets."""

import pytest
import torch

from monkeytune.train.engine import EngineError, requested_engine
from monkeytune.train.setup import Loading


@pytest.mark.parametrize("env,engine", [
    ({}, "single"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "ddp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "deepspeed-zero2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "deepspeed-zero3"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}, "fsdp2"),
])
def test_requested_engine(env, engine):
    assert requested_engine(env) == engine


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ZeRO stage 1 is not supported"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, r"ZeRO stage \(unset\) is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1 is not supported"),
])
def test_engines_monkeytune_does_not_run_are_refused(env, message):
    with pytest.raises(EngineError, match=message):
        requested_engine(env)


def test_deepspeed_reduces_gradients_in_the_configured_dtype_and_refuses_another(make_config):
    # A real plugin as accelerate builds it from the shipped config; configure_engine fills it in.
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    from monkeytune.train.engine import configure_engine

    def accelerator(ds_config):
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)

    base = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    acc = accelerator(dict(base))
    configure_engine(acc, make_config())
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    acc = accelerator(dict(base))
    configure_engine(acc, make_config(train={"grad_reduce_dtype": "bf16"}))
    assert acc.state.deepspeed_plugin.deepspeed_config["communication_data_type"] == "bf16"
    with pytest.raises(EngineError, match="sets communication_data_type bf16 but train.grad_reduce_dtype is fp32"):
        configure_engine(accelerator({**base, "communication_data_type": "bf16"}), make_config())


def test_the_process_group_timeout_is_a_setting(make_config):
    from datetime import timedelta

    from monkeytune.train.engine import make_accelerator

    acc = make_accelerator(make_config(train={"ddp_timeout": 5400}))
    assert acc.init_handler.timeout == timedelta(seconds=5400)
    assert make_config().train.ddp_timeout == 7200


def test_gpu_defaults_load_with_workers_and_pinned_memory(make_config):
    from monkeytune.train.setup import configure_device

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # a device name needs no GPU
    assert configure_device(make_config(), cpu, 1) == Loading(0, False)
    before = torch.get_float32_matmul_precision()
    try:
        loading = configure_device(make_config(), gpu, 1)
        assert loading.pin_memory and 1 <= loading.num_workers <= 4
        assert torch.get_float32_matmul_precision() == "high"
        torch.set_float32_matmul_precision(before)
        assert configure_device(make_config(train={"tf32": False}), gpu, 1).pin_memory
        assert torch.get_float32_matmul_precision() == before
        assert configure_device(make_config(data={"num_workers": 0}), gpu, 2).num_workers == 0
        assert configure_device(make_config(data={"num_workers": 3}), cpu, 2).num_workers == 3
    finally:
        torch.set_float32_matmul_precision(before)
