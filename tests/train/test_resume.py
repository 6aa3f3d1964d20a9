"""An interrupted and resumed run reproduces the uninterrupted one exactly."""

from __future__ import annotations

import pytest
import torch

from monkeytune.train.checkpoint import CheckpointManager
from monkeytune.train.loop import train
from monkeytune.train.metrics import read_metrics

from .conftest import Interrupt, stop_at

SECTIONS = dict(
    policy={
        "preset": "monkey-fix-llm",
        "unfreeze": [{"start_step": 4, "rules": ["train: llm.model.layers.1.*"], "lr_multipliers": {"llm": 0.5}}],
    },
    # 48 samples in micro-batches of 7 make 7 micro-batches per epoch, so step 4's micro-batches
    # (7 and 8) straddle the epoch boundary, and step 4 also starts stage 0.
    train={"epochs": 2, "micro_batch_size": 7, "grad_accum": 2},
    checkpoint={"every": 2, "keep_last": 2},
)


def test_resume_is_exact_across_epoch_boundary_and_unfreezing(make_config):
    ref = train(make_config("ref", **SECTIONS))
    assert ref.steps == 7
    ref_params = {n: p.detach().clone() for n, p in ref.model.named_parameters()}

    cfg = make_config("cut", **SECTIONS)
    with pytest.raises(Interrupt):
        train(cfg, on_step=stop_at(3))  # newest checkpoint: step 2, before the stage and the epoch change
    ckpts = CheckpointManager(cfg.checkpoint.output_dir + "/checkpoints")
    assert ckpts.latest().name == "step-00000002"
    with pytest.raises(Interrupt):
        resumed = train(cfg, resume="latest", on_step=stop_at(5))  # crosses both; checkpoint at step 4
    assert ckpts.latest().name == "step-00000004"
    resumed = train(cfg, resume="latest")  # starts inside stage 0 and epoch 1
    assert resumed.steps == 7 and len(resumed.losses) == 3

    ref_rows = read_metrics(ref.run_dir / "metrics.jsonl")
    cut_rows = read_metrics(resumed.run_dir / "metrics.jsonl")
    assert [r["step"] for r in cut_rows] == list(range(1, 8))
    assert [r["loss"] for r in cut_rows] == [r["loss"] for r in ref_rows]
    assert [r["lr"] for r in cut_rows] == [r["lr"] for r in ref_rows]
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n
    assert [p.name for p in ckpts.checkpoints()] == ["step-00000004", "step-00000006"]  # keep_last: 2


def test_resume_refuses_a_changed_batch_size(make_config):
    cfg = make_config("a", train={"max_steps": 2, "micro_batch_size": 4}, checkpoint={"every": 1})
    train(cfg)
    changed = make_config("a", train={"max_steps": 3, "micro_batch_size": 5})
    from monkeytune.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="train.micro_batch_size"):
        train(changed, resume="latest")


def test_a_fresh_run_refuses_a_folder_with_checkpoints(make_config):
    from monkeytune.train.setup import SetupError

    cfg = make_config("used", train={"max_steps": 1}, checkpoint={"every": 1})
    train(cfg)
    with pytest.raises(SetupError, match="pass --resume to continue it"):
        train(cfg)


def test_resume_refuses_another_init_seed_unless_the_change_is_meant(make_config):
    from monkeytune.train.checkpoint import CheckpointError

    cfg = make_config("seed", train={"max_steps": 1}, checkpoint={"every": 1})
    train(cfg)
    reseeded = make_config("seed", train={"max_steps": 2}, model={"init_seed": 1})
    # Frozen weights are rebuilt from the seed: the resumed model would mix two initialisations.
    with pytest.raises(CheckpointError, match=r"model\.init_seed: 0 -> 1\. Pass --resume-changed"):
        train(reseeded, resume="latest")
    assert train(reseeded, resume="latest", accept_changes=True).steps == 2


def test_resume_refuses_a_data_file_edited_under_the_same_name(make_config, synthetic, tmp_path):
    from monkeytune.train.checkpoint import CheckpointError

    data = synthetic[0].parent / f"{tmp_path.name}.jsonl"  # beside the images it names
    lines = synthetic[0].read_text().splitlines(keepends=True)
    data.write_text("".join(lines))
    cfg = make_config("edit", data={"train": str(data)}, train={"max_steps": 1}, checkpoint={"every": 1})
    train(cfg)
    data.write_text("".join(reversed(lines)))  # same size, same name, another sample order
    longer = make_config("edit", data={"train": str(data)}, train={"max_steps": 2})
    with pytest.raises(CheckpointError, match=rf"data file {data} changed \(\d+ bytes, hash \w+ -> \d+ bytes"):
        train(longer, resume="latest")


def test_resume_lists_every_difference_and_the_cli_says_it_in_one_line(make_config, micro_model, tmp_path, capsys):
    from monkeytune.cli import main

    cfg = make_config("many", train={"max_steps": 1}, checkpoint={"every": 1})
    train(cfg)
    micro_model["llm"]["intermediate_size"] = 96
    changed = make_config("many", train={"max_steps": 2}, model={"init_seed": 5, "config": micro_model},
                          data={"padding": "max_length"}, policy={"rules": ["freeze: vision.*"]})
    path = tmp_path / "many.yaml"
    changed.save(path)
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for part in ("data.padding: 'dynamic' -> 'max_length'", "model.init_seed: 0 -> 5",
                 "policy.rules: [] -> ['freeze: vision.*']", "model config llm.intermediate_size: 128 -> 96"):
        assert part in err, part


def test_resume_refuses_a_changed_tokenizer(make_config, synthetic, tmp_path):
    import shutil

    from monkeytune.train.checkpoint import CheckpointError

    tok = tmp_path / "tok"
    shutil.copytree(synthetic[1], tok)
    cfg = make_config("tokrun", model={"tokenizer": str(tok)}, train={"max_steps": 1}, checkpoint={"every": 1})
    train(cfg)
    changed = sorted(p for p in tok.iterdir() if p.is_file())[0]
    changed.write_bytes(changed.read_bytes() + b"\n")  # still valid, no longer the same file
    with pytest.raises(CheckpointError, match=rf"tokenizer file {changed.name} changed"):
        train(make_config("tokrun", model={"tokenizer": str(tok)}, train={"max_steps": 2}), resume="latest")
