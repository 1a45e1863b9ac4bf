"""The billing read model: charges, the ledger, and the rollups that statements and usage read.

Every ``UsageCharge`` event becomes one ledger entry keyed by its global position: a charge with
its tokens, provider cost and billed amount; a credit or refund as a compensating entry with a
negative billed amount, no tokens and no cost, filed under the charge's dimensions (project,
card, run, provider, model). Each entry is added to every rollup in the same statement, so a
rollup is always exactly the sum of the ledger entries under it. Amounts are integer micro-USD.

The day of an entry is the UTC date of its event; its month is the ``month`` its event carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from projections.base import Change, Projector, Tables, on

if TYPE_CHECKING:
    from psycopg import Cursor, sql
    from psycopg.rows import DictRow

    from streams.envelope import EventEnvelope


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


@dataclass(frozen=True, kw_only=True)
class _Entry:
    """One ledger entry with the dimensions it rolls up under."""

    kind: LedgerKind
    charge_id: object
    project_id: object
    card_id: object
    run_id: object
    provider: str
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    provider_cost_micros: int
    billed_micros: int
    month: str


# A ledger entry and all its rollups, as common table expressions of one statement: fewer round
# trips in a rebuild, and no way to post an entry without its rollups.
_POST = (
    "entry AS ("
    " INSERT INTO {rm_ledger_entries} (workspace_id, entry_position, charge_id, kind, project_id,"
    " card_id, run_id, provider, model, input_tokens, output_tokens, provider_cost_micros,"
    " billed_micros, month, day, at)"
    " VALUES (%(ws)s, %(position)s, %(charge_id)s, %(kind)s, %(project_id)s, %(card_id)s,"
    " %(run_id)s, %(provider)s, %(model)s, %(input_tokens)s, %(output_tokens)s, %(cost)s,"
    " %(billed)s, %(month)s, %(day)s, %(at)s)"
    "), usage AS ("
    " INSERT INTO {rm_usage_daily} AS u (workspace_id, day, dimension, key, calls, input_tokens,"
    " output_tokens, provider_cost_micros, billed_micros)"
    " SELECT %(ws)s, %(day)s, d.dimension, d.key, %(calls)s, %(input_tokens)s,"
    " %(output_tokens)s, %(cost)s, %(billed)s"
    " FROM unnest(%(dimensions)s::text[], %(keys)s::text[]) AS d(dimension, key)"
    " ON CONFLICT (workspace_id, day, dimension, key) DO UPDATE SET"
    " calls = u.calls + EXCLUDED.calls,"
    " input_tokens = u.input_tokens + EXCLUDED.input_tokens,"
    " output_tokens = u.output_tokens + EXCLUDED.output_tokens,"
    " provider_cost_micros = u.provider_cost_micros + EXCLUDED.provider_cost_micros,"
    " billed_micros = u.billed_micros + EXCLUDED.billed_micros"
    "), line AS ("
    " INSERT INTO {rm_statement_lines} AS s (workspace_id, month, project_id,"
    " billed_exact_micros) VALUES (%(ws)s, %(month)s, %(project_id)s, %(billed)s)"
    " ON CONFLICT (workspace_id, month, project_id) DO UPDATE SET"
    " billed_exact_micros = s.billed_exact_micros + EXCLUDED.billed_exact_micros"
    ")"
    " INSERT INTO {rm_monthly_spend} AS m (workspace_id, month, billed_micros)"
    " VALUES (%(ws)s, %(month)s, %(billed)s)"
    " ON CONFLICT (workspace_id, month) DO UPDATE SET"
    " billed_micros = m.billed_micros + EXCLUDED.billed_micros"
)

# A new charge: its row, then its entry and rollups, in the same statement.
_CHARGE_AND_POST = (
    "WITH charge AS ("
    " INSERT INTO {rm_charges} (workspace_id, charge_id, project_id, card_id, run_id, call_id,"
    " provider, model, input_tokens, output_tokens, provider_cost_micros, markup, billed_micros,"
    " price_table_version, month, occurred_at)"
    " VALUES (%(ws)s, %(charge_id)s, %(project_id)s, %(card_id)s, %(run_id)s, %(call_id)s,"
    " %(provider)s, %(model)s, %(input_tokens)s, %(output_tokens)s, %(cost)s, %(markup)s,"
    " %(billed)s, %(price_table_version)s, %(month)s, %(at)s)"
    "), " + _POST
)


class BillingProjector(Projector):
    """Follows ``UsageCharge`` alone: a charge event carries its markup and billed amount, so the
    workspace's plan is not needed, and ``MonthlySpend`` (the write side's spend-limit guard)
    ignores corrections, which the read side's monthly spend must include."""

    name: ClassVar[str] = "billing"
    aggregates: ClassVar[frozenset[str]] = frozenset({"UsageCharge"})
    tables: ClassVar[tuple[str, ...]] = (
        "rm_charges",
        "rm_ledger_entries",
        "rm_usage_daily",
        "rm_statement_lines",
        "rm_monthly_spend",
    )

    @on("UsageCharge.Charged")
    def _charged(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        entry = _Entry(
            kind=LedgerKind.CHARGE,
            charge_id=env.originator_id,
            project_id=p["project_id"],
            card_id=p["card_id"],
            run_id=p["run_id"],
            provider=p["provider"],
            model=p["model"],
            calls=1,
            input_tokens=p["input_tokens"],
            output_tokens=p["output_tokens"],
            provider_cost_micros=p["provider_cost_micros"],
            billed_micros=p["billed_micros"],
            month=p["month"],
        )
        self._post(
            cur,
            t.q(_CHARGE_AND_POST),
            env,
            entry,
            call_id=p["call_id"],
            markup=p["markup"],
            price_table_version=p["price_table_version"],
        )

    @on("UsageCharge.Credited", "UsageCharge.Refunded")
    def _corrected(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        amount: int = env.payload["amount_micros"]
        cur.execute(
            t.q(
                "UPDATE {rm_charges} SET credited_micros = credited_micros + %s"
                " WHERE charge_id = %s"
                " RETURNING project_id, card_id, run_id, provider, model"
            ),
            (amount, env.originator_id),
        )
        charge = cur.fetchone()
        if charge is None:
            # The runner applies a charge's events in version order, so its Charged row exists;
            # without it the correction's dimensions are unknown and guessing would misfile money.
            raise RuntimeError(
                f"{env.type} at position {env.position} corrects charge {env.originator_id}, "
                "which the billing read model does not hold"
            )
        entry = _Entry(
            kind=LedgerKind.CREDIT if env.type == "UsageCharge.Credited" else LedgerKind.REFUND,
            charge_id=env.originator_id,
            project_id=charge["project_id"],
            card_id=charge["card_id"],
            run_id=charge["run_id"],
            provider=charge["provider"],
            model=charge["model"],
            calls=0,
            input_tokens=0,
            output_tokens=0,
            provider_cost_micros=0,
            billed_micros=-amount,
            month=env.payload["month"],
        )
        self._post(cur, t.q("WITH " + _POST), env, entry)

    @staticmethod
    def _post(
        cur: Cursor[DictRow],
        statement: sql.Composed,
        env: EventEnvelope,
        entry: _Entry,
        **more: object,
    ) -> None:
        """Run ``statement`` (which posts ``entry``) with the entry's values and ``more``."""
        day = env.timestamp.astimezone(UTC).date()
        keys: dict[UsageDimension, Any] = {
            UsageDimension.PROJECT: entry.project_id,
            UsageDimension.CARD: entry.card_id,
            UsageDimension.AGENT_RUN: entry.run_id,
            UsageDimension.PROVIDER: entry.provider,
            UsageDimension.MODEL: entry.model,
            UsageDimension.DAY: day.isoformat(),
        }
        cur.execute(
            statement,
            {
                "ws": env.workspace_id,
                "position": env.position,
                "charge_id": entry.charge_id,
                "kind": entry.kind.value,
                "project_id": entry.project_id,
                "card_id": entry.card_id,
                "run_id": entry.run_id,
                "provider": entry.provider,
                "model": entry.model,
                "calls": entry.calls,
                "input_tokens": entry.input_tokens,
                "output_tokens": entry.output_tokens,
                "cost": entry.provider_cost_micros,
                "billed": entry.billed_micros,
                "month": entry.month,
                "day": day,
                "at": env.timestamp,
                "dimensions": [dimension.value for dimension in keys],
                "keys": [str(key) for key in keys.values()],
                **more,
            },
        )
