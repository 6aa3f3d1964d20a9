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


def test_the_command_line_answers_help_without_loading_heavy_libraries():
    # `monkeytune --help` (and a typo in an argument) must not wait seconds for torch.
    import subprocess
    import sys

    code = ("import sys\nfrom monkeytune.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "train" in out.stdout and "serve" in out.stdout


def test_monkeytune_train_is_one_object_the_package_that_trains_when_called():
    # `monkeytune.train(config)` runs training and `monkeytune.train.loop` is the module: one
    # name, one meaning (the package), where a re-exported function used to hide the package.
    import importlib

    import monkeytune
    from monkeytune.train.loop import train as run

    loop = importlib.import_module("monkeytune.train.loop")
    assert monkeytune.train is importlib.import_module("monkeytune.train")
    assert callable(monkeytune.train) and monkeytune.train.loop is loop
    exec("import monkeytune.train.loop as aliased\nassert aliased is loop", {"loop": loop})
    assert run is loop.train


def test_template_has_one_meaning_across_commands(capsys):
    # `--template` is a conversation template (data check, tokenizer train, like data.template);
    # the commands that prompt a model take `--prompt-template`, and point to it when given the other.
    import pytest

    for command in (["chat", "--model", "m", "hi"], ["eval", "--model", "m", "--data", "d"],
                    ["score", "--model", "m", "--prompt", "p", "--answer", "a"], ["serve", "--model", "m"],
                    ["api", "--model", "m"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--template", "vqa"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.endswith("the prompt layout of this command is --prompt-template"), err
