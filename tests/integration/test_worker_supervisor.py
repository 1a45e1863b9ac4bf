"""``agentworks worker`` without ``--projector``: one process per projector, supervised.

A projector process that dies on its own must end the whole worker (the others stopped, exit
1), so that what runs it (docker's ``restart: unless-stopped``, systemd) restarts it. The
worker used to wait on while the survivors ran: that projector's read model stayed behind
with nothing restarting it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import psutil  # type: ignore[import-untyped]
from cli_process import Agentworks, clean_env

from projections.registry import projector_names

if TYPE_CHECKING:
    from adapters.kafka_broker import LocalBroker


def _children_when_all_started(parent: int, count: int, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(parent).children()
        if len(children) == count:
            return children  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"worker {parent} did not start {count} projector processes")


def _start_worker(database_url: str, kafka_broker: LocalBroker, tmp_path: Path) -> Agentworks:
    """``agentworks worker`` (one process per projector) on topics of its own."""
    env = clean_env(
        AGENTWORKS_DATABASE_URL=database_url,
        AGENTWORKS_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
        AGENTWORKS_TOPIC_PREFIX=f"sup-{uuid.uuid4().hex[:10]}-",
        AGENTWORKS_TOPIC_PARTITIONS="1",
        AGENTWORKS_POOL_SIZE="1",
        AGENTWORKS_SWEEP_INTERVAL="0",
        AGENTWORKS_LOG_JSON="false",
    )
    return Agentworks.start(tmp_path, "worker", env=env, port=0)


def test_one_projector_process_dying_ends_the_worker_with_exit_1(
    database_url: str, kafka_broker: LocalBroker, tmp_path: Path
) -> None:
    started = _start_worker(database_url, kafka_broker, tmp_path)
    worker, err = started.process, started.err
    try:
        children = _children_when_all_started(worker.pid, len(projector_names()), timeout=60)
        time.sleep(3)  # past their start, into consuming
        children[0].kill()

        code = worker.wait(timeout=60)

        assert code == 1, err.read_text()
        assert not any(child.is_running() and child.status() != "zombie" for child in children)
        assert "agentworks: error:" in err.read_text().strip().splitlines()[-1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)


def test_projector_processes_end_when_the_worker_is_killed(
    database_url: str, kafka_broker: LocalBroker, tmp_path: Path
) -> None:
    """A worker killed outright (SIGKILL: the OOM killer, a supervisor's last resort) cannot
    stop its projector processes; they must not outlive it, consuming beside the ones its
    restart spawns, each holding its database connections, with nothing left to stop them."""
    started = _start_worker(database_url, kafka_broker, tmp_path)
    worker = started.process
    children: list[psutil.Process] = []
    try:
        children = _children_when_all_started(worker.pid, len(projector_names()), timeout=60)
        worker.kill()
        worker.wait(10)

        gone, alive = psutil.wait_procs(children, timeout=30)

        assert alive == [], [child.pid for child in alive]
        assert len(gone) == len(children)
    finally:
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
