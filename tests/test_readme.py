"""The README's first Python example runs as written, and its install commands match .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "loss" in out and "kernel_effective_rank" in out
    assert namespace["embeddings"].grad is not None


def test_ci_installs_what_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install "torch==2.13.0"' in readme and '"torch==2.13.0"' in ci
    assert 'pip install -e ".[test]"' in readme and '-e ".[test]"' in ci
    assert "pytest -q" in readme and "pytest -q" in ci
