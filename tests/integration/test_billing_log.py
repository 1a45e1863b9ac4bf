"""The fast billing fold (``adapters.billing_log``) equals the mapper's, on the real store.

``fold_month`` without a log decodes every billing event of the log through the write side's
mapper (upcasting included) and folds it with ``MonthFold.add``: the reference. The fast reader
reads only the fields the fold uses, only the month's rows where that is sound, and hands
anything else to the mapper. Over generated logs (charges in several months and time zones,
late charges, credits and refunds in the charge's month and later ones, workspace credits,
texts that send rows to the mapper) both give the same figures for every month; with the usage
events at a newer class version, rows stored at the old one are upcast either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import psycopg
import pytest
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.billing_log import BILLING_TOPICS, BillingLog, billing_log_for
from commands.billing import fold_month
from domain.errors import InvalidTransition
from domain.meta import EventMeta
from domain.months import month_of, next_month
from domain.usage import MonthlySpend, UsageCharge

if TYPE_CHECKING:
    from commands.handlers import AgentWorks
    from domain.billing import MonthFold

MONTHS = ("2026-01", "2026-02", "2026-03")
ZONES = (UTC, timezone(timedelta(hours=5)), timezone(timedelta(hours=-8)))
#: Texts stored as they are; those with a brace send their row to the mapper.
TEXTS = ("sim-1", "gpt {mini}", "x}{y")

_EXAMPLES = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _log(app: AgentWorks) -> BillingLog:
    log = billing_log_for(app.recorder, app.mapper)
    assert log is not None
    assert log.fast
    return log


# -- generated logs -------------------------------------------------------------------------------


@st.composite
def _moments(draw: st.DrawFn) -> datetime:
    """A time in one of the months (or just around them), in some time zone."""
    start = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(hours=12)
    at = start + timedelta(minutes=draw(st.integers(0, 91 * 24 * 60)))
    return at.astimezone(draw(st.sampled_from(ZONES)))


_charge = st.tuples(
    st.just("charge"),
    st.integers(0, 2),  # workspace
    st.integers(0, 2),  # project
    _moments(),
    st.integers(0, 5_000_000),  # billed
    st.booleans(),  # billed in the next month (recorded for a month closed by then)
    st.sampled_from(TEXTS),  # model
)
_correction = st.tuples(
    st.just("correct"),
    st.integers(0, 1_000),  # which earlier charge
    st.integers(1, 100),  # percent of what is left
    st.booleans(),  # refund
    st.integers(0, 2),  # months after the charge's
    st.sampled_from(TEXTS),  # reason
)
_credit = st.tuples(
    st.just("credit"),
    st.integers(0, 2),  # workspace
    st.sampled_from(MONTHS),
    st.integers(1, 3_000_000),
    st.sampled_from(TEXTS),
)
operations = st.lists(st.one_of(_charge, _charge, _correction, _credit), max_size=30)


@dataclass
class _Writer:
    """Appends a generated log through the mapper, as the write side stores it."""

    app: AgentWorks
    workspaces: list[tuple[UUID, list[UUID]]] = field(
        default_factory=lambda: [(uuid4(), [uuid4() for _ in range(3)]) for _ in range(3)]
    )
    charges: list[tuple[UsageCharge, int]] = field(default_factory=list)
    spends: dict[tuple[UUID, str], MonthlySpend] = field(default_factory=dict)

    def meta(self, workspace_id: UUID) -> EventMeta:
        return EventMeta.for_command(workspace_id=workspace_id, actor="test")

    def apply(self, operations: list[tuple[Any, ...]]) -> None:
        for operation in operations:
            getattr(self, operation[0])(*operation[1:])

    def charge(
        self, ws: int, project: int, at: datetime, billed: int, late: bool, model: str
    ) -> None:
        workspace_id, projects = self.workspaces[ws]
        month_index = MONTHS.index(month_of(at)) if month_of(at) in MONTHS else 0
        # Late usage is billed in a month after its own, never before (UsageCharge.charge).
        billed_month = next_month(month_of(at)) if late else None
        charge = UsageCharge.charge(
            workspace_id=workspace_id, project_id=projects[project], card_id=uuid4(),
            run_id=uuid4(), call_id="c", provider="simulated", model=model, input_tokens=3,
            output_tokens=4, provider_cost_micros=billed // 5, markup=Decimal(5),
            billed_micros=billed, price_table_version="t", at=at, meta=self.meta(workspace_id),
            billed_month=billed_month,
        )  # fmt: skip
        self.charges.append((charge, month_index))
        self.store(charge)

    def correct(self, which: int, percent: int, refund: bool, later: int, reason: str) -> None:
        if not self.charges:
            return
        charge, month_index = self.charges[which % len(self.charges)]
        amount = charge.net_micros * percent // 100
        if amount <= 0:
            return
        month = MONTHS[min(month_index + later, 2)]
        # A correction follows its charge in time and lands in no month before the charge's
        # (UsageCharge.correct refuses either).
        at = max(datetime.fromisoformat(f"{month}-15T10:00:00+00:00"), charge.modified_on)
        billed = charge.month if month_of(at) < charge.month else None
        charge.correct(
            amount, reason, refund=refund, at=at, meta=self.meta(charge.workspace_id),
            billed_month=billed,
        )  # fmt: skip
        self.store(charge)

    def credit(self, ws: int, month: str, amount: int, reason: str) -> None:
        workspace_id = self.workspaces[ws][0]
        meta = self.meta(workspace_id)
        spend = self.spends.get((workspace_id, month))
        if spend is None:
            spend = self.spends[workspace_id, month] = MonthlySpend.open(
                workspace_id=workspace_id, month=month, meta=meta
            )
        spend.grant_credit(uuid4(), amount, reason, meta=meta)
        self.store(spend)

    def store(self, aggregate: UsageCharge | MonthlySpend) -> None:
        stored: list[StoredEvent] = [
            self.app.mapper.to_stored_event(event) for event in aggregate.collect_events()
        ]
        self.app.recorder.insert_events(stored)


def _rows_of(log: BillingLog, needle: bytes | None = None) -> int:
    """The billing rows in the table (with ``needle``: those a month's fast read selects)."""
    sql = "SELECT count(*) AS rows FROM agentworks_events WHERE topic = ANY(%s)"
    params: list[object] = [list(BILLING_TOPICS)]
    if needle is not None:
        sql += " AND (topic = %s OR position(%s IN state) > 0)"
        params += [get_topic(MonthlySpend.CreditGranted), needle]
    with log.recorder.datastore.get_connection() as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row["rows"])


def _folds(app: AgentWorks, log: BillingLog, month: str) -> tuple[MonthFold, MonthFold]:
    """The fast fold and the mapper's, each over every row there is.

    Both read under the log's horizon (``adapters.eventstore``), which hides the newest rows
    for a moment while a transaction of another database on the server is ending; a pair in
    which either fold missed rows is taken again.
    """
    needle = f'"{month}"'.encode() if log.month_filter else None
    whole, selected = _rows_of(log), _rows_of(log, needle)
    for _ in range(50):
        fast, reference = fold_month(app, month, log=log), fold_month(app, month)
        if (fast.events, reference.events) == (selected, whole):
            return fast, reference
        time.sleep(0.1)
    raise AssertionError(f"the log's horizon kept hiding rows ({fast.events}, {reference.events})")


def _assert_same_folds(app: AgentWorks, log: BillingLog) -> None:
    for month in (*MONTHS, "2026-04"):
        fast, reference = _folds(app, log, month)
        assert fast.workspaces == reference.workspaces, month
        for workspace_id in reference.workspaces:
            assert fast.lines(workspace_id, increment_micros=250_000) == reference.lines(
                workspace_id, increment_micros=250_000
            )


def test_the_fast_fold_equals_the_mappers_over_generated_logs(app: AgentWorks) -> None:
    log = _log(app)
    assert log.month_filter  # today's usage events have nothing to upcast

    @_EXAMPLES
    @given(operations)
    def check(ops: list[tuple[Any, ...]]) -> None:
        _Writer(app).apply(ops)
        _assert_same_folds(app, log)

    check()


def test_a_month_reads_its_own_rows_and_learns_the_charges_corrected_in_it(
    app: AgentWorks,
) -> None:
    writer = _Writer(app)
    january = datetime(2026, 1, 20, 9, 0, tzinfo=UTC)
    writer.charge(0, 0, january, 1_000_000, False, "sim-1")
    writer.charge(0, 1, january, 2_000_000, False, "sim-1")
    writer.correct(0, 50, False, 1, "in February")  # filed under January's project 0
    writer.charge(1, 2, datetime(2026, 2, 3, tzinfo=UTC), 700_000, False, "sim-1")

    fast, reference = _folds(app, _log(app), "2026-02")

    assert fast.workspaces == reference.workspaces
    project = writer.workspaces[0][1][0]
    assert fast.workspaces[writer.workspaces[0][0]].usage == {project: -500_000}
    assert (fast.events, reference.events) == (2, 4)  # January's charges were not read


def test_a_months_fold_reads_every_committed_row_while_an_older_transaction_is_open(
    app: AgentWorks, database_url: str
) -> None:
    """The log's horizon is for tailing it; a month's fold (an invoice is drafted from it once
    and for all) must not lose a charge committed after some older transaction began."""
    writer = _Writer(app)
    january = datetime(2026, 1, 20, 9, 0, tzinfo=UTC)
    writer.charge(0, 0, january, 1_000_000, False, "sim-1")
    with psycopg.connect(database_url, autocommit=False) as older:
        older.execute("SELECT pg_current_xact_id()")  # a transaction id, older than what follows
        writer.charge(0, 0, january, 2_000_000, False, "sim-1")
        fold = fold_month(app, "2026-01", log=_log(app))
        older.rollback()
    workspace_id, projects = writer.workspaces[0]
    assert fold.workspaces[workspace_id].usage == {projects[0]: 3_000_000}


def _insert_raw(
    app: AgentWorks, originator_id: UUID, version: int, topic: str, state: dict[str, Any]
) -> None:
    """One event stored as given (an old release's shape, or one the write side never makes)."""
    stored = StoredEvent(
        originator_id=originator_id,
        originator_version=version,
        topic=topic,
        state=app.mapper.transcoder.encode(state),
    )
    app.recorder.insert_events([stored])


def test_a_correction_of_a_charge_never_charged_fails_alike(app: AgentWorks) -> None:
    workspace_id = uuid4()
    meta = EventMeta.for_command(workspace_id=workspace_id, actor="test").as_dict()
    state = {
        "timestamp": datetime(2026, 2, 2, tzinfo=UTC),
        "meta": meta,
        "amount_micros": 5,
        "reason": "orphan",
        "month": "2026-02",
    }
    _insert_raw(app, uuid4(), 2, get_topic(UsageCharge.Credited), state)

    errors = []
    for log in (_log(app), None):
        with pytest.raises(InvalidTransition) as raised:
            fold_month(app, "2026-02", log=log)
        errors.append(str(raised.value))
    assert errors[0] == errors[1]


# -- usage events at a newer class version ---------------------------------------------------------


def _charged_v1_v2(state: dict[str, Any]) -> None:
    state["billed_micros"] = state.pop("billed")


def _credited_v1_v2(state: dict[str, Any]) -> None:
    state["month"] = month_of(state["timestamp"])


@pytest.fixture
def evolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "Today's" classes: a charge's v1 stored ``billed`` (renamed), a credit's v1 had no month
    (the month of its timestamp)."""
    monkeypatch.setattr(UsageCharge.Charged, "class_version", 2, raising=False)
    monkeypatch.setattr(
        UsageCharge.Charged, "upcast_v1_v2", staticmethod(_charged_v1_v2), raising=False
    )
    monkeypatch.setattr(UsageCharge.Credited, "class_version", 2, raising=False)
    monkeypatch.setattr(
        UsageCharge.Credited, "upcast_v1_v2", staticmethod(_credited_v1_v2), raising=False
    )


def _old_rows(app: AgentWorks, writer: _Writer, moments: list[datetime]) -> None:
    """Charges and credits as the old release stored them (version 1, no class_version)."""
    for number, at in enumerate(moments):
        workspace_id, projects = writer.workspaces[number % 3]
        charge_id = uuid4()
        meta = writer.meta(workspace_id).as_dict()
        charged = {
            "timestamp": at, "originator_topic": get_topic(UsageCharge), "meta": meta,
            "workspace_id": workspace_id, "project_id": projects[number % 3],
            "card_id": uuid4(), "run_id": uuid4(), "call_id": "c", "provider": "simulated",
            "model": "old", "input_tokens": 1, "output_tokens": 1,
            "provider_cost_micros": 10 + number, "markup": "5", "billed": 50 + 5 * number,
            "price_table_version": "t", "month": month_of(at),
        }  # fmt: skip
        _insert_raw(app, charge_id, 1, get_topic(UsageCharge.Charged), charged)
        credited = {"timestamp": at, "meta": meta, "amount_micros": 7, "reason": "old"}
        _insert_raw(app, charge_id, 2, get_topic(UsageCharge.Credited), credited)


@pytest.mark.usefixtures("evolved")
def test_rows_of_an_older_class_version_are_upcast_as_the_mapper_does(app: AgentWorks) -> None:
    log = _log(app)
    assert not log.month_filter  # a credit's month may come from its upcaster

    @_EXAMPLES
    @given(operations, st.lists(_moments(), max_size=6))
    def check(ops: list[tuple[Any, ...]], old: list[datetime]) -> None:
        writer = _Writer(app)
        _old_rows(app, writer, old)
        writer.apply(ops)
        _assert_same_folds(app, log)

    check()


def test_the_in_memory_store_is_read_by_the_mapper() -> None:
    from commands.handlers import AgentWorks

    app = AgentWorks()
    assert billing_log_for(app.recorder, app.mapper) is None
