"""One run per output folder, crash leftovers, and set-up problems caught before anything is built."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from monkeytune.cli import main
from monkeytune.train import loop
from monkeytune.train.lock import RunLock, RunLockedError
from monkeytune.train.loop import train
from monkeytune.train.setup import SetupError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """A separate process that takes the run lock and sleeps (as a running training would)."""
    code = textwrap.dedent(f"""
        import sys, time
        from monkeytune.train.lock import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_with_the_holders_pid_and_a_killed_holder_does_not_block(make_config, capsys):
    cfg = make_config("shared", train={"max_steps": 1}, checkpoint={"every": 1})
    run_dir = Path(cfg.checkpoint.output_dir)
    run_dir.mkdir(parents=True)
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunLockedError, match=f"in use by another monkeytune run \\(PID {holder.pid}\\)"):
            train(cfg)
        assert not (run_dir / "metrics.jsonl").exists()  # the holder's files are untouched
        # The command line says it in one line with exit code 2.
        path = run_dir.parent / "shared.yaml"
        cfg.save(path)
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"(PID {holder.pid})" in err and "Traceback" not in err and err.count("\n") == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The lock file is still there with the dead PID, but the kernel released the lock.
    assert RunLock(run_dir).holder() == holder.pid
    result = train(cfg)
    assert result.steps == 1


def test_the_lock_is_released_when_a_run_ends_or_fails(make_config):
    cfg = make_config("again", train={"max_steps": 1})
    train(cfg)
    with RunLock(cfg.checkpoint.output_dir):  # free after a finished run
        pass

    def boom(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_config("again2", train={"max_steps": 2}), on_step=boom)
    with RunLock(make_config("again2").checkpoint.output_dir):  # free after an interrupted one
        pass


def test_leftover_temporary_folders_are_removed_on_resume_without_periodic_checkpoints(make_config):
    cfg = make_config("left", train={"max_steps": 1}, checkpoint={"every": 0, "final_save": "full"})
    run_dir = Path(cfg.checkpoint.output_dir)
    for leftover in (run_dir / ".tmp-final", run_dir / ".old-final", run_dir / "checkpoints" / ".tmp-step-00000005"):
        leftover.mkdir(parents=True)
        (leftover / "half.safetensors").write_bytes(b"\0" * 10)
    train(cfg, resume="latest")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".tmp", ".old"))) == []
    assert list((run_dir / "checkpoints").iterdir()) == []
    assert (run_dir / "final" / "config.json").is_file()


def test_a_read_only_output_folder_is_one_line(make_config, monkeypatch, capsys):
    cfg = make_config("ro", train={"max_steps": 1})
    path = Path(cfg.checkpoint.output_dir).parent / "ro.yaml"
    cfg.save(path)
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self == Path(cfg.checkpoint.output_dir):
            # The tests run as root, for whom chmod does not make a folder read-only.
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"monkeytune train: cannot write to checkpoint.output_dir {cfg.checkpoint.output_dir}: Read-only file system\n"


def test_a_model_too_large_for_memory_is_refused_before_building(make_config, micro_model, monkeypatch):
    from monkeytune import model as model_pkg

    micro_model["llm"]["num_layers"] = 10_000_000

    def no_build(config):
        raise AssertionError("the model was built before the size check")

    monkeypatch.setattr(model_pkg, "build_model", no_build)
    with pytest.raises(SetupError, match=r"^model: the model config describes about \d\.\d+e\+11 parameters "
                                         r"\([\d,.]+ GiB at 4 bytes each\), more than this machine's memory"):
        train(make_config("huge", model={"config": micro_model}))


def test_config_mistakes_stop_before_anything_is_printed_or_built(make_config, micro_model, tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    make_config("typo").save(path)
    assert main(["train", str(path), "--model.preset", "tinny", "--model.config", "null"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the resolved configuration is not printed
    assert captured.err == (f"monkeytune train: {path}: model.preset: unknown preset 'tinny' (did you mean tiny?); "
                            "known: mid, monkey-7b, qwen-vl-7b, tiny\n")
    for override, message in ((["--optim.eps", "0"], "optim.eps must be > 0, got 0.0"),
                              (["--optim.lr", ".inf"], "optim.lr must be a finite number, got inf"),
                              (["--optim.lr", "nan"], "optim.lr must be a finite number, got nan")):
        assert main(["train", str(path), *override]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == f"monkeytune train: {path}: {message}\n"
    micro_model["llm"]["num_layers"] = -2
    bad = make_config("typo").to_dict()
    bad["model"]["config"] = micro_model
    import yaml

    path.write_text(yaml.safe_dump(bad))
    assert main(["train", str(path)]) == 2
    assert "model.config: llm.num_layers must be an integer >= 0, got -2" in capsys.readouterr().err
