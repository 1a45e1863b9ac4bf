"""A command whose output cannot be written: a full disk is one short error (it ended in a
traceback, or once logging was configured, a record of an uncaught exception); a reader that
went away (``agentworks status | head -1``) ends the command quietly, as Unix tools do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import REPO

#: ``status``: a table printed with rich; ``--version``: a line printed by typer (click).
COMMANDS = [("status",), ("--version",)]


def _agentworks(
    args: tuple[str, ...], *, stdout: int, cwd: Path, database_url: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["AGENTWORKS_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("args", COMMANDS)
def test_output_to_a_full_device_is_one_short_error(
    args: tuple[str, ...], database_url: str, tmp_path: Path
) -> None:
    with open("/dev/full", "w") as full:
        result = _agentworks(args, stdout=full.fileno(), cwd=tmp_path, database_url=database_url)

    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        "agentworks: error: cannot write to standard output: No space left on device\n"
    )


@pytest.mark.parametrize("args", COMMANDS)
def test_output_to_a_pipe_nobody_reads_ends_quietly(
    args: tuple[str, ...], database_url: str, tmp_path: Path
) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: `| head -0`
    try:
        result = _agentworks(args, stdout=write, cwd=tmp_path, database_url=database_url)
    finally:
        os.close(write)

    assert result.stderr == ""
    assert result.returncode == 1
