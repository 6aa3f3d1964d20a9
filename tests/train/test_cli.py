"""``monkeytune train``: overrides, exit codes, the shipped CPU example."""

from __future__ import annotations

from pathlib import Path

from monkeytune.cli import main
from monkeytune.cli.train import split_flags
from monkeytune.model.io import load_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_flags_are_separated_from_overrides():
    assert split_flags(["--resume", "--train.seed", "3"]) == ("latest", False, ["--train.seed", "3"], False)
    assert split_flags(["--resume", "runs/x/checkpoints/step-00000010", "--print-config"]) == (
        "runs/x/checkpoints/step-00000010", True, [], False)
    assert split_flags(["--resume=latest"]) == ("latest", False, [], False)
    assert split_flags(["--resume", "--resume-changed"]) == ("latest", False, [], True)
    assert split_flags(["--resume-changed", "--resume", "ck"]) == ("ck", False, [], True)


def test_cli_trains_prints_and_reports_errors(make_config, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    make_config("cli", checkpoint={"final_save": "full"}).save(path)
    assert main(["train", str(path), "--print-config", "--optim.lr", "2e-3"]) == 0
    assert "lr: 0.002" in capsys.readouterr().out

    assert main(["train", str(path), "--train.max_step", "1"]) == 2
    assert "train.max_step: unknown key (did you mean train.max_steps?)" in capsys.readouterr().err

    assert main(["train", str(path), "--train.max_steps", "2", "--checkpoint.every", "1"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out
    model, tokenizer = load_model(tmp_path / "cli" / "final")
    assert tokenizer is not None and model.config.name == "micro"
    # Resuming a finished run with a longer schedule continues from its last checkpoint.
    assert main(["train", str(path), "--train.max_steps", "3", "--resume"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out


def test_tiny_cpu_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes its data and run under ./runs
    code = main(["train", str(EXAMPLES / "tiny-cpu.yaml"), "--data.synthetic", "6", "--train.max_steps", "1",
                 "--train.micro_batch_size", "2", "--train.grad_accum", "1", "--log.progress", "false",
                 "--checkpoint.final_save", "none"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "runs" / "tiny-cpu" / "metrics.jsonl").is_file()
    assert (tmp_path / "runs" / "tiny-cpu" / "loss.png").is_file()


def test_cli_refuses_llm_qlora_under_fsdp2_in_one_line(make_config, tmp_path, capsys, monkeypatch):
    """The engine is faked (no processes): the refusal comes before the model is built, as exit code 2."""
    import importlib

    loop = importlib.import_module("monkeytune.train.loop")  # the package's `train` attribute is the function
    monkeypatch.setattr(loop, "engine_of", lambda accelerator: "fsdp2")
    path = tmp_path / "qlora.yaml"
    make_config("qlora-fsdp2", policy={"preset": "llm-qlora"}).save(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "policy.preset llm-qlora is not supported under fsdp2" in err
    assert not (tmp_path / "qlora-fsdp2").exists()  # refused before the run folder is claimed
