"""The README as a newcomer reads it: its Python code runs as written, in a fresh process, with the bundled model,
and every `clipsearch` command line it shows names a real command and real options."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipsearch.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.mark.slow
def test_the_python_blocks_run_as_written(tmp_path):
    """Run where a user runs them: the checkout's own folder names (data/...), a fresh interpreter, no fixtures."""
    blocks = code_blocks("python")
    assert blocks, "the README shows no Python code"
    (tmp_path / "data").symlink_to(ROOT / "data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{result.stderr[-3000:]}"


def command_lines() -> list[list[str]]:
    """Every `clipsearch ...` line of the README's bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].split("|", 1)[0].strip()
            if line.startswith("clipsearch "):
                lines.append(shlex.split(line, comments=True)[1:])
    return lines


def test_every_readme_command_line_names_real_commands_and_options():
    runner = CliRunner()
    lines = command_lines()
    assert len(lines) > 10
    wrong = []
    for words in lines:
        command = [w for w in words[:2] if not w.startswith("-")]
        helps = runner.invoke(app, [*command[:1], "--help"]).output
        if len(command) > 1 and f"  {command[1]}" in helps:  # a command group: eval flickr30k
            helps = runner.invoke(app, [*command[:2], "--help"]).output
        elif runner.invoke(app, [*command[:1], "--help"]).exit_code != 0:
            wrong.append(f"no command: clipsearch {command[0]}")
            continue
        for word in words:
            option = word.split("=", 1)[0]
            if option.startswith("-") and not re.search(rf"(^|[\s,]){re.escape(option)}([\s,=]|$)", helps, re.M):
                wrong.append(f"clipsearch {' '.join(command)}: no option {option}")
    assert not wrong, "\n".join(wrong)
