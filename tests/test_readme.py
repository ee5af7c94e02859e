"""The README's API example runs as written, and the front door names the two commands."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make quickstart" in text and "make test" in text


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "runs/readme-adapter/adapter_model.safetensors").is_file()
    plain = namespace["plain"]
    assert not any(type(m).__module__.startswith("deltatune") for m in plain.modules())
