"""The README's Python section and the runnable lines of its "Using it" block run as written
(in a scratch folder holding a copy of examples/, as a fresh clone has it)."""

import re
import shlex
import shutil
from pathlib import Path

from monkeytune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def python_section() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the Python section holds one code block"
    return blocks[0]


def test_readme_python_section_runs(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_section(), "README.md (Python section)", "exec"), namespace)
    assert (tmp_path / "runs" / "python" / "final" / "config.json").is_file()
    assert isinstance(namespace["reply"], str) and namespace["scored"]["num_tokens"] >= 1
    assert "exact_match" in capsys.readouterr().out


# Lines of the "Using it" block this test does not run (by their first words), and why. Every
# other line must run, in order, on a CPU, offline, in seconds.
SKIPPED = {
    "monkeytune demo": "takes minutes: it generates a task, trains three models and evaluates them",
    "accelerate launch": "needs 8 GPUs and the downloaded Monkey checkpoint",
    "monkeytune chat": "DIR and photo.jpg stand for the reader's model and image",
    "monkeytune score": "DIR and a.jpg stand for the reader's model and image",
    "monkeytune eval": "DIR and test.jsonl stand for the reader's model and data",
    "monkeytune probe": "DIR and the data files stand for the reader's model and data",
    "monkeytune export": "DIR / RUN/final and OUT stand for the reader's folders",
    "monkeytune serve": "DIR stands for the reader's model, and the server runs until stopped",
    "monkeytune api": "DIR stands for the reader's model, and the server runs until stopped",
}


def using_it_commands() -> list[list[str]]:
    """The commands of the "Using it" block as argument lists (continuations joined, comments gone)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the Using it section holds one code block"
    lines = blocks[0].replace("\\\n", " ").splitlines()
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv]


def test_readme_using_it_block_runs_in_order(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in using_it_commands():
        line = " ".join(argv)
        if any(line.startswith(prefix) for prefix in SKIPPED):
            continue
        assert argv[0] == "monkeytune", f"{line!r}: runnable here, or add it to SKIPPED with the reason"
        code = main(argv[1:])
        assert code == 0, f"{line!r} exited {code}: {capsys.readouterr().err[-2000:]}"
        ran.append(" ".join(argv[1:3]))
    assert ran == ["smoke", "inspect --config", "train examples/tiny-cpu.yaml", "data check",
                   "train examples/tiny-cpu.yaml"]
    assert "trained 4 steps" in capsys.readouterr().out


def test_readme_composed_models_block_runs_in_order(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    text = (ROOT / "README.md").read_text()
    section = text.split("## Composed models\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for argv in (shlex.split(line) for line in block.splitlines() if line.strip()):
        if argv[0] == "python":
            monkeypatch.setattr(sys, "argv", argv[1:])
            runpy.run_path(argv[1], run_name="__main__")
            continue
        if argv[1] == "chat":
            argv[2:2] = ["--max-new-tokens", "2"]  # random weights: any two tokens will do
        assert main(argv[1:]) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "runs" / "compose-tiny" / "model" / "model.safetensors").is_file()
