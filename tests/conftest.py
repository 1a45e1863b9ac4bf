"""Fixtures shared by every test layer: real PostgreSQL and Redis from the local machine.

* ``migrated_template`` (session): a database with every migration applied, used as a template.
* ``clones`` (session): copies of the template made ahead and dropped behind (``pg.Clones``).
* ``database_url`` (function): a fresh database copied from the template, dropped afterwards.
* ``redis_url`` (session): ``redis://127.0.0.1:6379/<db>`` with a db index claimed by this session.

The helpers behind them live in ``tests/pg.py`` (``import pg``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from typing import TYPE_CHECKING

import hypothesis_profiles
import pg
import pytest

from infra.migrate import MigrationError, migrate

hypothesis_profiles.load()

# The memory-only Kafka-protocol broker (`kafka_broker`), the Stripe fake (`localstripe`) and the
# in-memory spans and log lines (`exporter`, `log_lines`) fixtures, shared by every test module.
pytest_plugins = ["kafka_fixtures", "stripe_fixtures", "telemetry_fixtures"]

if TYPE_CHECKING:
    from collections.abc import Iterator


#: Connections this run may hold at once on the shared PostgreSQL, all its pytest-xdist workers
#: together (README, "Tests"): the peak is measured from the server's side and a run above it
#: fails.
CONNECTION_BUDGET = int(os.environ.get("AGENTWORKS_TEST_CONNECTION_BUDGET", "80"))
_gauge: pg.ConnectionGauge | None = None
#: The test each worker (``""`` in a run without workers) is running, so that a peak names its
#: test, not a random database name.
_running: dict[str, str] = {}


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    """The run's process (not a pytest-xdist worker) counts every worker's connections."""
    global _gauge
    if _is_worker(session.config):
        return
    _gauge = pg.ConnectionGauge(owner=lambda database: _running.get(pg.worker_of(database), ""))
    _gauge.start()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "setup":
        node = getattr(report, "node", None)  # the worker that ran it, in the run's process
        worker = node.workerinput["workerid"] if node is not None else ""
        _running[worker] = report.nodeid


@pytest.fixture(autouse=True)
def _alone_if_many_connections(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``many_connections`` runs while no other one does, on any worker."""
    if request.node.get_closest_marker("many_connections") is None:
        yield
        return
    with pg.alone_among_many_connections():
        yield


@pytest.fixture(scope="session")
def postgres() -> None:
    """PostgreSQL at 127.0.0.1:5432 accepts connections (started if it was down); drops what
    crashed runs left behind."""
    pg.ensure_postgres()
    pg.drop_orphans()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _gauge is None:
        return
    _gauge.stop()
    with contextlib.suppress(FileNotFoundError):
        os.remove(pg.many_connections_lock())
    # Every worker has finished: what is left of the run was left by a failed teardown.
    leaked = pg.drop_session_databases(pg.RUN_PREFIX) if pg.postgres_is_up() else []
    lines = []
    if _gauge.peak:  # (none in a run that never connected, such as the unit tests alone)
        lines.append(
            f"PostgreSQL connections: peak {_gauge.peak} of a budget of {CONNECTION_BUDGET}"
            " (AGENTWORKS_TEST_CONNECTION_BUDGET), at its peak most in: "
            f"{_gauge.peak_at} ({_gauge.peak_owner or 'a session-wide database'})"
        )
        most = ", ".join(f"{owner} ({count})" for owner, count in _gauge.most(5))
        lines.append(f"most connections to one test's database: {most}")
    if leaked:
        lines.append(f"databases a failed teardown left behind, dropped now: {', '.join(leaked)}")
    if _gauge.peak > CONNECTION_BUDGET:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="session")
def migrated_template(postgres: None) -> Iterator[str]:
    """Name of a session-wide database with all migrations applied; dropped at session end."""
    name = pg.random_name("aw_tmpl_")
    url = pg.create_database(name)
    try:
        _migrate_with_retry(url)
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture(scope="session")
def clones(migrated_template: str) -> Iterator[pg.Clones]:
    """Copies of ``migrated_template``, made ahead of the tests and dropped behind them."""
    made = pg.Clones(migrated_template)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def database_url(clones: pg.Clones) -> Iterator[str]:
    """URL of a fresh, migrated database of this test's own; dropped (connections and all)."""
    name = pg.random_name("aw_t_")
    with clones.database(name) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis db (index 1..15) reserved for this session and emptied at its end."""
    pg.ensure_redis()
    session_id = secrets.token_hex(8)
    index = pg.claim_redis_db(session_id)
    try:
        yield f"redis://{pg.REDIS_HOST}:{pg.REDIS_PORT}/{index}"
    finally:
        pg.release_redis_db(index, session_id)


def _migrate_with_retry(url: str, attempts: int = 3) -> None:
    # Migrations create cluster-wide objects (roles) with IF NOT EXISTS checks that can race
    # with another test session migrating its own template at the same moment; each migration
    # is one transaction, so running again after such a failure is safe. The components' roles
    # become LOGIN roles with the test passwords, as `agentworks migrate` makes them.
    for attempt in range(1, attempts + 1):
        try:
            migrate(url, logins=pg.LOGIN_PASSWORDS)
        except MigrationError:
            if attempt == attempts:
                raise
            time.sleep(0.2 * attempt)
        else:
            return
