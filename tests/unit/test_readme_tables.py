"""README's command table and configuration table say what the code does.

Both are read from the code at test time (the CLI as ``--help`` builds it, the settings class),
so a command, option or setting added without its README row, or a row left behind by a removed
one, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import SecretStr

from infra.cli import app
from infra.settings import ENV_PREFIX, Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
#: Options every command takes, documented once under the table rather than in every row.
EVERY_COMMAND = frozenset({"--data-dir", "--help"})


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def command_rows() -> dict[str, str]:
    """README command table: command path (``rebuild``, ``parked list``) -> its usage cell."""
    rows = {}
    for usage in re.findall(r"^\| `agentworks ([^`]*)` \|", section("Command line"), re.M):
        words = []
        for word in usage.split():
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            words.append(word)
        rows[" ".join(words)] = usage
    return rows


def cli_commands() -> dict[str, Any]:
    """Every runnable command of the CLI by path, groups walked into."""
    found: dict[str, Any] = {}

    def walk(prefix: str, command: Any) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(f"{prefix} {name}".strip(), sub)
        else:
            found[prefix] = command

    walk("", typer.main.get_command(app))
    return found


def options_of(command: Any) -> tuple[set[str], set[str]]:
    """(options to document, every spelling the command accepts)."""
    primary, accepted = set(), set()
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option":
            continue
        names = [o for o in param.opts if o.startswith("--")]
        primary.update(names)
        accepted.update(names)
        accepted.update(o for o in param.secondary_opts if o.startswith("--"))
    return primary - EVERY_COMMAND, accepted


def test_the_command_table_lists_exactly_the_commands_of_the_cli() -> None:
    assert sorted(command_rows()) == sorted(cli_commands())


@pytest.mark.parametrize("path", sorted(cli_commands()))
def test_each_row_shows_the_options_its_command_takes_and_no_other(path: str) -> None:
    usage = command_rows().get(path)
    assert usage is not None, f"no README row for `agentworks {path}`"
    documented, accepted = options_of(cli_commands()[path])

    missing = {option for option in documented if option not in re.findall(r"--[\w-]+", usage)}
    unknown = set(re.findall(r"--[\w-]+", usage)) - accepted
    assert missing == set(), f"`agentworks {path}` row lacks {sorted(missing)}"
    assert unknown == set(), f"`agentworks {path}` row shows options it lacks: {sorted(unknown)}"


def test_options_every_command_takes_are_documented_once() -> None:
    text = " ".join(section("Command line").split())
    assert "Every command takes `--data-dir DIR`" in text
    assert "`agentworks --version`" in text
    for path, command in cli_commands().items():
        _, accepted = options_of(command)
        assert "--data-dir" in accepted, path


def config_rows() -> dict[str, str]:
    rows = re.findall(r"^\| `(AGENTWORKS_\w+)` \| ([^|]*) \|", section("Configuration"), re.M)
    return {name: default.strip() for name, default in rows}


def documented_default(value: Any) -> set[str]:
    """How the README may write a field's default."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return {"unset", "derived"}
    if value == "":
        return {"empty"}
    if isinstance(value, bool):
        return {f"`{str(value).lower()}`"}
    if isinstance(value, float) and value.is_integer():
        return {f"`{int(value)}`"}
    return {f"`{value}`"}


def test_the_configuration_table_lists_exactly_the_settings() -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert sorted(config_rows()) == sorted(fields)


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_each_setting_row_gives_its_default(name: str) -> None:
    row = config_rows().get(f"{ENV_PREFIX}{name.upper()}")
    assert row is not None, f"no README row for {ENV_PREFIX}{name.upper()}"
    assert row in documented_default(Settings.model_fields[name].default), row


def first_table(text: str) -> str:
    """The first Markdown table of ``text`` as a renderer sees it: header, delimiter and the
    rows that follow without a break (a blank line ends a table; later ``|`` lines are text)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("title", ["Command line", "Configuration"])
def test_each_table_renders_as_one_table_with_every_row(title: str) -> None:
    text = section(title)
    rows = re.findall(r"^\| `[^`]*` \|", text, re.M)
    rendered = re.findall(r"^\| `[^`]*` \|", first_table(text), re.M)
    assert rendered == rows, f"rows after a break in the {title} table: {rows[len(rendered) :]}"


#: Commands that never open a database: their data dir holds only the dev audit signing key.
OFFLINE = frozenset({"audit verify", "audit public-key"})


@pytest.mark.parametrize("path", sorted(set(cli_commands()) - OFFLINE))
def test_data_dir_help_says_it_picks_the_embedded_database(path: str) -> None:
    # README: "Every command takes `--data-dir DIR`: without AGENTWORKS_DATABASE_URL it works on
    # that data dir's embedded PostgreSQL"; `--help` must not say it holds only a key.
    (option,) = (p for p in cli_commands()[path].params if "--data-dir" in p.opts)
    assert "embedded PostgreSQL" in (option.help or ""), f"`agentworks {path} --help`"
