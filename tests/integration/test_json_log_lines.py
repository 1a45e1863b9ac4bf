"""Under the production log format every line a process writes to stderr is one JSON object,
also what Python itself reports outside any logger: an exception in a ``__del__`` (as
kafka-python's producer raises when the broker went away: "Exception ignored in: <function
KafkaProducer.__del__>" and its traceback, 11 lines), one that ends a thread, and one that ends
the process; and a warning Python prints (two lines, the second the source line)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cli_process import clean_env, run_python

if TYPE_CHECKING:
    from pathlib import Path

PROGRAM = """
import threading
import warnings

from infra.cli import main

# As the `agentworks` entry point starts every command: `migrate --help` loads no settings, so
# configure the logging as a command does first.
from infra.cli_common import load_settings

load_settings()
try:
    main(["migrate", "--help"])
except SystemExit:
    pass


class Leaky:
    def __del__(self) -> None:
        raise RuntimeError("raised in __del__\\nwith a second line")


Leaky()


def crash() -> None:
    raise KeyError("raised in a thread")


warnings.warn("a warning\\nover two lines", RuntimeWarning, stacklevel=1)

worker = threading.Thread(target=crash, name="crashing-thread")
worker.start()
worker.join()
raise ValueError("raised at the top")
"""


def test_exceptions_python_reports_itself_are_single_json_lines(tmp_path: Path) -> None:
    result = run_python(PROGRAM, cwd=tmp_path, env=clean_env(), timeout=60)

    assert result.returncode == 1
    records = []
    for line in result.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n{result.stderr}") from None
    (warned,) = [record for record in records if record["logger"] == "py.warnings"]
    assert "RuntimeWarning: a warning\nover two lines" in warned["event"]
    assert warned["level"] == "warning"
    records.remove(warned)
    by_event = {record["event"]: record for record in records}
    assert set(by_event) == {
        "python.unraisable_exception",
        "python.thread_exception",
        "python.uncaught_exception",
    }, records
    assert "RuntimeError: raised in __del__" in by_event["python.unraisable_exception"]["exception"]
    assert "Leaky.__del__" in by_event["python.unraisable_exception"]["object"]
    assert by_event["python.thread_exception"]["thread"] == "crashing-thread"
    assert "KeyError: 'raised in a thread'" in by_event["python.thread_exception"]["exception"]
    assert "ValueError: raised at the top" in by_event["python.uncaught_exception"]["exception"]
    assert all(record["level"] in ("error", "critical") for record in records)
