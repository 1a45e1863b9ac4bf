"""A batch applied at once (``apply_batch``) does exactly what its events do one by one.

Every projector's batch path folds many events into a few set-based statements; its per-event
handlers are the reference. Fed the same deliveries (random batches, repeats, late events healed
from the store), both paths must leave the same rows and publish the same changes in the same
order.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_profiles import examples
from read_side_helpers import ReadSide
from test_read_model_properties import (
    EVERYTHING_ONCE,
    Script,
    deliver,
    operations,
    run_operation,
    table_rows,
)

from projections.rebuild import SCRATCH_SUFFIX, prepare_scratch, scratch_tables, scratch_tracking
from projections.registry import all_projectors
from projections.runner import ProjectionRunner

if TYPE_CHECKING:
    from projections.base import Change


@settings(
    max_examples=examples(dev=10, ci=15),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(operations, min_size=6, max_size=40), seed=st.integers(0, 2**32))
@example(ops=EVERYTHING_ONCE, seed=7)
def test_batches_leave_the_rows_and_changes_single_events_do(
    side: ReadSide, ops: list[tuple[Any, ...]], seed: int
) -> None:
    script = Script(world=side.new_world(owner=f"batcher-{seed}"))
    for op in ops:
        run_operation(side, script, op)
    envelopes = side.envelopes()
    for projector in all_projectors():
        outcomes: dict[bool, tuple[dict[str, list[tuple[Any, ...]]], list[Change]]] = {}
        for batched in (False, True):
            prepare_scratch(projector, side.pool)
            changes: list[Change] = []
            runner = ProjectionRunner(
                projector,
                side.pool,
                side.log,
                tracking_name=scratch_tracking(projector),
                tables=scratch_tables(projector),
                on_commit=changes.extend,
                batched=batched,
            )
            assert runner.batched is batched
            deliver(runner, envelopes, random.Random(seed), late=True)
            tables = {t: table_rows(side, t + SCRATCH_SUFFIX) for t in projector.tables}
            outcomes[batched] = (tables, changes)
        one_by_one, at_once = outcomes[False], outcomes[True]
        for table in projector.tables:
            assert at_once[0][table] == one_by_one[0][table], f"{projector.name}: {table}"
        assert at_once[1] == one_by_one[1], f"{projector.name}: changes"
