"""What the API reads from the event log itself: a card's history and billing reconciliation.

Both answer questions the read models cannot be trusted with: what a card looked like at a
version (only the log remembers), and whether the billing read model still adds up to the log.
Events are read through the API pool (``agentworks_api`` sees the events of the workspace set for
its transaction only, by row-level security on their ``workspace_id`` column) and decoded
with the write side's mapper, so stored events are upcast exactly as the write side sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from adapters.eventlog import UNKNOWN_TIME, undecodable_envelope
from domain.billing import MonthFold, WorkspaceMonth
from domain.card import Card
from domain.envelope import EventEnvelope, envelope_from_event
from domain.errors import NotFound, UndecodableEvent, ValidationFailed

if TYPE_CHECKING:
    from collections.abc import Sequence

    from eventsourcing.domain import DomainEventProtocol
    from eventsourcing.persistence import Mapper
    from psycopg import Connection
    from psycopg.rows import DictRow

    from adapters.eventlog import Row

_BILLING_TOPICS = [get_topic(event) for event in MonthFold.FOLDS]
_CARD_AGGREGATE = Card.__name__


def _domain_event(mapper: Mapper[UUID], row: DictRow) -> DomainEventProtocol[UUID]:
    return mapper.to_domain_event(
        StoredEvent(
            originator_id=row["originator_id"],
            originator_version=int(row["originator_version"]),
            topic=row["topic"],
            state=bytes(row["state"]),
        )
    )


def _decode(mapper: Mapper[UUID], row: DictRow) -> EventEnvelope:
    return envelope_from_event(int(row["notification_id"]), _domain_event(mapper, row))


def aggregate_in_workspace(
    conn: Connection[DictRow], mapper: Mapper[UUID], *, aggregate_id: UUID, workspace_id: UUID
) -> str | None:
    """The kind of aggregate (``"Card"``) ``aggregate_id`` is, if it belongs to ``workspace_id``;
    ``None`` for an unknown id and for another workspace's alike, and for one whose first event
    cannot be decoded (no write can have been made on it since)."""
    row = conn.execute(
        "SELECT originator_id, originator_version, topic, state, notification_id"
        " FROM agentworks_events WHERE originator_id = %s ORDER BY originator_version LIMIT 1",
        (aggregate_id,),
    ).fetchone()
    if row is None:
        return None
    first = _readable(mapper, row)
    if first.undecodable:
        return None
    return first.aggregate if first.workspace_id == workspace_id else None


def written(conn: Connection[DictRow], *, aggregate_id: UUID, version: int, position: int) -> bool:
    """Whether the log holds ``aggregate_id`` at ``version`` and reaches ``position``: what a
    consistency token names, if a write ever made it (a forged one can name the future)."""
    row = conn.execute(
        "SELECT coalesce(max(originator_version), 0) >= %s AND agentworks_log_head() >= %s"
        " AS written FROM agentworks_events WHERE originator_id = %s",
        (version, position, aggregate_id),
    ).fetchone()
    return row is not None and bool(row["written"])


# -- card history ---------------------------------------------------------------------------------


def card_events(
    conn: Connection[DictRow],
    mapper: Mapper[UUID],
    *,
    card_id: UUID,
    workspace_id: UUID,
    last_version: int = 0,
) -> list[EventEnvelope]:
    """Every event of a card of ``workspace_id``, in version order (see :func:`card_log`);
    NotFound for anything else."""
    envelopes = card_log(conn, mapper, card_id=card_id, last_version=last_version)
    if envelopes[0].workspace_id != workspace_id:
        raise NotFound(f"card {card_id} does not exist")
    return envelopes


def card_log(
    conn: Connection[DictRow], mapper: Mapper[UUID], *, card_id: UUID, last_version: int = 0
) -> list[EventEnvelope]:
    """Every event of a card, whatever its workspace (for operators), in version order;
    NotFound when ``card_id`` is no card.

    One version per envelope, none left out: a stored event that cannot be decoded is an
    envelope marked undecodable (:func:`~adapters.eventlog.undecodable_envelope`), as the
    projectors get it, and so is each version this connection cannot see up to
    ``last_version`` (the card's last version as the write side knows it): row-level security
    hides from the API an event whose state names no workspace, a state that is not JSON among
    them."""
    rows = conn.execute(
        "SELECT originator_id, originator_version, topic, state, notification_id"
        " FROM agentworks_events WHERE originator_id = %s ORDER BY originator_version",
        (card_id,),
    ).fetchall()
    envelopes: list[EventEnvelope] = []
    for row in rows:
        version = int(row["originator_version"])
        if version > len(envelopes) + 1:
            envelopes += _unseen(card_id, after=len(envelopes), before=version)
        envelopes.append(_readable(mapper, row))
    if last_version > len(envelopes):
        envelopes += _unseen(card_id, after=len(envelopes), before=last_version + 1)
    if not envelopes or envelopes[0].aggregate != _CARD_AGGREGATE:
        raise NotFound(f"card {card_id} does not exist")
    return envelopes


def _readable(mapper: Mapper[UUID], row: DictRow) -> EventEnvelope:
    """The row's envelope, or, for a row that cannot be decoded, one marked so."""
    try:
        return _decode(mapper, row)
    except Exception as error:  # noqa: BLE001 - decoding is pure: the row's own fault
        stored: Row = (
            int(row["notification_id"]),
            row["originator_id"],
            int(row["originator_version"]),
            str(row["topic"]),
            bytes(row["state"]),
        )
        return undecodable_envelope(stored, error)


def _unseen(card_id: UUID, *, after: int, before: int) -> list[EventEnvelope]:
    """Envelopes for the versions between ``after`` and ``before`` (exclusive) that the store
    holds and this reader cannot see: no position, type or time."""
    hidden = UndecodableEvent("this reader cannot see the stored event (it names no workspace)")
    return [
        undecodable_envelope((0, card_id, version, "", b""), hidden)
        for version in range(after + 1, before)
    ]


def foldable_version(card_id: UUID, envelopes: Sequence[EventEnvelope], version: int) -> int:
    """The version up to which a card's state can be folded for a history at ``version``: that
    one, or the one before the first event up to it that could not be read
    (:class:`UndecodableEvent` when that is the first: nothing of the card can be shown)."""
    unread = next((e.originator_version for e in envelopes[:version] if e.undecodable), None)
    if unread is None:
        return version
    if unread == 1:
        raise UndecodableEvent(
            f"card {card_id}: its first event could not be decoded; nothing of it can be shown",
            version=1,
        )
    return unread - 1


def chosen_version(
    envelopes: list[EventEnvelope],
    *,
    as_of_version: int | None,
    as_of: datetime | None,
    names: tuple[str, str] = ("asOfVersion", "asOf"),
) -> int:
    """The version a history request asks for: explicit, the last one at ``as_of``, or now.

    ``names`` are what the caller called the two (GraphQL's arguments; the CLI's options), for
    refusals to name what was typed. An event whose time is unknown (it could not be read)
    counts at the time of the next one whose time is known: it was made no later."""
    latest = envelopes[-1].originator_version
    by_version, by_time = names
    if as_of_version is not None and as_of is not None:
        raise ValidationFailed(f"give {by_version} or {by_time}, not both")
    if as_of_version is not None:
        if not 1 <= as_of_version <= latest:
            raise ValidationFailed(
                f"{by_version} must be between 1 and {latest} for this card, got {as_of_version}"
            )
        return as_of_version
    if as_of is not None:
        before = [
            e.originator_version
            for e in envelopes
            if e.timestamp <= as_of and not (e.undecodable and e.timestamp == UNKNOWN_TIME)
        ]
        if not before:
            raise NotFound(
                f"card {envelopes[0].originator_id} did not exist at {as_of.isoformat()}"
            )
        return before[-1]
    return latest


# -- reconciliation -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LedgerComparison:
    event_log_total: int
    read_model_total: int
    event_log_by_project: dict[UUID, int]
    ledger_by_project: dict[UUID, int]
    statement_by_project: dict[UUID, int]
    event_log_credits: dict[UUID, int]
    """Workspace credits granted in the month, by credit id (positive amounts)."""
    read_model_credits: dict[UUID, int]
    invoiced_total: int | None
    """The rounded total of the month's invoice as issued (what was sent to Stripe), if any."""


def reconcile(
    conn: Connection[DictRow],
    mapper: Mapper[UUID],
    *,
    workspace_id: UUID,
    month: str,
    prefilter_json: bool,
) -> LedgerComparison:
    """Net billed per project for ``month`` by the event log, the ledger and the statement lines,
    and the month's workspace credits by the log and by the read model.

    The log's figure is :class:`~domain.billing.MonthFold`'s, as the write side's statements and
    ``agentworks billing reconcile`` compute it: ``Charged`` billed amounts minus ``Credited``
    and ``Refunded`` amounts, each counted in the month its event names, a correction filed under
    its charge's project. The events are streamed, not held, whatever the workspace's history.
    """
    conn_args: list[Any] = [_BILLING_TOPICS]
    sql = (
        "SELECT originator_id, originator_version, topic, state"
        " FROM agentworks_events WHERE topic = ANY(%s)"
    )
    if prefilter_json:
        # Plain JSON state (no cipher or compression): let Postgres skip other workspaces.
        sql += " AND convert_from(state, 'UTF8')::jsonb #>> '{meta,workspace_id}' = %s"
        conn_args.append(str(workspace_id))
    # The write side's own fold of the log (statements and the CLI's reconciliation rest on
    # it), fed the mapper's events; row-level security has already kept other workspaces out.
    fold = MonthFold(month)
    with conn.cursor() as cur:
        for row in cur.stream(sql + " ORDER BY notification_id", conn_args, size=1000):
            fold.add(_domain_event(mapper, row))
    figures = fold.workspaces.get(workspace_id, WorkspaceMonth({}, {}, []))
    by_project = dict(figures.usage)
    credits = {credit.credit_id: credit.amount_micros for credit in figures.credits}

    def month_figures(query: str) -> dict[UUID, int]:
        """The workspace's ``(key, micros)`` rows of the month that ``query`` selects."""
        rows = conn.execute(query, (workspace_id, month)).fetchall()
        return {row["key"]: int(row["micros"]) for row in rows}

    ledger = month_figures(
        "SELECT project_id AS key, sum(billed_micros) AS micros FROM rm_ledger_entries"
        " WHERE workspace_id = %s AND month = %s GROUP BY project_id"
    )
    statement = month_figures(
        "SELECT project_id AS key, billed_exact_micros AS micros FROM rm_statement_lines"
        " WHERE workspace_id = %s AND month = %s"
    )
    read_model_credits = month_figures(
        "SELECT credit_id AS key, amount_micros AS micros FROM rm_billing_credits"
        " WHERE workspace_id = %s AND month = %s"
    )
    invoice = conn.execute(
        "SELECT total_micros FROM rm_invoices"
        " WHERE workspace_id = %s AND month = %s AND stripe_invoice_id IS NOT NULL",
        (workspace_id, month),
    ).fetchone()
    return LedgerComparison(
        event_log_total=sum(by_project.values()) - sum(credits.values()),
        read_model_total=sum(ledger.values()) - sum(read_model_credits.values()),
        event_log_by_project=by_project,
        ledger_by_project=ledger,
        statement_by_project=statement,
        event_log_credits=credits,
        read_model_credits=read_model_credits,
        invoiced_total=int(invoice["total_micros"]) if invoice else None,
    )
