"""Every code block of README.md runs: each ```python block as is, each ```yaml/```toml config
validates, and each ``vdn`` line of the ```bash blocks runs through the CLI with the quick preset."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from vdn_pyro.cli import main
from vdn_pyro.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
CONFIG_NAME = re.compile(r"^#\s*(\S+\.(?:ya?ml|toml))\b")


def readme_blocks(language):
    """``(line, code)`` of every fenced block of ``language``, in order."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == language
    ]


def _block_id(block):
    line, code = block
    first = next(
        (row for row in code.splitlines() if row.strip() and not row.startswith(("import", "from"))), ""
    )
    return f"line{line}-" + re.sub(r"\W+", "_", first.strip())[:30]


PYTHON_BLOCKS = readme_blocks("python")
CONFIG_BLOCKS = readme_blocks("yaml") + readme_blocks("toml")


def test_readme_has_the_blocks_it_documents():
    assert len(PYTHON_BLOCKS) >= 4
    assert any(code.lstrip().startswith("vdn ") for _, code in readme_blocks("bash"))
    assert all(CONFIG_NAME.match(code) for _, code in CONFIG_BLOCKS), "config blocks start with '# NAME.yaml'"


def test_readme_commands_match_ci():
    """The test command is the one ``.ci/run`` runs verbatim; the main job is ``vdn fit``."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    bash = [code.strip() for _, code in readme_blocks("bash")]
    assert ci in bash
    assert "pip install torch==2.13.0 && pip install -e . && vdn fit" in bash


@pytest.fixture
def one_thread():
    """Small networks run many times faster on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[_block_id(b) for b in PYTHON_BLOCKS])
def test_python_block_runs(block, tmp_path, monkeypatch, one_thread):
    line, code = block
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def _write_config_blocks(directory):
    paths = []
    for _, code in CONFIG_BLOCKS:
        path = Path(directory) / CONFIG_NAME.match(code).group(1)
        path.write_text(code)
        paths.append(path)
    return paths


def test_config_blocks_validate(tmp_path):
    configs = [load_config(path) for path in _write_config_blocks(tmp_path)]
    assert configs and all(c == configs[0] for c in configs), "the YAML and TOML examples should agree"


def _quick(argv):
    """A README command line as the quick preset would run it."""
    if argv[0] == "fit" and "--resume" not in argv:
        if "--preset" not in argv:
            argv = argv + ["--preset", "quick"]
        else:
            argv[argv.index("--preset") + 1] = "quick"
    if argv[0] == "fit":
        argv = argv + ["--quiet"]
    return argv


def test_cli_lines_run(tmp_path, monkeypatch, capsys):
    """Each ``vdn ...`` line of the bash blocks, in order, in one directory."""
    monkeypatch.chdir(tmp_path)
    _write_config_blocks(tmp_path)
    lines = [
        row.strip()
        for _, code in readme_blocks("bash")
        for row in code.splitlines()
        if row.strip().startswith("vdn ")
    ]
    assert lines
    for row in lines:
        argv = _quick(shlex.split(row, comments=True)[1:])
        status = main(argv)
        assert status == 0, (
            f"`{row}` (run as `vdn {' '.join(argv)}`) exited with {status}: {capsys.readouterr().err}"
        )
