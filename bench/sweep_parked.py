"""What a worker's sweep reads from the store when a projector has many parked aggregates.

``python -m bench.sweep_parked [--parked 1000] [--tail 20] [--rounds 3] [--json F]`` builds, in a
fresh database, one board with ``--parked`` cards that the kanban projector has parked (each with
``--tail`` events waiting behind the event it stopped at: labels, delivered and held) and as many
cards that it has not. The sweep's watermark is brought to the head, then each round measures
three sweeps of the same projector, as a worker's timer runs them:

1. **quiet**: nothing was written since the last sweep;
2. **parked, one new event each**: every parked card got one more label (delivered, held);
3. **healthy, one new event each**: every unparked card got one more label (delivered, applied).

For each: the events (and bytes of stored state) the sweep read from the store, and its time.
The log's small columns, which every sweep reads, are not counted: only what it read whole.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from bench._database import fresh_database
from bench._provenance import Provenance

if TYPE_CHECKING:
    from uuid import UUID

    from adapters.eventlog import LogBatch
    from commands.handlers import AgentWorks
    from projections.runner import ProjectionRunner
    from projections.sweep import ProjectionSweep


class _Reads:
    """Counts what a sweep reads whole from the store (its ``within_batch`` reads)."""

    def __init__(self, runner: ProjectionRunner) -> None:
        self.events = 0
        self.bytes = 0
        read = runner.log.within_batch

        def counted(*args: Any, **kwargs: Any) -> LogBatch:
            batch = read(*args, **kwargs)
            self.events += len(batch.envelopes)
            self.bytes += batch.size
            return batch

        runner.log.within_batch = counted  # type: ignore[method-assign]

    def measure(self, sweep: ProjectionSweep, through: int) -> dict[str, Any]:
        self.events = self.bytes = 0
        started = time.perf_counter()
        sweep.sweep(through)
        seconds = time.perf_counter() - started
        return {"events_read": self.events, "bytes_read": self.bytes, "seconds": seconds}


def _board(app: AgentWorks) -> tuple[Any, UUID]:
    from commands import models as m
    from commands.handlers import Actor

    created = app.create_workspace(
        m.CreateWorkspace(name="parked bench"), Actor(user_id="owner", workspace_id="*")
    )
    owner = Actor(user_id="owner", workspace_id=str(created.id))
    project = app.create_project(
        m.CreateProject(
            workspace_id=created.id, name="Line", lanes=[m.LaneInput(name="Todo", wip_limit=None)]
        ),
        owner,
    )
    return owner, project.id


def _deliver(runner: ProjectionRunner) -> None:
    """Everything written since the projector's position, as a delivery would bring it."""
    while True:
        batch = runner.log.read(runner.position(), 500)
        if not batch:
            return
        runner.process(batch)


def _label_each(app: AgentWorks, owner: Any, cards: list[UUID], label: str) -> None:
    from commands import models as m

    for card in cards:
        app.label_card(m.LabelCard(card_id=card, label=label), owner)


def run(url: str, parked_count: int, tail: int, rounds: int) -> dict[str, Any]:
    from adapters.postgres import make_pool
    from commands import models as m
    from infra.bootstrap import build_write_side
    from infra.migrate import migrate
    from infra.settings import Settings, db_logins
    from projections.kanban import KanbanProjector
    from projections.runner import ProjectionRunner
    from projections.sweep import ProjectionSweep

    migrate(url, logins=db_logins(Settings.load()))
    app = build_write_side(url, pool_size=2)
    pool = make_pool(url, role="agentworks_projector", max_size=4)
    try:
        from adapters.eventlog import EventLog

        log = EventLog(app.recorder, app.mapper)  # type: ignore[arg-type]
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        sweep = ProjectionSweep(runner)
        reads = _Reads(runner)
        owner, project = _board(app)
        create = m.CreateCard
        parked = [app.create_card(create(project_id=project, title=f"p{n}"), owner).id
                  for n in range(parked_count)]  # fmt: skip
        healthy = [app.create_card(create(project_id=project, title=f"h{n}"), owner).id
                   for n in range(parked_count)]  # fmt: skip
        _deliver(runner)
        # Parked as a failed event would park them: at their next version, which the first
        # label of each takes.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO projection_parked (projector, originator_id, originator_version,"
                " position, event_type, workspace_id, error)"
                " SELECT 'kanban', originator_id, version + 1, 0, 'Card.Labelled', NULL,"
                " 'bench: parked' FROM projection_versions"
                " WHERE projector = 'kanban' AND originator_id = ANY(%s::uuid[])",
                (parked,),
            )
        for n in range(tail):
            _label_each(app, owner, parked, f"t{n}")
        _deliver(runner)
        sweep.sweep(log.head())  # the watermark at the head: the tails were seen once
        results: list[dict[str, Any]] = []
        for r in range(rounds):
            one: dict[str, Any] = {"quiet": reads.measure(sweep, log.head())}
            _label_each(app, owner, parked, f"r{r}")
            _deliver(runner)
            one["parked_one_new_each"] = reads.measure(sweep, log.head())
            _label_each(app, owner, healthy, f"r{r}")
            _deliver(runner)
            one["healthy_one_new_each"] = reads.measure(sweep, log.head())
            print(json.dumps({"round": r + 1, **one}), flush=True)
            results.append(one)
        held = runner.position()
        return {
            "parked": parked_count,
            "tail": tail,
            "position": held,
            "rounds": results,
            "median": {
                case: {
                    key: statistics.median(r[case][key] for r in results)
                    for key in ("events_read", "bytes_read", "seconds")
                }
                for case in results[0]
            },
        }
    finally:
        pool.close()
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parked", type=int, default=1000)
    parser.add_argument("--tail", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    provenance = Provenance.start()
    with fresh_database(args.server) as url:
        result = run(url, args.parked, args.tail, args.rounds)
    result["provenance"] = provenance.finish()
    print(json.dumps(result["median"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
