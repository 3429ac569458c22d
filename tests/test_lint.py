"""The tree is ruff clean: the lint rules of ``pyproject.toml`` and its formatter.

Ruff is a test dependency, so CI runs both checks; a failure prints ruff's own report.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args):
    pytest.importorskip("ruff", reason="ruff is a test dependency: pip install -e '.[test]'")
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_check():
    done = _ruff("check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format():
    done = _ruff("format", "--check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_sees_a_defect(tmp_path):
    """The check is live: ruff flags an unused import and an unformatted line in a scratch file."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")
    config = str(ROOT / "pyproject.toml")
    assert _ruff("check", "--no-cache", "--config", config, str(bad)).returncode == 1
    assert _ruff("format", "--check", "--no-cache", "--config", config, str(bad)).returncode == 1
