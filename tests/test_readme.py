"""The README's Python section runs as written (in a scratch folder holding a copy of examples/)."""

import re
import shutil
from pathlib import Path

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
