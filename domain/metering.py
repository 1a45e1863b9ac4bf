"""Metering: charging one finished LLM call on its run, its charge and the month's spend.

A call touches three aggregates that must agree: the run counts it (``LlmCallCompleted``), a
:class:`UsageCharge` bills it and the month's :class:`MonthlySpend` adds it up (and notes any
50/80/100 % threshold it crosses). :func:`charge_llm_call` is the one place that keeps them in
step, so that a charge is always billed in the month of the spend it is added to.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from domain.agent_run import AgentRun
from domain.meta import EventMeta
from domain.usage import MonthlySpend, UsageCharge
from domain.workspace import Workspace


@dataclass(frozen=True, kw_only=True)
class LlmCall:
    """One finished call to a provider, priced: what it used, what it cost us and what we bill."""

    call_id: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: int
    provider_cost_micros: int
    billed_micros: int
    price_table_version: str
    at: datetime
    worker: str | None = None
    """The worker that made the call, when a worker did (it may since have lost the run)."""


def charge_llm_call(
    run: AgentRun,
    workspace: Workspace,
    spend: MonthlySpend,
    call: LlmCall,
    *,
    meta: EventMeta,
) -> UsageCharge:
    """Charge ``call`` on ``run``: a new charge at the workspace's markup, billed in ``spend``'s
    month (the open month the caller chose for ``call.at``), the call recorded on the run and
    added to ``spend`` with any threshold of the workspace's monthly limit it crosses. The
    caller saves the run, the returned charge and the spend together."""
    charge = UsageCharge.charge(
        workspace_id=run.workspace_id,
        project_id=run.project_id,
        card_id=run.card_id,
        run_id=run.id,
        call_id=call.call_id,
        provider=call.provider,
        model=call.model,
        input_tokens=call.input_tokens,
        output_tokens=call.output_tokens,
        provider_cost_micros=call.provider_cost_micros,
        markup=workspace.markup,
        billed_micros=call.billed_micros,
        price_table_version=call.price_table_version,
        at=call.at,
        meta=meta,
        billed_month=spend.month,
    )
    run.record_llm_call(
        call_id=call.call_id,
        charge_id=charge.id,
        provider=call.provider,
        model=call.model,
        input_tokens=call.input_tokens,
        output_tokens=call.output_tokens,
        latency_ms=call.latency_ms,
        provider_cost_micros=call.provider_cost_micros,
        billed_micros=call.billed_micros,
        meta=meta,
        worker=call.worker,
    )
    spend.add(charge.id, call.billed_micros, meta=meta)
    spend.note_thresholds(workspace.monthly_limit_micros, meta=meta)
    return charge
