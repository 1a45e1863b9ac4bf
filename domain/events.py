"""The event contract: one typed payload per domain event, as it travels out of the store.

Every event an aggregate records (``Card.Moved``) leaves the store as an
:class:`~domain.envelope.EventEnvelope` whose ``payload`` is plain JSON: ids and money as text,
never floats. The classes here are that payload's one typed definition, named for the event
(``Card.Moved`` → :class:`CardMoved`), so a projector dispatches on the class and reads typed
fields: a renamed event or field fails at import or type-check time instead of silently in a
read model. ``tests/unit/test_event_contract.py`` holds every class to its aggregate's event
(same name, same fields) and every projector to the whole set.

A payload object is a read-only *view* of the envelope's JSON: its attributes are the payload
dict itself, shared, not copied. Decoding is on the path of every event of every rebuild, and a
view costs one small object, where building a dataclass would convert every field again. A key
that the stored JSON lacks fails when it is read, the way a missing key always has, so a
malformed stored event parks its aggregate instead of stopping the projector.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn, Self, TypeAlias

IdText: TypeAlias = str
"""A UUID in its canonical text form, as the JSON payload carries ids."""

PAYLOAD_TYPES: dict[str, type[EventPayload]] = {}
"""Event type (``"Card.Moved"``) → its payload class: the only place the wire name is read."""

_new = object.__new__
_set = object.__setattr__


class EventPayload:
    """A domain event's payload, typed; subclasses name their event: ``event="Card.Moved"``."""

    event_type: ClassVar[str]
    aggregate: ClassVar[str]

    def __init_subclass__(cls, *, event: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if event is None:
            return
        if event in PAYLOAD_TYPES:
            raise TypeError(f"two payload classes for {event}")
        cls.event_type = event
        cls.aggregate = event.split(".", 1)[0]
        PAYLOAD_TYPES[event] = cls

    @classmethod
    def view(cls, payload: dict[str, Any]) -> Self:
        """``payload`` (an envelope's JSON payload) seen as this event's fields."""
        typed = _new(cls)
        _set(typed, "__dict__", payload)
        return typed

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{self.event_type} payloads are read-only")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{self.event_type} payloads are read-only")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__!r})"


def payload_of(event_type: str, payload: dict[str, Any]) -> EventPayload:
    """The typed view of an envelope's payload: an :class:`UnlistedEvent` for a type outside
    the contract, which no projector handles, as an event without a handler always was."""
    return PAYLOAD_TYPES.get(event_type, UnlistedEvent).view(payload)


class UnlistedEvent(EventPayload):
    """The payload of an event type the contract does not list (written by a newer writer, or
    by a test planting one): no field is known."""

    event_type = ""
    aggregate = ""


class WorkspaceCreated(EventPayload, event="Workspace.Created"):
    workspace_id: IdText
    name: str
    owner_id: str


class WorkspaceRenamed(EventPayload, event="Workspace.Renamed"):
    name: str


class WorkspaceMemberAdded(EventPayload, event="Workspace.MemberAdded"):
    user_id: str
    role: str


class WorkspaceRoleChanged(EventPayload, event="Workspace.RoleChanged"):
    user_id: str
    role: str


class WorkspaceMemberRemoved(EventPayload, event="Workspace.MemberRemoved"):
    user_id: str


class WorkspacePlanSet(EventPayload, event="Workspace.PlanSet"):
    markup: str
    billing_increment_micros: int


class WorkspaceSpendLimitSet(EventPayload, event="Workspace.SpendLimitSet"):
    monthly_limit_micros: int | None


class WorkspaceStripeCustomerLinked(EventPayload, event="Workspace.StripeCustomerLinked"):
    customer_id: str


class ProjectCreated(EventPayload, event="Project.Created"):
    workspace_id: IdText
    name: str
    lanes: list[dict[str, Any]]


class ProjectRenamed(EventPayload, event="Project.Renamed"):
    name: str


class ProjectArchived(EventPayload, event="Project.Archived"):
    pass


class ProjectLaneAdded(EventPayload, event="Project.LaneAdded"):
    name: str
    wip_limit: int | None
    index: int


class ProjectLaneRenamed(EventPayload, event="Project.LaneRenamed"):
    lane: str
    name: str


class ProjectLanesReordered(EventPayload, event="Project.LanesReordered"):
    order: list[str]


class ProjectLaneRemoved(EventPayload, event="Project.LaneRemoved"):
    lane: str


class ProjectWipLimitSet(EventPayload, event="Project.WipLimitSet"):
    lane: str
    wip_limit: int | None


class ProjectCardPlaced(EventPayload, event="Project.CardPlaced"):
    card_id: IdText
    lane: str
    position: str


class ProjectCardMoved(EventPayload, event="Project.CardMoved"):
    card_id: IdText
    from_lane: str
    to_lane: str
    position: str


class ProjectCardLifted(EventPayload, event="Project.CardLifted"):
    card_id: IdText
    lane: str


class CardCreated(EventPayload, event="Card.Created"):
    workspace_id: IdText
    project_id: IdText
    title: str
    description: str
    lane: str
    position: str


class CardEdited(EventPayload, event="Card.Edited"):
    title: str
    description: str


class CardMoved(EventPayload, event="Card.Moved"):
    from_lane: str
    to_lane: str
    position: str


class CardRespread(EventPayload, event="Card.Respread"):
    lane: str
    position: str


class CardAssigned(EventPayload, event="Card.Assigned"):
    assignee: str | None


class CardLabelled(EventPayload, event="Card.Labelled"):
    label: str


class CardUnlabelled(EventPayload, event="Card.Unlabelled"):
    label: str


class CardBlocked(EventPayload, event="Card.Blocked"):
    reason: str


class CardUnblocked(EventPayload, event="Card.Unblocked"):
    pass


class CardArchived(EventPayload, event="Card.Archived"):
    pass


class CardRestored(EventPayload, event="Card.Restored"):
    lane: str
    position: str


class AgentRunRequested(EventPayload, event="AgentRun.Requested"):
    workspace_id: IdText
    project_id: IdText
    card_id: IdText
    agent: str
    provider: str | None
    model: str | None
    max_cost_micros: int | None
    policy: str


class AgentRunStarted(EventPayload, event="AgentRun.Started"):
    worker: str


class AgentRunHeartbeat(EventPayload, event="AgentRun.Heartbeat"):
    worker: str


class AgentRunReclaimed(EventPayload, event="AgentRun.Reclaimed"):
    worker: str
    previous_worker: str


class AgentRunCallStarted(EventPayload, event="AgentRun.CallStarted"):
    call_id: str
    worker: str
    provider: str
    model: str
    input_tokens: int
    prompt_cost_micros: int
    price_table_version: str


class AgentRunAttemptRecorded(EventPayload, event="AgentRun.AttemptRecorded"):
    attempt: int
    provider: str
    model: str
    status: str
    http_status: int | None
    error: str | None
    latency_ms: int
    input_tokens: int
    output_tokens: int
    provider_cost_micros: int
    estimated: bool
    call_id: str | None
    """Absent from attempts recorded before calls had their own id: read it with care."""


class AgentRunOutputRecorded(EventPayload, event="AgentRun.OutputRecorded"):
    output: str


class AgentRunStepStarted(EventPayload, event="AgentRun.StepStarted"):
    step: int
    name: str


class AgentRunLogChunkAppended(EventPayload, event="AgentRun.LogChunkAppended"):
    first_seq: int
    lines: list[dict[str, Any]]


class AgentRunLlmCallCompleted(EventPayload, event="AgentRun.LlmCallCompleted"):
    project_id: IdText
    card_id: IdText
    call_id: str
    charge_id: IdText
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: int
    provider_cost_micros: int
    billed_micros: int


class AgentRunSucceeded(EventPayload, event="AgentRun.Succeeded"):
    pass


class AgentRunFailed(EventPayload, event="AgentRun.Failed"):
    error: str


class AgentRunCancelled(EventPayload, event="AgentRun.Cancelled"):
    reason: str


class AgentRunTimedOut(EventPayload, event="AgentRun.TimedOut"):
    after_seconds: int


class UsageChargeCharged(EventPayload, event="UsageCharge.Charged"):
    workspace_id: IdText
    project_id: IdText
    card_id: IdText
    run_id: IdText
    call_id: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    provider_cost_micros: int
    markup: str
    billed_micros: int
    price_table_version: str
    month: str


class UsageChargeCredited(EventPayload, event="UsageCharge.Credited"):
    amount_micros: int
    reason: str
    month: str


class UsageChargeRefunded(EventPayload, event="UsageCharge.Refunded"):
    amount_micros: int
    reason: str
    month: str


class MonthlySpendOpened(EventPayload, event="MonthlySpend.Opened"):
    workspace_id: IdText
    month: str


class MonthlySpendThresholdCrossed(EventPayload, event="MonthlySpend.ThresholdCrossed"):
    threshold: int
    limit_micros: int
    spent_micros: int
    month: str


class MonthlySpendAdded(EventPayload, event="MonthlySpend.Added"):
    charge_id: IdText
    billed_micros: int


class MonthlySpendClosed(EventPayload, event="MonthlySpend.Closed"):
    pass


class MonthlySpendCorrectionFiled(EventPayload, event="MonthlySpend.CorrectionFiled"):
    charge_id: IdText
    amount_micros: int


class MonthlySpendCreditGranted(EventPayload, event="MonthlySpend.CreditGranted"):
    credit_id: IdText
    amount_micros: int
    reason: str
    month: str


class InvoiceDrafted(EventPayload, event="Invoice.Drafted"):
    workspace_id: IdText
    month: str
    lines: list[dict[str, Any]]
    total_micros: int
    billing_increment_micros: int | None
    """Absent from invoices drafted before it was recorded: read it with care."""


class InvoiceItemSent(EventPayload, event="Invoice.ItemSent"):
    line_key: str
    stripe_item_id: str


class InvoiceIssued(EventPayload, event="Invoice.Issued"):
    stripe_invoice_id: str
    total_cents: int


class InvoicePaid(EventPayload, event="Invoice.Paid"):
    stripe_event_id: str


class InvoiceVoided(EventPayload, event="Invoice.Voided"):
    stripe_event_id: str


class InvitationCreated(EventPayload, event="Invitation.Created"):
    workspace_id: IdText
    email: str
    role: str
    token_hash: str
    expires_at: str
    invited_by: str


class InvitationAccepted(EventPayload, event="Invitation.Accepted"):
    user_id: str


class InvitationRevoked(EventPayload, event="Invitation.Revoked"):
    pass


class ApiKeyCreated(EventPayload, event="ApiKey.Created"):
    workspace_id: IdText
    name: str
    role: str
    created_by: str
    secret_hash: str


class ApiKeyRevoked(EventPayload, event="ApiKey.Revoked"):
    pass


class EmailClaimClaimed(EventPayload, event="EmailClaim.Claimed"):
    email: str
    user_id: IdText


class UserRegistered(EventPayload, event="User.Registered"):
    email: str
    name: str
    password_hash: str | None


class UserPasswordChanged(EventPayload, event="User.PasswordChanged"):
    password_hash: str


class UserMfaEnrolmentStarted(EventPayload, event="User.MfaEnrolmentStarted"):
    totp_secret_sealed: str


class UserMfaEnabled(EventPayload, event="User.MfaEnabled"):
    totp_secret_sealed: str
    recovery_code_hashes: list[str]
    totp_step: int


class UserMfaDisabled(EventPayload, event="User.MfaDisabled"):
    pass


class UserTotpCodeUsed(EventPayload, event="User.TotpCodeUsed"):
    totp_step: int


class UserRecoveryCodeUsed(EventPayload, event="User.RecoveryCodeUsed"):
    code_hash: str


class UserOidcSubjectLinked(EventPayload, event="User.OidcSubjectLinked"):
    issuer: str
    subject: str


class UserAddressProven(EventPayload, event="User.AddressProven"):
    issuer: str
    subject: str


class UserLoginSucceeded(EventPayload, event="User.LoginSucceeded"):
    session_id: IdText
    method: str


class UserLoginFailed(EventPayload, event="User.LoginFailed"):
    reason: str


class SessionStarted(EventPayload, event="Session.Started"):
    user_id: IdText
    token_hash: str
    expires_at: str


class SessionRotated(EventPayload, event="Session.Rotated"):
    token_hash: str


class SessionRevoked(EventPayload, event="Session.Revoked"):
    reason: str


class OidcLinkLinked(EventPayload, event="OidcLink.Linked"):
    issuer: str
    subject: str
    user_id: IdText


def events_of(*aggregates: str) -> frozenset[type[EventPayload]]:
    """Every event of the named aggregates: for a projector to ignore an aggregate's events
    explicitly, new ones included."""
    unknown = set(aggregates) - {kind.aggregate for kind in PAYLOAD_TYPES.values()}
    if unknown:
        raise ValueError(f"no events of {sorted(unknown)} in the contract")
    return frozenset(kind for kind in PAYLOAD_TYPES.values() if kind.aggregate in aggregates)
