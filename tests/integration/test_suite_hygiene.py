"""The test suite on a shared PostgreSQL: its own database names, a connection budget it keeps,
and no database left behind, even when a teardown fails or a session crashes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pg
import psycopg
import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent

pytestmark = pytest.mark.slow


def run_session(
    tmp_path: Path, body: str, *, prefix: str, budget: int = 40, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run a pytest session of its own on ``body``, with our fixtures, as CI would."""
    test_file = tmp_path / "test_child.py"
    test_file.write_text(textwrap.dedent(body))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AGENTWORKS_", "PYTEST_XDIST_"))
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]),
        AGENTWORKS_TEST_DB_PREFIX=prefix,
        AGENTWORKS_TEST_CONNECTION_BUDGET=str(budget),
        TMPDIR=str(tmp_path),  # (where the child leaves any file of its own)
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), *args, str(test_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def databases_named(prefix: str) -> list[str]:
    with pg.admin_connection() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchall()
    return [row[0] for row in rows]


def test_databases_carry_the_configured_prefix_and_this_sessions_pid() -> None:
    name = pg.random_name("aw_t_")

    worker = f"{pg.WORKER}_" if pg.WORKER else ""
    assert name.startswith(f"{pg.DB_PREFIX}{pg.SESSION_PID}_{worker}t_")
    assert pg.worker_of(name) == pg.WORKER
    assert len(name) < 64  # PostgreSQL's identifier limit


def test_a_failed_teardown_leaks_no_database(tmp_path: Path, postgres: None) -> None:
    prefix = f"awleak{os.getpid()}_"
    result = run_session(
        tmp_path,
        """
        import pg, pytest

        @pytest.fixture
        def careless():
            pg.create_database(pg.random_name("t_"))
            yield
            raise RuntimeError("teardown failed before dropping its database")

        def test_uses_it(careless, database_url):
            assert database_url
        """,
        prefix=prefix,
    )

    assert "teardown failed" in result.stdout, result.stdout
    assert "a failed teardown left behind, dropped now" in result.stdout, result.stdout
    assert databases_named(prefix) == []


_FIVE_AT_ONCE = """
    import time, psycopg

    def test_holds_five_connections(database_url):
        conns = [psycopg.connect(database_url) for _ in range(5)]
        time.sleep(1)
        for conn in conns:
            conn.close()
    """

#: Each of two workers holds 3 connections while the other does: 6 for the run.
_THREE_ON_EACH_WORKER = """
    import time, psycopg, pg, pytest

    def held() -> int:
        with pg.admin_connection() as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE starts_with(datname, %s)",
                (pg.RUN_PREFIX,),
            ).fetchone()[0]

    @pytest.mark.parametrize("n", [1, 2])
    def test_holds_three_while_the_other_worker_does(n, database_url):
        assert pg.WORKER
        conns = [psycopg.connect(database_url) for _ in range(3)]
        deadline = time.monotonic() + 30
        while held() < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        for conn in conns:
            conn.close()
    """


@pytest.mark.parametrize(
    ("body", "args", "budget", "said"),
    [
        (_FIVE_AT_ONCE, (), 3, ["1 passed", "peak 5 of a budget of 3", "::test_holds_five_"]),
        (
            _THREE_ON_EACH_WORKER,
            ("-n", "2", "--dist", "load"),
            5,
            ["2 passed", "peak 6 of a budget of 5", "::test_holds_three_while_the_other_"],
        ),
    ],
    ids=["one process", "two workers"],
)
def test_a_run_over_its_connection_budget_fails_and_says_where(
    tmp_path: Path,
    postgres: None,
    body: str,
    args: tuple[str, ...],
    budget: int,
    said: list[str],
) -> None:
    """The budget is the run's, all its workers' connections together."""
    prefix = f"awbudget{os.getpid()}_"
    result = run_session(tmp_path, body, prefix=prefix, budget=budget, args=args)

    assert result.returncode == 1, result.stdout
    assert [text for text in said if text not in result.stdout] == [], result.stdout
    assert f"at its peak most in: {prefix}" in result.stdout
    assert databases_named(prefix) == []


def test_tests_of_many_connections_never_run_at_once_on_two_workers(tmp_path: Path) -> None:
    times = tmp_path / "times"
    result = run_session(
        tmp_path,
        f"""
        import time, pytest

        @pytest.mark.many_connections
        @pytest.mark.parametrize("n", [1, 2])
        def test_holds_many(n):
            began = time.monotonic()
            time.sleep(1.0)
            with open({str(times)!r}, "a") as out:
                out.write(f"{{began}} {{time.monotonic()}}\\n")
        """,
        prefix=f"awalone{os.getpid()}_",
        args=("-n", "2", "--dist", "load"),
    )

    assert result.returncode == 0, result.stdout
    assert list(tmp_path.glob("*.many-connections")) == [], "the run left its lock file behind"
    spans = sorted(tuple(map(float, line.split())) for line in times.read_text().splitlines())
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0], f"two tests of many connections ran at once: {spans}"


def test_databases_of_a_crashed_session_are_dropped_by_the_next_one(postgres: None) -> None:
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    orphan = f"{pg.DB_PREFIX}{dead_pid.pid}_t_orphan"
    pg.create_database(orphan)
    try:
        dropped = pg.drop_orphans()

        assert orphan in dropped
        assert databases_named(orphan) == []
    finally:
        pg.drop_database(orphan)


def test_the_gauge_counts_this_sessions_connections(database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    gauge = pg.ConnectionGauge(interval=0.02, owner=lambda database: f"owner of {database}")
    gauge.start()
    conns = [psycopg.connect(database_url) for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while gauge.peak < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for conn in conns:
            conn.close()
        gauge.stop()
    assert gauge.peak >= 3
    assert name == gauge.peak_at or pg.worker_of(gauge.peak_at) != pg.WORKER
    assert gauge.peak_owner == f"owner of {gauge.peak_at}"
