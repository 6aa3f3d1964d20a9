"""Experiment trackers through accelerate: TensorBoard files read back, missing packages refused at start."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import yaml

from monkeytune.cli import main
from monkeytune.train import loop
from monkeytune.train.config import ConfigError
from monkeytune.train.config_load import load_config
from monkeytune.train.loop import train
from monkeytune.train.metrics import read_metrics
from monkeytune.train.trackers import TRACKERS


@pytest.fixture
def missing_tracker(monkeypatch) -> str:
    """A tracker whose package cannot be imported here.

    A ``None`` entry in ``sys.modules`` is Python's own way to make an import fail (and
    ``importlib.util.find_spec`` return None), so the test holds whatever is installed.
    """
    name = "wandb"
    for module in TRACKERS[name][0]:
        monkeypatch.setitem(sys.modules, module, None)
    assert importlib.util.find_spec(TRACKERS[name][0][0]) is None
    return name


def test_tensorboard_events_hold_the_loss_and_each_components_lr(make_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config("tb", train={"max_steps": 3}, log={"trackers": ["tensorboard"], "project": "exp"},
                      policy={"preset": "full", "lr": {"resampler": 1e-4, "llm": 2e-3}})
    train(cfg)
    run_dir = Path(cfg.checkpoint.output_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The per-component rates are in the metrics log, and they differ as policy.lr says.
    # (one schedule scales them all; the vision tower has optim.lr, the highest, so it is also "lr").
    last = rows[-1]
    assert last["lr/resampler"] * 20 == pytest.approx(last["lr/llm_layers"])
    assert last["lr/vision_tower"] == last["lr"] == pytest.approx(last["lr/llm_layers"] * 3e-3 / 2e-3)
    assert last["lr"] > 0

    events = EventAccumulator(str(run_dir / "trackers" / "exp"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in ("loss", "lr", "lr/resampler", "lr/llm_layers", "lr/vision_tower", "grad_norm"):
        assert f"train/{name}" in tags, tags
        got = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert got == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows]


def test_a_tracker_that_is_not_installed_stops_the_run_at_start(make_config, monkeypatch, missing_tracker):
    name = missing_tracker

    def no_engine(cfg):
        raise AssertionError("the engine was built before the check")

    monkeypatch.setattr(loop, "make_accelerator", no_engine)
    with pytest.raises(ConfigError, match=f"log.trackers: {name} is not installed: pip install"):
        train(make_config("missing", log={"trackers": [name]}))


def test_the_cli_reports_a_missing_tracker_in_one_line_with_exit_2(make_config, tmp_path, capsys, missing_tracker):
    name = missing_tracker
    path = tmp_path / "run.yaml"
    make_config("cli-missing", train={"max_steps": 1}).save(path)
    assert main(["train", str(path), "--log.trackers", f"[{name}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"monkeytune train: log.trackers: {name} is not installed") and "\n" not in err
    assert not (tmp_path / "cli-missing" / "metrics.jsonl").exists()


def test_unknown_and_repeated_trackers_are_config_errors(make_config):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord' \\(did you mean tensorboard\\?\\)"):
        make_config(log={"trackers": ["tensorbord"]})
    with pytest.raises(ConfigError, match="lists a tracker twice"):
        make_config(log={"trackers": ["tensorboard", "tensorboard"]})
    with pytest.raises(ConfigError, match="log.tracker_options.wandb"):
        make_config(log={"trackers": ["tensorboard"], "tracker_options": {"wandb": {"entity": "x"}}})


@pytest.mark.parametrize("old, expected", [("true", ["tensorboard"]), ("false", []), (True, ["tensorboard"])])
def test_the_old_tensorboard_key_is_translated_with_a_warning(make_config, tmp_path, caplog, old, expected):
    path = tmp_path / "old.yaml"
    make_config("old").save(path)
    data = yaml.safe_load(path.read_text())
    data["log"]["tensorboard"] = old
    path.write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.WARNING, logger="monkeytune"):
        cfg = load_config(path)
    assert cfg.log.trackers == expected
    assert "log.tensorboard" in caplog.text and "write log.trackers: [" in caplog.text
    # The saved (effective) configuration has only the new key.
    assert "tensorboard:" not in cfg.to_yaml() and yaml.safe_load(cfg.to_yaml())["log"]["trackers"] == expected
    with pytest.raises(ConfigError, match="log.tensorboard is replaced by log.trackers"):
        data["log"]["tensorboard"] = "sometimes"
        load_config(data=data)


def test_a_resumed_run_continues_the_tensorboard_history_without_duplicates(make_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = {"trackers": ["tensorboard"]}
    train(make_config("resume", train={"max_steps": 3}, checkpoint={"every": 2}, log=log))
    cfg = make_config("resume", train={"max_steps": 4}, checkpoint={"every": 2}, log=log)
    train(cfg, resume="latest")  # from step 2: step 3 is logged again
    run_dir = Path(cfg.checkpoint.output_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    events = EventAccumulator(str(run_dir / "trackers" / "monkeytune"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in got] == [1, 2, 3, 4] == [r["step"] for r in rows]
    assert [v for _, v in got] == [pytest.approx(r["loss"], rel=1e-6) for r in rows]
