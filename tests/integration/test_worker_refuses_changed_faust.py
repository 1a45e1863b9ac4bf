"""A worker process on a faust whose private read marks changed refuses to start.

The worker's recovery after a broker lost its log clears faust's per-partition read marks
(``streams.worker.forget_read_offsets_of``). Those are faust internals; an upgrade could move
them, and a worker that carried on would quietly drop republished events. Here the installed
faust is altered the way an upgrade might alter it (its fetch loop no longer filters by the
marks), and ``agentworks worker`` must stop at start-up with an error that says why.
"""

from __future__ import annotations

import os
import textwrap
from typing import TYPE_CHECKING

import pytest
from cli_process import run_python

if TYPE_CHECKING:
    from pathlib import Path

    from adapters.kafka_broker import LocalBroker

pytestmark = pytest.mark.slow

ANOTHER_FAUST = textwrap.dedent(
    """
    import sys
    from faust.transport import consumer

    async def _drain_messages(self, fetcher):  # filters by nothing the worker could clear
        return None

    consumer.Consumer._drain_messages = _drain_messages
    from infra.cli import main

    sys.exit(main(["worker", "--projector", "kanban"]))
    """
)


def test_a_worker_on_a_faust_without_read_marks_stops_at_start_up(
    database_url: str, kafka_broker: LocalBroker, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")},
        "AGENTWORKS_DATABASE_URL": database_url,
        "AGENTWORKS_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "AGENTWORKS_TOPIC_PREFIX": "changed-faust-",
        "AGENTWORKS_POOL_SIZE": "1",
    }
    done = run_python(ANOTHER_FAUST, cwd=tmp_path, env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "FaustInternalsChanged" in output, output
    assert "forget_read_offsets_of must be adapted" in output
