"""optim.name: bitsandbytes' 8-bit AdamW trains and resumes exactly; what cannot run is refused in one line."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from monkeytune.train.config import ConfigError
from monkeytune.train.loop import train
from monkeytune.train.metrics import read_metrics
from monkeytune.train.optim import optimizer_unavailable_reason
from monkeytune.train.setup import SetupError

# Looked up, not imported: every pytest worker collects this file, and bitsandbytes takes 3 s to import.
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the quant extra)"),
    # bitsandbytes' own use of a deprecated torch API, raised when a test first imports it.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


class Interrupt(Exception):
    pass


def test_unknown_optimizer_name_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match=r"optim.name must be one of \['adamw_torch', 'adamw_bnb_8bit', "
                       r"'paged_adamw_8bit'\], got 'adamw8bit'"):
        make_config(optim={"name": "adamw8bit"})


def test_8bit_adamw_trains_a_run(make_config):
    cfg = make_config("eight", optim={"name": "adamw_bnb_8bit"}, train={"max_steps": 4})
    result = train(cfg)
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_8bit_adamw_state_is_8bit_for_large_tensors():
    from monkeytune.train.config import OptimSection
    from monkeytune.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    opt = build_optimizer(model, OptimSection(name="adamw_bnb_8bit", lr=1e-3), {}, [], include_frozen=False)
    import bitsandbytes as bnb

    assert isinstance(opt, bnb.optim.AdamW8bit)
    model(torch.randn(4, 128)).square().sum().backward()
    opt.step()
    big, small = opt.state[model[0].weight], opt.state[model[1].weight]
    assert big["state1"].dtype == torch.uint8 and big["absmax1"].numel() == 128 * 64 // 256
    assert small["state1"].dtype == torch.float32  # under bitsandbytes' min_8bit_size (4096)
    # Decay per group: the LayerNorm's group has none, as with torch's AdamW.
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]


def test_resume_with_8bit_states_is_exact(make_config):
    sections = dict(optim={"name": "adamw_bnb_8bit"}, train={"max_steps": 5, "micro_batch_size": 6},
                    checkpoint={"every": 2, "keep_last": 1})
    ref = train(make_config("ref8", **sections))
    cfg = make_config("cut8", **sections)

    def stop(row):
        if row["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, on_step=stop)
    state = torch.load(f"{cfg.checkpoint.output_dir}/checkpoints/step-00000002/optimizer.pt", weights_only=False)
    kinds = {t.dtype for s in state["state"].values() for t in s.get("__bnb_optimizer_quant_state__", {}).values()}
    assert torch.uint8 in kinds  # the checkpoint holds the 8-bit moments themselves
    resumed = train(cfg, resume="latest")
    assert resumed.steps == 5 and len(resumed.losses) == 3
    ref_rows = read_metrics(ref.run_dir / "metrics.jsonl")
    cut_rows = read_metrics(resumed.run_dir / "metrics.jsonl")
    assert [r["loss"] for r in cut_rows] == [r["loss"] for r in ref_rows]
    ref_params = dict(ref.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n


def test_resume_refuses_another_optimizer(make_config):
    from monkeytune.train.checkpoint import CheckpointError

    train(make_config("swap", train={"max_steps": 1}, checkpoint={"every": 1}))
    with pytest.raises(CheckpointError, match="optim.name: 'adamw_torch' -> 'adamw_bnb_8bit'"):
        train(make_config("swap", optim={"name": "adamw_bnb_8bit"}, train={"max_steps": 2}), resume="latest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="paged optimizers run on a CUDA GPU")
def test_paged_without_cuda_is_refused_in_one_line(make_config, tmp_path, capsys):
    from monkeytune.cli import main

    cfg = make_config("paged", optim={"name": "paged_adamw_8bit"}, train={"max_steps": 1})
    with pytest.raises(SetupError, match="paged_adamw_8bit pages its states through CUDA unified memory and needs "
                       "a CUDA GPU \\(this run is on cpu\\); use adamw_bnb_8bit"):
        train(cfg)
    path = tmp_path / "paged.yaml"
    cfg.save(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "paged_adamw_8bit" in err and "Traceback" not in err


def test_sharded_engines_and_missing_bitsandbytes_are_refused(monkeypatch):
    for engine in ("fsdp2", "deepspeed-zero2", "deepspeed-zero3"):
        reason = optimizer_unavailable_reason("adamw_bnb_8bit", engine, "cuda")
        assert reason and f"not supported under {engine}" in reason and "adamw_torch" in reason
    assert optimizer_unavailable_reason("adamw_bnb_8bit", "ddp", "cpu") is None
    assert optimizer_unavailable_reason("paged_adamw_8bit", "single", "cuda") is None
    assert optimizer_unavailable_reason("adamw_torch", "fsdp2", "cpu") is None
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an installation without it looks like
    reason = optimizer_unavailable_reason("adamw_bnb_8bit", "single", "cpu")
    assert reason.startswith("optim.name adamw_bnb_8bit needs the bitsandbytes package, which is not installed")


def test_adamw_is_fused_only_when_every_parameter_is_on_a_gpu():
    from monkeytune.train.optim import use_fused_adamw

    cpu = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert not use_fused_adamw(cpu) and not use_fused_adamw([{"params": []}])
    if torch.cuda.is_available():
        gpu = [{"params": [torch.nn.Parameter(torch.zeros(2, device="cuda"))]}]
        assert use_fused_adamw(gpu) and not use_fused_adamw(gpu + cpu)
