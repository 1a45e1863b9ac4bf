"""The billing read model: charges, the ledger, and the rollups that statements and usage read.

Every ``UsageCharge`` event becomes one ledger entry keyed by its global position: a charge with
its tokens, provider cost and billed amount; a credit or refund as a compensating entry with a
negative billed amount, no tokens and no cost, filed under the charge's dimensions (project,
card, run, provider, model). Each entry is added to every rollup in the same statement, so a
rollup is always exactly the sum of the ledger entries under it. Amounts are integer micro-USD.

The day of an entry is the UTC date of its event; its month is the ``month`` its event carries.

``rm_monthly_spend`` keeps two totals: ``billed_micros``, net of corrections (statements), and
``charged_micros``, the month's usage that spend limits count (charges only, so it only grows).
After each commit the runner hands the new usage totals, and the charges they count, to whoever
feeds the Redis spend counter (``BatchContext.spend``; ``adapters.spend_counter``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

from psycopg.types.json import Jsonb

from domain.budget_holds import CountedSpend
from domain.events import (
    EventPayload,
    InvoiceDrafted,
    InvoiceIssued,
    InvoiceItemSent,
    InvoicePaid,
    InvoiceVoided,
    MonthlySpendAdded,
    MonthlySpendClosed,
    MonthlySpendCorrectionFiled,
    MonthlySpendCreditGranted,
    MonthlySpendOpened,
    MonthlySpendThresholdCrossed,
    UsageChargeCharged,
    UsageChargeCredited,
    UsageChargeRefunded,
    events_of,
)
from domain.months import month_of
from projections.base import MEMO_DROPPED, BatchContext, Projector
from projections.batch import columns_of, fetch_all, insert_rows

if TYPE_CHECKING:
    from domain.envelope import EventEnvelope


class UsageDimension(StrEnum):
    """What ``rm_usage_daily`` rolls usage up by; its ``key`` is the id, name or ISO date."""

    PROJECT = "PROJECT"
    CARD = "CARD"
    AGENT_RUN = "AGENT_RUN"
    PROVIDER = "PROVIDER"
    MODEL = "MODEL"
    DAY = "DAY"


class LedgerKind(StrEnum):
    CHARGE = "CHARGE"
    CREDIT = "CREDIT"
    REFUND = "REFUND"


_CHARGE_COLUMNS = (
    ("workspace_id", "uuid"),
    ("charge_id", "uuid"),
    ("project_id", "uuid"),
    ("card_id", "uuid"),
    ("run_id", "uuid"),
    ("call_id", "text"),
    ("provider", "text"),
    ("model", "text"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("provider_cost_micros", "bigint"),
    ("markup", "text"),
    ("billed_micros", "bigint"),
    ("credited_micros", "bigint"),
    ("price_table_version", "text"),
    ("month", "text"),
    ("occurred_at", "timestamptz"),
)
_LEDGER_COLUMNS = (
    ("workspace_id", "uuid"),
    ("entry_position", "bigint"),
    ("charge_id", "uuid"),
    ("kind", "text"),
    ("project_id", "uuid"),
    ("card_id", "uuid"),
    ("run_id", "uuid"),
    ("provider", "text"),
    ("model", "text"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("provider_cost_micros", "bigint"),
    ("billed_micros", "bigint"),
    ("month", "text"),
    ("day", "date"),
    ("at", "timestamptz"),
)
_DIMENSIONS = tuple(UsageDimension)
_CREDIT_COLUMNS = (
    ("workspace_id", "uuid"),
    ("credit_id", "uuid"),
    ("month", "text"),
    ("amount_micros", "bigint"),
    ("reason", "text"),
    ("at", "timestamptz"),
)
_INVOICE_COLUMNS = (
    ("workspace_id", "uuid"),
    ("month", "text"),
    ("invoice_id", "uuid"),
    ("lines", "jsonb"),
    ("total_micros", "bigint"),
    ("stripe_invoice_id", "text"),
    ("status", "text"),
    ("billing_increment_micros", "bigint"),
)
#: The status an invoice's event leaves it in.
INVOICE_STATUS: dict[type[EventPayload], str] = {
    InvoiceIssued: "open",
    InvoicePaid: "paid",
    InvoiceVoided: "void",
}

#: Rollups take the batch's sums, added to what they hold (one row per key and statement).
_ADD_USAGE = (
    "INSERT INTO {rm_usage_daily} AS u (workspace_id, day, dimension, key, calls, input_tokens,"
    " output_tokens, provider_cost_micros, billed_micros)"
    " SELECT * FROM unnest(%s::uuid[], %s::date[], %s::text[], %s::text[], %s::bigint[],"
    " %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])"
    " ON CONFLICT (workspace_id, day, dimension, key) DO UPDATE SET"
    " calls = u.calls + EXCLUDED.calls,"
    " input_tokens = u.input_tokens + EXCLUDED.input_tokens,"
    " output_tokens = u.output_tokens + EXCLUDED.output_tokens,"
    " provider_cost_micros = u.provider_cost_micros + EXCLUDED.provider_cost_micros,"
    " billed_micros = u.billed_micros + EXCLUDED.billed_micros"
)
_ADD_LINES = (
    "INSERT INTO {rm_statement_lines} AS s (workspace_id, month, project_id, billed_exact_micros)"
    " SELECT * FROM unnest(%s::uuid[], %s::text[], %s::uuid[], %s::bigint[])"
    " ON CONFLICT (workspace_id, month, project_id) DO UPDATE SET"
    " billed_exact_micros = s.billed_exact_micros + EXCLUDED.billed_exact_micros"
)
_ADD_SPEND = (
    "INSERT INTO {rm_monthly_spend} AS m (workspace_id, month, billed_micros, charged_micros)"
    " SELECT * FROM unnest(%s::uuid[], %s::text[], %s::bigint[], %s::bigint[])"
    " ON CONFLICT (workspace_id, month) DO UPDATE SET"
    " billed_micros = m.billed_micros + EXCLUDED.billed_micros,"
    " charged_micros = m.charged_micros + EXCLUDED.charged_micros"
    " RETURNING workspace_id, month, charged_micros"
)

Dimensions = tuple[str, str, str, str, str]
"""A charge's project, card, run (as text), provider and model: what its entries file under."""

_MEMO_CHARGES = "billing.charges"
#: How many charges a rebuild remembers before it forgets them and asks the table instead.
MEMO_LIMIT = 1_000_000


class BillingProjector(Projector):
    """Follows ``UsageCharge`` alone: a charge event carries its markup and billed amount, so the
    workspace's plan is not needed, and ``MonthlySpend`` (the write side's spend-limit guard)
    ignores corrections, which the read side's monthly spend must include."""

    name: ClassVar[str] = "billing"
    aggregates: ClassVar[frozenset[str]] = frozenset({"UsageCharge", "MonthlySpend", "Invoice"})
    tables: ClassVar[tuple[str, ...]] = (
        "rm_charges",
        "rm_ledger_entries",
        "rm_usage_daily",
        "rm_statement_lines",
        "rm_monthly_spend",
        "rm_billing_credits",
        "rm_invoices",
    )
    ignores: ClassVar[frozenset[type[EventPayload]]] = frozenset(
        {
            InvoiceItemSent,
            MonthlySpendAdded,
            MonthlySpendClosed,
            MonthlySpendCorrectionFiled,
            MonthlySpendOpened,
            MonthlySpendThresholdCrossed,
        }
    ) | events_of(
        "AgentRun",
        "ApiKey",
        "Card",
        "EmailClaim",
        "Invitation",
        "OidcLink",
        "Project",
        "Session",
        "User",
        "Workspace",
    )
    handles: ClassVar[frozenset[type[EventPayload]]] = frozenset(
        {
            UsageChargeCharged,
            UsageChargeCredited,
            UsageChargeRefunded,
            MonthlySpendCreditGranted,
            *INVOICE_STATUS,
            InvoiceDrafted,
        }
    )
    #: Tables the projector only ever inserts into, new rows only: a rebuild builds their keys
    #: after loading them (see :mod:`projections.rebuild`).
    insert_only: ClassVar[frozenset[str]] = frozenset({"rm_ledger_entries"})

    # -- the batch path ----------------------------------------------------------------------------

    def apply_batch(self, ctx: BatchContext, envelopes: Sequence[EventEnvelope]) -> None:
        """A batch's charges, corrections, entries and rollups in a few statements.

        The same rows as event by event: charges inserted (with the batch's corrections already
        counted), older charges' ``credited_micros`` raised, every entry inserted, and each
        rollup key raised once by the sum of the batch's entries under it. Corrections of
        charges from earlier batches read those charges' dimensions in one query (a rebuild
        remembers them instead).
        """
        remembered: dict[UUID, Dimensions] = (
            ctx.memo.setdefault(_MEMO_CHARGES, {}) if ctx.copy and ctx.exclusive else {}
        )
        if len(remembered) > MEMO_LIMIT:
            remembered.clear()
            ctx.memo[_MEMO_CHARGES + ".partial"] = True
        complete = (
            ctx.copy
            and ctx.exclusive
            and _MEMO_CHARGES + ".partial" not in ctx.memo
            and MEMO_DROPPED not in ctx.memo
        )
        self._fold_credits_and_invoices(ctx, envelopes)
        created: set[UUID] = set()
        ask: set[UUID] = set()
        for env in envelopes:
            ev = env.event
            if isinstance(ev, UsageChargeCharged):
                created.add(env.originator_id)
            elif (
                isinstance(ev, UsageChargeCredited | UsageChargeRefunded)
                and env.originator_id not in created
                and env.originator_id not in remembered
            ):
                ask.add(env.originator_id)
        known: dict[UUID, Dimensions] = remembered
        if ask and not complete:
            asked = fetch_all(
                ctx.cur,
                ctx.tables.q(
                    "SELECT charge_id, project_id, card_id, run_id, provider, model"
                    " FROM {rm_charges} WHERE charge_id = ANY(%s::uuid[])"
                ),
                (list(ask),),
            )
            for row in asked:
                known[row["charge_id"]] = (
                    str(row["project_id"]),
                    str(row["card_id"]),
                    str(row["run_id"]),
                    row["provider"],
                    row["model"],
                )
        charges: dict[UUID, list[Any]] = {}
        credited: dict[UUID, int] = {}
        entries: list[tuple[Any, ...]] = []
        usage: dict[tuple[str, date, str, str], list[int]] = {}
        lines: dict[tuple[str, str, str], int] = {}
        spend: dict[tuple[str, str], list[int]] = {}
        counted: dict[tuple[str, str], list[tuple[str, UUID]]] = {}
        for env in envelopes:
            ev = env.event
            if type(ev) not in self.handles:
                continue
            workspace_id = str(env.workspace_id) if env.workspace_id is not None else None
            if isinstance(ev, UsageChargeCharged):
                dims: Dimensions = (
                    str(ev.project_id),
                    str(ev.card_id),
                    str(ev.run_id),
                    ev.provider,
                    ev.model,
                )
                known[env.originator_id] = dims
                charges[env.originator_id] = [
                    workspace_id,
                    str(env.originator_id),
                    *dims[:3],
                    ev.call_id,
                    *dims[3:],
                    ev.input_tokens,
                    ev.output_tokens,
                    ev.provider_cost_micros,
                    ev.markup,
                    ev.billed_micros,
                    0,
                    ev.price_table_version,
                    ev.month,
                    env.timestamp,
                ]
                kind = LedgerKind.CHARGE.value
                calls, tokens_in, tokens_out = 1, ev.input_tokens, ev.output_tokens
                cost, billed = ev.provider_cost_micros, ev.billed_micros
            elif isinstance(ev, UsageChargeCredited | UsageChargeRefunded):
                found = known.get(env.originator_id)
                if found is None:
                    raise RuntimeError(
                        f"{env.type} at position {env.position} corrects charge "
                        f"{env.originator_id}, which the billing read model does not hold"
                    )
                dims = found
                amount: int = ev.amount_micros
                charge = charges.get(env.originator_id)
                if charge is not None:
                    charge[13] += amount
                else:
                    credited[env.originator_id] = credited.get(env.originator_id, 0) + amount
                kind = (
                    LedgerKind.CREDIT.value
                    if isinstance(ev, UsageChargeCredited)
                    else LedgerKind.REFUND.value
                )
                calls, tokens_in, tokens_out, cost, billed = 0, 0, 0, 0, -amount
            else:
                continue
            month: str = ev.month
            day = env.timestamp.astimezone(UTC).date()
            project_id, card_id, run_id, provider, model = dims
            entries.append(
                (
                    workspace_id,
                    env.position,
                    str(env.originator_id),
                    kind,
                    project_id,
                    card_id,
                    run_id,
                    provider,
                    model,
                    tokens_in,
                    tokens_out,
                    cost,
                    billed,
                    month,
                    day,
                    env.timestamp,
                )
            )
            amounts = (calls, tokens_in, tokens_out, cost, billed)
            keys = (project_id, card_id, run_id, provider, model, day.isoformat())
            for dimension, key in zip(_DIMENSIONS, keys, strict=True):
                rollup = (workspace_id or "", day, dimension.value, str(key))
                total = usage.get(rollup)
                if total is None:
                    usage[rollup] = list(amounts)
                else:
                    for i, amount_ in enumerate(amounts):
                        total[i] += amount_
            line = (workspace_id or "", month, project_id)
            lines[line] = lines.get(line, 0) + billed
            month_key = (workspace_id or "", month)
            month_spend = spend.setdefault(month_key, [0, 0])
            month_spend[0] += billed
            if kind == LedgerKind.CHARGE.value:
                month_spend[1] += billed
                counted.setdefault(month_key, []).append(
                    (month_of(env.timestamp), env.originator_id)
                )
        cur, t = ctx.cur, ctx.tables
        insert_rows(ctx, "rm_charges", _CHARGE_COLUMNS, list(charges.values()))
        if credited:
            cur.execute(
                t.q(
                    "UPDATE {rm_charges} AS c SET credited_micros = c.credited_micros + v.amount"
                    " FROM unnest(%s::uuid[], %s::bigint[]) AS v(id, amount)"
                    " WHERE c.charge_id = v.id"
                ),
                (list(credited), list(credited.values())),
            )
        insert_rows(ctx, "rm_ledger_entries", _LEDGER_COLUMNS, entries)
        if usage:
            ordered = sorted(usage.items())
            cur.execute(
                t.q(_ADD_USAGE),
                columns_of([(*k, *v) for k, v in ordered], 9),
            )
        if lines:
            cur.execute(t.q(_ADD_LINES), columns_of([(*k, v) for k, v in sorted(lines.items())], 4))
        if spend:
            added = fetch_all(
                cur, t.q(_ADD_SPEND), columns_of([(*k, *v) for k, v in sorted(spend.items())], 4)
            )
            if ctx.spend is not None:
                for row in added:
                    of_month = counted.get((str(row["workspace_id"]), row["month"]), [])
                    ctx.spend.append(
                        CountedSpend(
                            row["workspace_id"],
                            row["month"],
                            int(row["charged_micros"]),
                            tuple(of_month),
                        )
                    )

    def _fold_credits_and_invoices(
        self, ctx: BatchContext, envelopes: Sequence[EventEnvelope]
    ) -> None:
        """Credits granted and invoices drafted are inserted; an invoice's later events set its
        status (and Stripe's id, once known) on the row drafted in this batch, or else on the
        table's with one update."""
        credits: list[tuple[Any, ...]] = []
        drafted: dict[UUID, list[Any]] = {}
        # An invoice drafted before this batch → [its last status, Stripe's id (None: keep)].
        later: dict[UUID, list[Any]] = {}
        for env in envelopes:
            ev = env.event
            if isinstance(ev, MonthlySpendCreditGranted):
                credits.append(
                    (env.workspace_id, ev.credit_id, ev.month, ev.amount_micros, ev.reason,
                     env.timestamp)
                )  # fmt: skip
            elif isinstance(ev, InvoiceDrafted):
                drafted[env.originator_id] = [
                    env.workspace_id, ev.month, env.originator_id, Jsonb(ev.lines),
                    ev.total_micros, None, "drafted",
                    getattr(ev, "billing_increment_micros", None),
                ]  # fmt: skip
            elif isinstance(ev, InvoiceIssued | InvoicePaid | InvoiceVoided):
                stripe_id = ev.stripe_invoice_id if isinstance(ev, InvoiceIssued) else None
                row = drafted.get(env.originator_id)
                if row is not None:
                    row[5] = stripe_id if stripe_id is not None else row[5]
                    row[6] = INVOICE_STATUS[type(ev)]
                else:
                    known = later.setdefault(env.originator_id, [None, None])
                    known[0] = INVOICE_STATUS[type(ev)]
                    known[1] = stripe_id if stripe_id is not None else known[1]
        insert_rows(ctx, "rm_billing_credits", _CREDIT_COLUMNS, credits)
        insert_rows(ctx, "rm_invoices", _INVOICE_COLUMNS, list(drafted.values()))
        if later:
            ordered = sorted(later.items())
            ctx.cur.execute(
                ctx.tables.q(
                    "UPDATE {rm_invoices} AS i SET status = v.status,"
                    " stripe_invoice_id = coalesce(v.stripe_invoice_id, i.stripe_invoice_id)"
                    " FROM unnest(%s::uuid[], %s::text[], %s::text[])"
                    " AS v(invoice_id, status, stripe_invoice_id)"
                    " WHERE i.invoice_id = v.invoice_id"
                ),
                (
                    [key for key, _ in ordered],
                    [status for _, (status, _) in ordered],
                    [stripe_id for _, (_, stripe_id) in ordered],
                ),
            )
