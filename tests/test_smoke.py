"""The `monkeytune smoke` command runs a real end-to-end pass of the tiny model."""

from monkeytune.cli import main
from monkeytune.config import get_config
from monkeytune.smoke import run_smoke


def test_smoke_pass_trains_adapters_and_generates():
    report = run_smoke(get_config("tiny"), new_tokens=3)
    assert report.views == (5, 3, 224, 224)
    assert report.visual_tokens == 320
    assert report.loss > 0 and report.adapter_grad_norm > 0
    assert len(report.generated) == 3


def test_cli_smoke(capsys):
    assert main(["smoke"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens     : 320" in out
