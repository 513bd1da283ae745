"""The README's first screen stays true: a short example and CI running its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_usage_example_is_short_and_shows_the_main_entry_points() -> None:
    """The example itself runs in test_docs_snippets.py; here: it stays a ten-line first screen."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 1
    assert len(blocks[0].strip().splitlines()) <= 12
    for name in ("gald.GALD(", "gald.GALDHead(", "gald.wrap(", "OhemCrossEntropy("):
        assert name in blocks[0], name


def test_two_setup_commands_and_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(commands) == 2
    bench, tests = commands
    assert bench.rstrip().endswith("python -m gald.bench")
    assert "pip install torch==2.13.0" in bench and "pip install torch==2.13.0" in tests
    test_cmd = tests.split("&&")[-1].strip()
    assert 'pip install -e ".[dev]"' in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1].strip() == test_cmd
    assert "set -euo pipefail" in ci and "pip install torch==2.13.0" in ci
