"""Commands: small typed requests, named in the imperative.

Each model validates its own shape (pydantic); rules that need state live in the aggregates.
Every command may carry a ``command_id``: repeating a command with the same id returns the first
result and appends nothing. Every text a command carries, however deeply nested (labels, lanes,
log lines), is text PostgreSQL can store (:mod:`domain.text`): the check sits on the base class,
so a field added later cannot forget it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from domain.text import find_unstorable, replace_unstorable

ToolOutput = Annotated[str, AfterValidator(replace_unstorable)]
"""Text a tool or model produced (log lines, a run's error): kept, with U+FFFD for what text
cannot hold, rather than refused like what a person typed."""


#: The version a command expects its aggregate at (versions start at 1): anything else is no
#: version any aggregate can be at, refused as the bad input it is rather than as a conflict.
ExpectedVersion = Annotated[int | None, Field(ge=1)]


class Input(BaseModel):
    """Base of every command and of the models nested in one: text it holds can be stored."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: object) -> object:
        found = find_unstorable(value)
        if found is not None:
            path, problem = found
            raise ValueError(f"item {path} {problem}" if path else problem)
        return value


class Command(Input):
    command_id: UUID | None = None

    sent_at_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields that say when the command was sent, not what it asks (a credit's ``at``, stamped
    by the CLI as it runs): a re-run with the same ``command_id`` is the same command whatever
    they hold (see :func:`commands.idempotency.fingerprint`)."""

    @property
    def action(self) -> str:
        """The command as the API names it (``MoveCard``: ``moveCard``), for what a refusal says
        was refused."""
        name = type(self).__name__
        return name[0].lower() + name[1:]


class ProjectCommand(Command):
    """A command on one project and its board."""

    project_id: UUID


class CardCommand(Command):
    """A command on one card."""

    card_id: UUID


class RunCommand(Command):
    """A command on one agent run."""

    run_id: UUID


# -- workspaces ----------------------------------------------------------------------------------


class CreateWorkspace(Command):
    name: str = Field(max_length=200)


class RenameWorkspace(Command):
    workspace_id: UUID
    name: str = Field(max_length=200)


class AddMember(Command):
    workspace_id: UUID
    user_id: str = Field(min_length=1, max_length=200)
    role: str


class ChangeRole(Command):
    workspace_id: UUID
    user_id: str = Field(min_length=1, max_length=200)
    role: str


class RemoveMember(Command):
    workspace_id: UUID
    user_id: str = Field(min_length=1, max_length=200)


class SetSpendLimit(Command):
    workspace_id: UUID
    monthly_limit: str | None = Field(default=None, description="USD, e.g. '250.00'; None = none")


class SetPlan(Command):
    workspace_id: UUID
    markup: str
    billing_increment: str


# -- projects and boards -------------------------------------------------------------------------


class LaneInput(Input):
    name: str = Field(max_length=200)
    wip_limit: int | None = None


class CreateProject(Command):
    workspace_id: UUID
    name: str = Field(max_length=200)
    lanes: list[LaneInput] = Field(
        default_factory=lambda: [
            LaneInput(name="Backlog"),
            LaneInput(name="In progress"),
            LaneInput(name="Review"),
            LaneInput(name="Done"),
        ],
        max_length=50,
    )


class SetWipLimit(ProjectCommand):
    lane: str
    wip_limit: int | None = None


class AddLane(ProjectCommand):
    name: str = Field(max_length=200)
    wip_limit: int | None = None
    index: int | None = None


class RenameLane(ProjectCommand):
    lane: str
    name: str = Field(max_length=200)


class ReorderLanes(ProjectCommand):
    order: list[str] = Field(max_length=50)


class RemoveLane(ProjectCommand):
    lane: str


class ArchiveProject(ProjectCommand):
    """Archive the project; archiving it again changes nothing."""


# -- cards ---------------------------------------------------------------------------------------


class CreateCard(ProjectCommand):
    title: str = Field(max_length=200)
    description: str = Field(default="", max_length=100_000)
    lane: str | None = Field(default=None, description="defaults to the first lane")


class UpdateCard(CardCommand):
    title: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=100_000)
    labels: list[str] | None = Field(default=None, max_length=50)
    expected_version: ExpectedVersion = None


class MoveCard(CardCommand):
    """Move a card into ``to_lane``, after ``after_card_id`` and before ``before_card_id``."""

    to_lane: str
    before_card_id: UUID | None = None
    after_card_id: UUID | None = None
    expected_version: ExpectedVersion = None


class AssignCard(CardCommand):
    assignee: str | None = None
    expected_version: ExpectedVersion = None


class LabelCard(CardCommand):
    label: str


class UnlabelCard(CardCommand):
    label: str


class BlockCard(CardCommand):
    reason: str = Field(max_length=1000)


class UnblockCard(CardCommand):
    """Lift the card's block."""


class ArchiveCard(CardCommand):
    expected_version: ExpectedVersion = None


class RestoreCard(CardCommand):
    lane: str | None = None


# -- agent runs ----------------------------------------------------------------------------------


class StartAgentRun(CardCommand):
    agent: str = Field(max_length=100)
    provider: str | None = None
    model: str | None = None
    max_cost: str | None = Field(default=None, description="USD budget for this run")
    policy: str | None = Field(default=None, max_length=20)


class CancelAgentRun(RunCommand):
    reason: str = Field(default="cancelled by user", max_length=2000)


class BeginRun(RunCommand):
    """The orchestrator picked the run up."""

    worker: str = Field(max_length=200)


class StartRunStep(RunCommand):
    step: int = Field(ge=1)
    name: str = Field(max_length=200)


class LogLineInput(Input):
    at: datetime
    stream: str = "stdout"
    text: ToolOutput


class AppendRunLog(RunCommand):
    lines: list[LogLineInput] = Field(min_length=1, max_length=10_000)
    worker: str | None = Field(default=None, max_length=200)


class RunLogChunk(Input):
    run_id: UUID
    lines: list[LogLineInput] = Field(min_length=1, max_length=10_000)


class AppendRunLogs(Command):
    """Log chunks of several runs of one workspace, saved in one transaction: how an
    orchestrator writes the output of all its runs without one command per chunk."""

    chunks: list[RunLogChunk] = Field(min_length=1, max_length=1_000)
    worker: str | None = Field(default=None, max_length=200)

    @field_validator("chunks")
    @classmethod
    def _one_chunk_a_run(cls, chunks: list[RunLogChunk]) -> list[RunLogChunk]:
        seen: set[UUID] = set()
        for chunk in chunks:
            if chunk.run_id in seen:
                raise ValueError(f"run {chunk.run_id} has more than one chunk; send one a run")
            seen.add(chunk.run_id)
        return chunks


class RecordLlmCall(RunCommand):
    """A provider call finished; its provider-reported usage and cost are authoritative."""

    call_id: str = Field(min_length=1, max_length=200)
    provider: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=100)
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    latency_ms: int = Field(ge=0)
    provider_cost_micros: int = Field(ge=0)
    price_table_version: str = Field(min_length=1, max_length=100)
    at: datetime


class FinishRun(RunCommand):
    outcome: Literal["SUCCEEDED", "FAILED", "TIMED_OUT"]
    error: ToolOutput | None = None
    after_seconds: int | None = None
    worker: str | None = Field(default=None, max_length=200)
    output: ToolOutput | None = None


class CreditCharge(Command):
    """A compensating correction of a usage charge (``refund`` once invoiced)."""

    charge_id: UUID
    amount: str
    reason: str = Field(min_length=1, max_length=1000)
    refund: bool = False
    at: datetime


# -- the orchestrator's commands -------------------------------------------------------------------


class RecordRunHeartbeat(RunCommand):
    worker: str = Field(min_length=1, max_length=200)


class ReclaimRun(RunCommand):
    """Take over a RUNNING run whose worker looks dead, as of the version the caller judged."""

    worker: str = Field(min_length=1, max_length=200)
    expected_version: int = Field(ge=1)


class ChargeOrphanedCalls(RunCommand):
    """Charge the calls an ended run's worker started and never recorded, its worker judged
    dead as of ``expected_version`` (as a takeover judges it: nothing written for a while)."""

    expected_version: int = Field(ge=1)


class StartProviderCall(RunCommand):
    """The worker is about to make a provider call: said before the call, so that a worker that
    dies during it leaves the call for whoever takes the run over to charge (its prompt).
    ``input_tokens``: the worker's estimate of the prompt; ``prompt_cost_micros``: what that
    costs at the price table ``price_table_version``."""

    worker: str = Field(min_length=1, max_length=200)
    call_id: str = Field(min_length=1, max_length=100)
    provider: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=100)
    input_tokens: int = Field(ge=0)
    prompt_cost_micros: int = Field(ge=0)
    price_table_version: str = Field(min_length=1, max_length=100)


class RecordProviderAttempt(RunCommand):
    """One provider attempt; with tokens it is also a charged LLM call (key: run + call id).

    ``worker`` may be one the run was taken over from: its call happened and is charged.
    ``call_id``: the call's own id, chosen before it was made, so that it is charged once
    whoever records it and however often; without one, the attempt's number
    (``attempt-<n>``)."""

    worker: str = Field(min_length=1, max_length=200)
    call_id: str | None = Field(default=None, min_length=1, max_length=100)
    provider: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=100)
    status: Literal["ok", "failed"]
    http_status: int | None = None
    error: ToolOutput | None = Field(default=None, max_length=2000)
    latency_ms: int = Field(ge=0)
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    estimated: bool = False
    started_at: datetime
