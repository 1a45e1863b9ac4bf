"""A read scope gives its pooled connection back: after each read when it keeps none
(subscriptions), and even when the task awaiting a read was cancelled and the scope closed while
the read was still on its worker thread."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest

from adapters.postgres import make_pool
from domain.errors import NotFound
from read_api.db import Offloader, ReadScope, StatementCounter

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool[Connection[DictRow]]]:
    pool = make_pool(database_url, role="agentworks_api", min_size=2, max_size=2, name="t")
    try:
        yield pool
    finally:
        pool.close(timeout=1)


@pytest.fixture
def member(database_url: str) -> tuple[uuid.UUID, str]:
    workspace, user = uuid.uuid4(), "vic"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rm_members (workspace_id, user_id, role) VALUES (%s, %s, 'VIEWER')",
            (workspace, user),
        )
    return workspace, user


@pytest.fixture
def offloader() -> Iterator[Offloader]:
    """The worker threads of the test's read scopes, shut down at its end."""
    offloader = Offloader(4)
    try:
        yield offloader
    finally:
        offloader.shutdown()


def _scope(
    pool: ConnectionPool[Connection[DictRow]],
    offloader: Offloader,
    workspace: uuid.UUID,
    user: str,
    *,
    keep_connection: bool,
    gate: asyncio.Semaphore | None = None,
) -> ReadScope:
    return ReadScope(
        pool=pool, offloader=offloader, workspace_id=workspace, user_id=user,
        counter=StatementCounter(), statement_timeout_ms=5000, keep_connection=keep_connection,
        gate=gate,
    )  # fmt: skip


def _all_back(pool: ConnectionPool[Connection[DictRow]], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        stats = pool.get_stats()
        if stats["pool_available"] == stats["pool_size"]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.mark.parametrize("keep_connection", [True, False])
def test_a_read_still_waiting_for_a_connection_when_its_scope_closes_gives_it_back(
    pool: ConnectionPool[Connection[DictRow]],
    member: tuple[uuid.UUID, str],
    offloader: Offloader,
    keep_connection: bool,
) -> None:
    """The storm case: the pool is busy, a read's worker thread waits for a connection, the
    client goes away, its task is cancelled and its scope closed; then the thread gets one."""
    busy = [pool.getconn(), pool.getconn()]

    async def cancel_while_waiting() -> None:
        scope = _scope(pool, offloader, *member, keep_connection=keep_connection)
        task = asyncio.create_task(
            scope.run(lambda conn: conn.execute("SELECT 1 AS one").fetchone())
        )
        deadline = time.monotonic() + 5
        while pool.get_stats().get("requests_waiting", 0) < 1:
            assert time.monotonic() < deadline, "the read never asked the pool for a connection"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await scope.close()

    try:
        asyncio.run(cancel_while_waiting())
    finally:
        for conn in busy:
            pool.putconn(conn)
    assert _all_back(pool), pool.get_stats()


def test_a_scope_that_keeps_no_connection_holds_none_between_reads(
    pool: ConnectionPool[Connection[DictRow]], member: tuple[uuid.UUID, str], offloader: Offloader
) -> None:
    async def reads() -> None:
        scope = _scope(pool, offloader, *member, keep_connection=False)
        outsider = _scope(pool, offloader, member[0], "eve", keep_connection=False)
        try:
            for _ in range(3):
                row = await scope.run(
                    lambda conn: conn.execute(
                        "SELECT current_setting('agentworks.workspace_id') AS ws"
                    ).fetchone()
                )
                assert row is not None
                assert row["ws"] == str(member[0])
                stats = pool.get_stats()
                assert stats["pool_available"] == stats["pool_size"]
            with pytest.raises(NotFound):
                await outsider.run(lambda conn: None)
            assert not await outsider.is_member()
            stats = pool.get_stats()
            assert stats["pool_available"] == stats["pool_size"]
        finally:
            await scope.close()
            await outsider.close()

    asyncio.run(reads())


def test_scopes_sharing_a_gate_read_one_at_a_time(
    pool: ConnectionPool[Connection[DictRow]], member: tuple[uuid.UUID, str], offloader: Offloader
) -> None:
    first_in, second_in, let_go = threading.Event(), threading.Event(), threading.Event()

    def read(entered: threading.Event) -> Callable[[Connection[DictRow]], object]:
        def run(conn: Connection[DictRow]) -> object:
            entered.set()
            let_go.wait(5)
            return conn.execute("SELECT 1 AS one").fetchone()

        return run

    async def two_reads() -> None:
        gate = asyncio.Semaphore(1)
        scopes = [
            _scope(pool, offloader, *member, keep_connection=False, gate=gate) for _ in range(2)
        ]
        try:
            first = asyncio.create_task(scopes[0].run(read(first_in)))
            await asyncio.get_running_loop().run_in_executor(None, first_in.wait, 5)
            second = asyncio.create_task(scopes[1].run(read(second_in)))
            await asyncio.sleep(0.3)
            # The pool could lend the second read a connection; the gate keeps it waiting.
            assert not second_in.is_set()
            assert pool.get_stats()["pool_available"] == 1
            let_go.set()
            await asyncio.gather(first, second)
            assert second_in.is_set()
        finally:
            let_go.set()
            for scope in scopes:
                await scope.close()

    asyncio.run(two_reads())
