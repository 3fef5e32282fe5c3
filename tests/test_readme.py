"""The README's usage example runs as written (keeps the README true)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "weighted_step(model" in b)
    r = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tensor" in r.stdout or "[" in r.stdout, r.stdout


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    head = text[: text.index("## Use")]
    assert "bash scripts/demo.sh" in head and "bash scripts/test.sh" in head
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
