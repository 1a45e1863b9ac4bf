"""The command line's edges a new user meets first: ``--version``, ``--help``, ``--data-dir``."""

from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import test_cli
import typer

from infra.cli import app
from projections.registry import projector_names


def agentworks(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return test_cli.agentworks(*args, cwd=cwd, env={"COLUMNS": "200"})


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    result = agentworks("--version", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"agentworks {version('agentworks')}\n"


@pytest.mark.parametrize("command", ["rebuild", "sweep"])
def test_help_names_the_projectors_and_keeps_sentences_whole(tmp_path: Path, command: str) -> None:
    result = agentworks(command, "--help", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    for name in projector_names():
        assert name in result.stdout
    # A paragraph is wrapped to the terminal only: on a wide one each sentence is one line.
    paragraph_end = {
        "rebuild": "meanwhile; an interrupted rebuild leaves them untouched.",
        "sweep": "Safe while workers run; each event takes effect once.",
    }[command]
    assert paragraph_end in result.stdout, result.stdout


def _data_dirs() -> dict[str, list[typer.core.click.Parameter]]:
    """Every command (``name`` or ``group name``), with its ``--data-dir`` options."""
    group = typer.main.get_command(app)
    commands = getattr(group, "commands", {})
    assert commands
    found = {}
    for name, command in commands.items():
        subcommands = getattr(command, "commands", None)
        for sub_name, sub in (subcommands or {name: command}).items():
            named = sub_name if subcommands is None else f"{name} {sub_name}"
            found[named] = [p for p in sub.params if "--data-dir" in p.opts]
    return found


def test_every_command_takes_a_data_dir() -> None:
    assert [name for name, options in _data_dirs().items() if not options] == []


def test_every_data_dir_help_names_the_default_readme_promises() -> None:
    """The billing commands' and audit verify/public-key's help named no default."""
    vague = [
        name
        for name, options in _data_dirs().items()
        for option in options
        if ".agentworks" not in (getattr(option, "help", None) or "")
    ]
    assert vague == []
