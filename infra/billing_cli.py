"""``agentworks credit``, ``invoice`` and ``reconcile``: the monthly billing routine's commands.

Registered on the main app by :mod:`infra.cli`. Exit codes as everywhere: 0 done, 1 some
workspace failed (Stripe unreachable or refusing, a discrepancy found), 2 bad input (one line on
stderr).
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import pydantic
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from domain.billing import Reconciliation, require_ended, require_not_future
from domain.errors import AgentWorksError, ValidationFailed
from domain.money import format_usd
from domain.months import parse_month
from infra.cli_common import (
    EXIT_FAILED,
    CliError,
    DataDirOption,
    database_url_for,
    printable,
    settings_for,
    shown,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from adapters.stripe import StripeBilling
    from commands.billing import Billing, InvoiceResult
    from infra.settings import Settings

_CLI_ACTOR = "billing-cli"

_Month = Annotated[str, typer.Option("--month", help="Billing month, YYYY-MM (UTC).")]
_Workspace = Annotated[
    str | None,
    typer.Option("--workspace", help="Only this workspace (its id).", show_default=False),
]


def _workspace_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise ValidationFailed(
            f"--workspace must be a workspace id (a UUID), got {text!r}"
        ) from None


def _stripe(settings: Settings) -> StripeBilling | None:
    """Stripe as configured, or ``None`` without an API key."""
    from adapters.stripe import StripeBilling

    if settings.stripe_api_key is None:
        return None
    return StripeBilling(
        api_key=settings.stripe_api_key.get_secret_value(), api_base=settings.stripe_api_base
    )


def _workspaces(billing: Billing, workspace: str | None) -> list[UUID]:
    if workspace is None:
        return billing.workspace_ids()
    workspace_id = _workspace_id(workspace)
    billing.workspace(workspace_id)  # NotFound (exit 2) for an unknown id
    return [workspace_id]


def credit_command(
    workspace: Annotated[str, typer.Option("--workspace", help="Workspace id.")],
    amount: Annotated[str, typer.Option("--amount", help="USD to credit, e.g. 10.00.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (shown on the statement).")],
    command_id: Annotated[
        str | None,
        typer.Option(
            "--command-id",
            help="A UUID naming this credit: run again with the same one (after a failure whose "
            "outcome is unknown), it is granted once.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Credit a workspace: a compensating event, a negative line on its next statement."""
    from commands.billing import Billing, GrantCredit
    from commands.handlers import Actor
    from infra.bootstrap import write_side_from

    settings = settings_for(data_dir)
    workspace_id = _workspace_id(workspace)
    try:
        cmd = GrantCredit(
            workspace_id=workspace_id, amount=amount, reason=reason, at=datetime.now(UTC),
            command_id=command_id,
        )  # fmt: skip
    except pydantic.ValidationError as error:
        # A traceback (exit 1) otherwise: bad input is one line and exit 2, as everywhere.
        problems = "; ".join(
            f"--{'.'.join(str(part) for part in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in error.errors()
        )
        raise ValidationFailed(problems) from None
    app = write_side_from(settings, database_url_for(settings))
    try:
        result = Billing(app).grant_credit(cmd, Actor.service(_CLI_ACTOR, workspace_id))
    finally:
        app.close()
    typer.echo(
        f"credit {result.extra['credit_id']} recorded; it shows on the "
        f"{result.extra['month']} statement of workspace {workspace_id}"
    )


def plan_command(
    workspace: Annotated[str, typer.Option("--workspace", help="Workspace id.")],
    markup: Annotated[str, typer.Option("--markup", help='Multiplier of provider cost, e.g. "5".')],
    increment: Annotated[
        str, typer.Option("--increment", help="Billing increment in USD, whole cents, e.g. 0.25.")
    ],
    data_dir: DataDirOption = None,
) -> None:
    """Set a workspace's plan: the markup its calls are billed at from now on and the increment
    its statement lines are rounded up to. The operator's to set, never the workspace's own."""
    from commands import models as m
    from commands.handlers import Actor
    from infra.bootstrap import write_side_from

    settings = settings_for(data_dir)
    workspace_id = _workspace_id(workspace)
    cmd = m.SetPlan(workspace_id=workspace_id, markup=markup, billing_increment=increment)
    app = write_side_from(settings, database_url_for(settings))
    try:
        app.set_plan(cmd, Actor.service(_CLI_ACTOR, workspace_id))
    finally:
        app.close()
    typer.echo(
        f"workspace {workspace_id}: calls billed at markup {markup} from now on, statement "
        f"lines rounded up to {increment} USD"
    )


@dataclass
class _Failure:
    workspace_id: UUID
    error: str


def _over_workspaces(
    label: str, workspace_ids: list[UUID], work: Callable[[UUID], Any]
) -> tuple[list[Any], list[_Failure]]:
    """Run ``work`` per workspace under a progress bar; a failure is kept and the rest go on."""
    done: list[Any] = []
    failed: list[_Failure] = []
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=len(workspace_ids))
        for workspace_id in workspace_ids:
            try:
                done.append(work(workspace_id))
            except AgentWorksError as error:
                failed.append(_Failure(workspace_id, str(error)))
            progress.advance(task)
    return done, failed


def invoice_command(
    month: _Month, workspace: _Workspace = None, data_dir: DataDirOption = None
) -> int:
    """Close the month and issue its Stripe invoice per workspace; re-runs create nothing twice."""
    from adapters.billing_log import billing_log_for
    from commands.billing import Billing, fold_month
    from infra.bootstrap import write_side_from

    settings = settings_for(data_dir)
    month = require_ended(parse_month(month), datetime.now(UTC))
    stripe = _stripe(settings)
    if stripe is None:
        raise ValidationFailed("AGENTWORKS_STRIPE_API_KEY is not set; invoicing needs Stripe")
    database_url = database_url_for(settings)
    with ExitStack() as stack:
        stack.callback(stripe.close)
        _hold_invoicing_lock(stack, database_url)
        app = write_side_from(settings, database_url)
        stack.callback(app.close)
        billing = Billing(app)
        workspace_ids = _workspaces(billing, workspace)

        def close(workspace_id: UUID) -> UUID:
            billing.close_month(workspace_id, month)
            return workspace_id

        # A month that cannot be closed fails its workspace alone, as any step of its invoice.
        closed, not_closed = _over_workspaces(f"closing {month}", workspace_ids, close)
        # Every figure of a closed month is in the log: one pass serves every workspace.
        fold = fold_month(app, month, log=billing_log_for(app.recorder, app.mapper))
        done, failed = _over_workspaces(
            f"invoicing {month}",
            closed,
            lambda workspace_id: billing.invoice(stripe, workspace_id, month, fold=fold),
        )
        failed = not_closed + failed
    _invoice_summary(month, done, failed)
    return EXIT_FAILED if failed else 0


#: Key of the advisory lock held by an invoicing run for as long as it talks to Stripe.
INVOICE_LOCK_KEY = 0x61_77_2D_69_6E_76_6F_69  # "aw-invoi"


def _hold_invoicing_lock(stack: ExitStack, database_url: str) -> None:
    """Take the invoicing lock for the rest of ``stack`` (its session ends with it), or refuse.

    Each step of an invoice looks Stripe up before it creates anything, which makes a re-run
    safe, not two runs at once: both would find no item for a line, both create one, and the
    invoice sweeps every pending item of the customer in, billing the line twice (and a run of
    another month could sweep this month's items into its own invoice).
    """
    from adapters.postgres import connect

    conn = stack.enter_context(connect(database_url, autocommit=True))
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (INVOICE_LOCK_KEY,)).fetchone()
    if row is None or not row[0]:
        raise CliError(
            "another 'agentworks invoice' is running on this database; run this one again "
            "once it has finished",
            exit_code=EXIT_FAILED,
        )


def _invoice_summary(month: str, done: list[InvoiceResult], failed: list[_Failure]) -> None:
    from commands.billing import Outcome

    table = Table(title=f"Invoices for {month}")
    for column in ("workspace", "outcome", "invoice", "total"):
        table.add_column(column, overflow="fold")
    for result in done:
        table.add_row(
            str(result.workspace_id),
            result.outcome.value,
            result.stripe_invoice_id or "-",
            format_usd(result.total_micros),
        )
    Console().print(table)
    _report_failures(failed)
    counts = Counter(result.outcome for result in done)
    typer.echo(
        ", ".join(f"{counts[outcome]} {outcome.value}" for outcome in Outcome)
        + f", {len(failed)} failed"
    )


def _report_failures(failed: list[_Failure]) -> None:
    """One line per failed workspace on stderr, whole ids (a table would abbreviate them)."""
    for failure in failed:
        message = printable(" ".join(failure.error.split()))
        typer.echo(f"workspace {failure.workspace_id} failed: {message}", err=True)


def reconcile_command(
    month: _Month,
    workspace: _Workspace = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    data_dir: DataDirOption = None,
) -> int:
    """Recompute the month from the event log; compare with the read model and Stripe."""
    from adapters.billing_log import billing_log_for
    from adapters.postgres import PROJECTOR_ROLE, make_pool
    from commands.billing import Billing, fold_month
    from infra.bootstrap import write_side_from
    from projections.queries import statement, statement_as_lines

    settings = settings_for(data_dir)
    month = require_not_future(parse_month(month), datetime.now(UTC))
    database_url = database_url_for(settings)
    with ExitStack() as stack:
        stripe = _stripe(settings)
        if stripe is not None:
            stack.callback(stripe.close)
        app = write_side_from(settings, database_url)
        stack.callback(app.close)
        pool = make_pool(database_url, role=PROJECTOR_ROLE, max_size=1)
        stack.callback(pool.close)
        billing = Billing(app)
        workspace_ids = _workspaces(billing, workspace)
        fold = fold_month(app, month, log=billing_log_for(app.recorder, app.mapper))

        def one(workspace_id: UUID) -> Reconciliation:
            with pool.connection() as conn:
                read_model = statement_as_lines(statement(conn, workspace_id, month))
            return billing.reconcile(
                stripe, workspace_id, month, fold=fold, read_model_lines=read_model
            )

        done, failed = _over_workspaces(f"reconciling {month}", workspace_ids, one)
    if as_json:
        typer.echo(json.dumps(_as_json(month, done, failed, stripe is not None), indent=2))
    else:
        _reconcile_summary(month, done, failed, stripe is not None)
    bad = failed or any(not result.ok for result in done)
    return EXIT_FAILED if bad else 0


def _as_json(
    month: str, done: list[Reconciliation], failed: list[_Failure], with_stripe: bool
) -> dict[str, Any]:
    return {
        "month": month,
        "stripeCompared": with_stripe,
        "ok": not failed and all(r.ok for r in done),
        "workspaces": [
            {
                "workspaceId": str(r.workspace_id),
                "eventLogTotal": format_usd(r.event_log_total_micros),
                "readModelTotal": format_usd(r.read_model_total_micros),
                "invoicedTotal": None
                if r.invoiced_total_micros is None
                else format_usd(r.invoiced_total_micros),
                "ok": r.ok,
                "discrepancies": [
                    {
                        "kind": d.kind.value,
                        "key": d.key,
                        "expected": format_usd(d.expected_micros),
                        "actual": format_usd(d.actual_micros),
                    }
                    for d in r.discrepancies
                ],
            }
            for r in done
        ],
        "failed": [{"workspaceId": str(f.workspace_id), "error": f.error} for f in failed],
    }


def _reconcile_summary(
    month: str, done: list[Reconciliation], failed: list[_Failure], with_stripe: bool
) -> None:
    console = Console()
    if not with_stripe:
        console.print("AGENTWORKS_STRIPE_API_KEY is not set: Stripe was not compared")
    table = Table(title=f"Discrepancies in {month}")
    for column in ("workspace", "kind", "key", "expected (log)", "actual"):
        table.add_column(column, overflow="fold")
    for result in done:
        for d in result.discrepancies:
            table.add_row(
                str(result.workspace_id),
                d.kind.value,
                shown(d.key),
                format_usd(d.expected_micros),
                format_usd(d.actual_micros),
            )
    if table.row_count:
        console.print(table)
    _report_failures(failed)
    found = sum(len(r.discrepancies) for r in done)
    typer.echo(
        f"{len(done)} workspace(s) reconciled, {found} discrepancy(ies), {len(failed)} failed"
    )
