"""llm-qlora trains on a CPU through bitsandbytes' CPU backend: real 4-bit layers, real steps."""

from __future__ import annotations

import sys

import pytest
import torch

from monkeytune.policy import PlanError, TrainPlan, apply_plan
from monkeytune.train.loop import train
from monkeytune.train.setup import load_model_and_tokenizer

bnb = pytest.importorskip("bitsandbytes")


def four_bit(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_qlora_steps_move_lora_and_leave_the_4bit_base(make_config, precision):
    cfg = make_config(f"qlora-{precision}", policy={"preset": "llm-qlora", "lora": {"r": 4}},
                      train={"max_steps": 3, "precision": precision}, optim={"lr": 1e-2})
    # The same seed builds and quantises the same start the run begins from.
    start, _ = load_model_and_tokenizer(cfg)
    apply_plan(start, TrainPlan.from_config({"preset": "llm-qlora", "lora": {"r": 4}}))
    base = four_bit(start)
    assert len(base) == 2 * 7  # q/k/v/o and gate/up/down of both layers
    assert all(t.dtype == torch.uint8 for t in base.values())
    lora = {n: p.detach().clone() for n, p in start.named_parameters() if "lora_" in n and n.startswith("llm.")}

    result = train(cfg)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    after = dict(result.model.named_parameters())
    for n, t in base.items():
        assert isinstance(after[n], bnb.nn.Params4bit) and not after[n].requires_grad
        assert torch.equal(after[n], t), n
    moved = [n for n, t in lora.items() if not torch.equal(after[n].detach(), t)]
    assert len(moved) == len(lora)  # every LoRA A and B matrix trained


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch):
    from monkeytune.config import get_config
    from monkeytune.model import build_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an installation without it looks like
    torch.manual_seed(0)
    with pytest.raises(PlanError, match="llm-qlora needs 4-bit bitsandbytes kernels: the bitsandbytes package is "
                       "not installed .* Use preset llm-lora"):
        apply_plan(build_model(get_config("tiny")), TrainPlan("llm-qlora"))
