"""Which engine the launcher asked for, read from the environment `accelerate launch` sets."""

import pytest

from monkeytune.train.engine import EngineError, requested_engine


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
