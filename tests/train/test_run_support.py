"""check_run_support: what an engine cannot run is refused in one line before the model is built."""

from __future__ import annotations

import pytest

from monkeytune.policy.quantize import qlora_engine_reason
from monkeytune.train.setup import SetupError, check_run_support

ENGINES = ("single", "ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3")


@pytest.mark.parametrize("engine", ENGINES)
def test_llm_qlora_is_refused_under_parameter_sharding_engines(make_config, engine):
    """FSDP2 and ZeRO-3 flatten bitsandbytes' 4-bit weights and their quant state; the other engines run it."""
    cfg = make_config("qlora", policy={"preset": "llm-qlora"})
    if engine in ("fsdp2", "deepspeed-zero3"):
        with pytest.raises(SetupError) as info:
            check_run_support(cfg, engine, "cuda")
        message = str(info.value)
        assert "\n" not in message
        assert f"policy.preset llm-qlora is not supported under {engine}" in message
        assert "ddp" in message and "deepspeed-zero2" in message and "another preset" in message
    else:
        check_run_support(cfg, engine, "cuda")
    # Every other preset runs under every engine (as far as this check goes).
    check_run_support(make_config("lora", policy={"preset": "llm-lora"}), engine, "cuda")
    assert qlora_engine_reason("llm-lora", engine) is None


@pytest.mark.parametrize("engine", ENGINES)
def test_unfreezing_stages_are_refused_under_sharding_engines(make_config, engine):
    """DeepSpeed and FSDP2 fix the trainable set when they wrap the model; one process and DDP rewrap."""
    cfg = make_config("stages", policy={"preset": "monkey", "unfreeze": [{"start_step": 2,
                                                                          "rules": ["train: vision.blocks.*"]}]})
    if engine in ("fsdp2", "deepspeed-zero2", "deepspeed-zero3"):
        with pytest.raises(SetupError, match=rf"^policy.unfreeze stages need a single-process or DDP run: {engine} "
                                             "fixes the trainable set when it wraps the model$"):
            check_run_support(cfg, engine, "cpu")
    else:
        check_run_support(cfg, engine, "cpu")
