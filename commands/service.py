"""The write side's machinery: who sends a command, what it did, and how every command runs.

Each command loads what it touches, checks the actor may do it, lets the aggregates decide, and
saves every changed aggregate in one transaction together with the command's idempotency record
(the event store may write the saves of concurrent commands in one transaction, group commit,
each still checked on its own and failing alone).
A concurrent write to any of them makes the save collide on a version (the store raises
CONFLICT); the command then reloads and decides again, a bounded number of times.

The commands themselves live beside their aggregate (:mod:`commands.workspaces`,
:mod:`commands.boards`, :mod:`commands.cards`, :mod:`commands.runs`); billing, identity and
access reuse this machinery through its public methods (:meth:`WriteSide.execute`,
:meth:`WriteSide.load`, :meth:`WriteSide.workspace_for` …).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from copy import deepcopy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Protocol, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate

from commands import models as m
from commands.idempotency import fingerprint
from domain.agent_run import AgentRun
from domain.base import decided_at
from domain.budget_holds import SpendReader, SpendReading
from domain.card import Card
from domain.errors import (
    AgentWorksError,
    Conflict,
    DuplicateCommand,
    Forbidden,
    MissingPart,
    NotFound,
    UnappliableEvent,
    Unauthenticated,
    Unavailable,
    UndecodableEvent,
    ValidationFailed,
)
from domain.idempotency import CommandLog, CommandRecord, StoredCommand
from domain.meta import EventMeta
from domain.months import month_of, next_month
from domain.pricing import PriceTable, built_in_price_table
from domain.project import Project
from domain.roles import Role, require_role
from domain.usage import MonthlySpend, UsageCharge, spend_id_for
from domain.user import Session, User
from domain.workspace import Workspace

BOOTSTRAP_SCOPE = "*"
#: ``Actor.workspace_id`` of a user token: no workspace claim, membership decides everywhere.
USER_SCOPE = ""

log = logging.getLogger(__name__)


class CommandObserver(Protocol):
    """Wraps each command (timing, tracing); yields the ``traceparent`` its events carry."""

    def __call__(self, command_type: str, traceparent: str) -> AbstractContextManager[str]: ...


def _unobserved(command_type: str, traceparent: str) -> AbstractContextManager[str]:
    return nullcontext(traceparent)


A = TypeVar("A", bound=Aggregate)


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who sends a command, as their credentials say.

    ``workspace_id`` is the workspace the credentials are for (``"*"`` for a bootstrap token).
    ``role`` is the credentials' role claim: a ceiling on the user's membership role, checked
    against the workspace's members on every command (``None``: no claim, the membership alone
    decides). A service actor (the orchestrator) acts inside its workspace without being a member.
    """

    user_id: str
    workspace_id: str
    role: Role | None = None
    is_service: bool = False
    api_key_id: UUID | None = None
    """The API key the command came with (None: another credential)."""
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str = ""

    @classmethod
    def service(
        cls,
        name: str,
        workspace_id: UUID | str,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        traceparent: str = "",
    ) -> Actor:
        """A service acting inside ``workspace_id`` without being one of its members."""
        return cls(
            user_id=name, workspace_id=str(workspace_id), is_service=True,
            correlation_id=correlation_id, causation_id=causation_id, traceparent=traceparent,
        )  # fmt: skip

    def require(self, membership: Role, needed: Role, *, action: str) -> None:
        """Refuse ``action`` unless ``membership``, capped by these credentials, reaches
        ``needed`` (a refusal names the API key or role claim that capped it)."""
        require_role(
            membership, needed, action=action, user_id=self.user_id, ceiling=self.role,
            api_key_id=self.api_key_id,
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    """What a command did: the object it touched, its new version and where its events landed.

    ``position`` is the highest global position the command wrote (0 when it changed nothing);
    a read that waits until the read models reached it sees the command's effect.
    """

    kind: str
    id: UUID
    version: int
    position: int
    replayed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def consistency_token(self) -> str:
        """``position:aggregate id:version``: enough for a reader to wait for this write.

        On the embedded path projectors apply the log in order, so the position alone tells; through
        Kafka partitions a projector may pass a position before an earlier one arrives, so readers
        check the aggregate's version in the projector's tracking instead.
        """
        return f"{self.position}:{self.id}:{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": str(self.id),
            "version": self.version,
            "position": self.position,
            "extra": self.extra,
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> CommandResult:
        return cls(
            kind=str(data["kind"]),
            id=UUID(str(data["id"])),
            version=int(data["version"]),
            position=int(data["position"]),
            replayed=True,
            extra=dict(data.get("extra") or {}),
        )


@dataclass
class _Reads:
    """What one attempt at a command loaded, and at which versions.

    With ``from_cache`` the attempt takes cached aggregates as they are, without asking the store
    whether they moved on; the save then has the store check, in its transaction, that every
    aggregate the attempt read but did not change is still at the version read (those it changed
    are checked by their own new versions), and a stale read is a conflict like any other.
    """

    from_cache: bool
    versions: dict[UUID, int] = field(default_factory=dict)
    served_from_cache: bool = False
    latest: datetime | None = None
    """The latest time any aggregate loaded was changed at (see :func:`_decided_now`)."""

    def unchanged_since(self, changed: list[Aggregate]) -> dict[UUID, int]:
        written = {aggregate.id for aggregate in changed}
        return {i: v for i, v in self.versions.items() if i not in written}


_READS: ContextVar[_Reads | None] = ContextVar("agentworks_command_reads", default=None)


@dataclass
class Decision:
    """What one attempt at a command decided: the aggregates to save and the one it reports."""

    target: Aggregate
    kind: str
    changed: list[Aggregate]
    extra: dict[str, Any] = field(default_factory=dict)


class WriteSide(Application[UUID]):
    """The machinery every command runs through; :class:`commands.handlers.AgentWorks` adds the
    commands of each aggregate on top of it."""

    name = "AgentWorks"
    # Cards are read at any past version for history and audit; a snapshot every 100 events
    # bounds that to at most 99 events replayed. A user's failed logins and a session's
    # refreshes have no end either (each of them anyone holding a token or knowing an address
    # can add), and both are read on every login or refresh. (Other aggregates hold enums and
    # dataclasses the JSON transcoder does not round-trip, and are read at their latest
    # version.)
    snapshotting_intervals: ClassVar[dict[type[Any], int]] = {Card: 100, User: 100, Session: 100}

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        command_log: CommandLog | None = None,
        retries: int = 5,
        observe: CommandObserver = _unobserved,
        prices: PriceTable | None = None,
        settle_seconds: float = 5.0,
        cached_reads: bool = False,
    ) -> None:
        super().__init__(env)
        self.cached_reads = cached_reads and self.repository.cache is not None
        """A command's first attempt decides on the cached aggregates without a round trip per
        load, and its save has the store check what it read (``unchanged_since``). Only for a
        store that makes that check: :class:`adapters.eventstore.EventStoreRecorder` does."""
        self.prices = prices or built_in_price_table()
        self.command_log = command_log
        self.retries = retries
        self.observe = observe
        self.settle_seconds = settle_seconds
        """How long a write whose commit was interrupted waits for the database to say whether
        it committed, before answering UNAVAILABLE with ``outcome="unknown"``."""
        self.settle_poll_seconds = 0.1
        self.spend: SpendReader = WriteModelSpend(self)
        """Where spend checks read a month's usage. The composition root sets the Redis counter
        or the billing read model; a write side built without a read side (tests, tools) reads
        its own ``MonthlySpend``."""

    # -- the machinery --------------------------------------------------------------------------

    def _change(
        self,
        cls: type[A],
        kind: str,
        aggregate_id: UUID,
        cmd: m.Command,
        actor: Actor,
        *,
        needed: Role,
        change: Callable[[A, EventMeta], object],
        expected_version: int | None = None,
    ) -> CommandResult:
        """The shape most commands have: load one aggregate the actor may change, check its
        version, let it decide, save it alone."""

        def decide(meta: EventMeta) -> Decision:
            target = self.load(cls, aggregate_id, actor, needed, cmd.action)
            expect_version(target, expected_version)
            change(target, meta)
            return Decision(target, kind, [target])

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def execute(
        self,
        cmd: m.Command,
        actor: Actor,
        workspace_hint: UUID | None,
        decide: Callable[[EventMeta], Decision],
    ) -> CommandResult:
        with self.observe(type(cmd).__name__, actor.traceparent) as traceparent:
            return self._execute_observed(cmd, actor, workspace_hint, decide, traceparent)

    def _execute_observed(
        self,
        cmd: m.Command,
        actor: Actor,
        workspace_hint: UUID | None,
        decide: Callable[[EventMeta], Decision],
        traceparent: str,
    ) -> CommandResult:
        # Bootstrap credentials are not a tenant: each bootstrap user gets a scope of their own.
        scope = actor.workspace_id if actor.workspace_id != "*" else f"*:{actor.user_id}"
        if actor.workspace_id == USER_SCOPE:
            scope = f"user:{actor.user_id}"
            workspace_hint = workspace_hint or self._target_workspace(cmd)
        sent_id = cmd.command_id is not None
        if not sent_id:
            # Every write is recorded under an id, so that one whose commit was interrupted can
            # be looked up and answered truthfully (see _settle).
            cmd = cmd.model_copy(update={"command_id": uuid4()})
        command_id = str(cmd.command_id)
        digest = fingerprint(cmd)
        meta = EventMeta.for_command(
            workspace_id=workspace_hint
            or (actor.workspace_id if actor.workspace_id != "*" else ""),
            actor=actor.user_id,
            command_id=cmd.command_id or uuid4(),
            correlation_id=actor.correlation_id,
            causation_id=actor.causation_id,
            traceparent=traceparent,
        )
        # The store raises UNAVAILABLE itself when loading or appending fails before anything
        # was committed.
        if not sent_id or self.command_log is None:
            return self._attempts(cmd, actor, scope, command_id, digest, decide, meta)
        # A client's retry may arrive while its first run is still deciding or committing, here
        # or on another replica: executions of one id take turns (from the look-up until the
        # record is committed), so a retry finds the first's record instead of deciding on a
        # state that run's commit is not part of (and refusing what its twin did).
        with self.command_log.one_at_a_time(scope, command_id) as stored:
            earlier = self._earlier_result(stored, command_id, cmd, digest, decide, meta)
            if earlier is not None:
                return earlier
            try:
                return self._attempts(cmd, actor, scope, command_id, digest, decide, meta)
            except Unavailable:
                raise
            except AgentWorksError as refusal:
                # Turns end with their session: a first run whose lock session broke (the
                # database restarted) may commit while its retry runs, which then loses to it
                # (a version it moved on, a lane it filled). Its command was done; a retry
                # answers the first result.
                try:
                    stored = self._recorded(scope, command_id)
                    earlier = self._earlier_result(stored, command_id, cmd, digest, decide, meta)
                except Unavailable:
                    raise refusal from None
                if earlier is None:
                    raise
                return earlier

    def _attempts(
        self,
        cmd: m.Command,
        actor: Actor,
        scope: str,
        command_id: str,
        digest: str,
        decide: Callable[[EventMeta], Decision],
        meta: EventMeta,
    ) -> CommandResult:
        attempt, from_cache = 0, True
        while True:
            decision, reads = self._decide(decide, meta, from_cache=from_cache)
            from_cache = False
            changed = [agg for agg in decision.changed if agg.pending_events]
            version = decision.target.version
            provisional = CommandResult(
                kind=decision.kind, id=decision.target.id, version=version, position=0,
                extra=decision.extra,
            )  # fmt: skip
            try:
                return self._save_with_record(
                    changed, scope, cmd, digest, actor, provisional, reads
                )
            except Unavailable as unknown:
                if unknown.outcome != "unknown":
                    raise
                settled = self._settle(unknown, scope, command_id)
                if settled is not None:
                    return settled
                # Not committed: nothing was written, so deciding again is safe.
                if attempt == self.retries:
                    raise Unavailable(
                        f"{type(cmd).__name__} was not written: the database connection kept "
                        "breaking; retry shortly",
                        retry_after_seconds=1.0,
                    ) from unknown
                attempt += 1
                continue
            except Conflict as error:
                if isinstance(error, DuplicateCommand):
                    earlier = self._earlier_result(
                        self._recorded(scope, command_id), command_id, cmd, digest, decide, meta
                    )
                    if earlier is not None:
                        return earlier
                elif reads.served_from_cache:
                    # The cache was behind the store, which is no race lost: decide again at
                    # once on the store's state, without spending a retry.
                    continue
                if attempt == self.retries:
                    raise Conflict(
                        f"{type(cmd).__name__} on {decision.kind} {decision.target.id} lost "
                        f"{self.retries + 1} races with concurrent writes; retry later"
                    ) from error
                # Jittered backoff: writers that retry in lockstep collide again.
                time.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311
                attempt += 1

    def _decide(
        self, decide: Callable[[EventMeta], Decision], meta: EventMeta, *, from_cache: bool
    ) -> tuple[Decision, _Reads]:
        """One decision, and what it read. A refusal decided on cached aggregates is decided again
        on the store's: only current state may refuse a command (a stale version, a member added
        elsewhere a moment ago). Each decision's events bear its one instant
        (:func:`domain.base.decided_at`)."""
        reads = _Reads(from_cache=from_cache and self.cached_reads)
        token = _READS.set(reads)
        try:
            try:
                return _decided_now(decide, meta)
            except AgentWorksError:
                tried = _READS.get()
                if tried is None or not tried.served_from_cache:
                    raise
            reads = _Reads(from_cache=False)
            _READS.set(reads)
            return _decided_now(decide, meta)
        finally:
            _READS.reset(token)

    def _settle(self, unknown: Unavailable, scope: str, command_id: str) -> CommandResult | None:
        """The true outcome of a write whose commit was interrupted: its result if it committed,
        None if it did not; if the store cannot tell within ``settle_seconds``, UNAVAILABLE with
        ``outcome="unknown"`` and the commandId that a retry learns the truth with."""
        transaction_id = unknown.details.get("transaction_id")
        deadline = time.monotonic() + self.settle_seconds
        while True:
            try:
                if self.command_log is None or not isinstance(transaction_id, str):
                    break
                committed = self.command_log.committed(transaction_id)
                if committed is False:
                    log.info("command.commit_settled: %s was not committed", command_id)
                    return None
                if committed:
                    stored = self.command_log.find(scope, command_id)
                    if stored is not None:
                        log.info("command.commit_settled: %s was committed", command_id)
                        return replace(CommandResult.from_stored(stored.result), replayed=False)
            except Unavailable:
                pass  # the database is not back yet
            if time.monotonic() >= deadline:
                break
            time.sleep(self.settle_poll_seconds)
        log.warning("command.commit_unknown: %s, the client was told to retry with it", command_id)
        raise Unavailable(
            "the database connection was lost while this write was committing and the outcome "
            f"could not be learnt within {self.settle_seconds:g} s; retry with commandId "
            f"{command_id} to get its result without writing twice",
            retry_after_seconds=1.0,
            outcome="unknown",
            command_id=command_id,
        ) from unknown

    def commit_settled(
        self, unknown: Unavailable, saved: Collection[Aggregate] = ()
    ) -> bool | None:
        """Whether a write of ``saved`` whose commit was interrupted (the store raised
        ``unknown`` with ``outcome="unknown"``) committed: True or False as the database says,
        None when it could not tell within ``settle_seconds``. For writes recorded under no
        commandId (identity), whose caller holds its own result. A committed transaction counts
        only when its id is on the saved aggregates' new events (a transaction id the server
        never received, after a failover, is handed out again to another)."""
        transaction_id = unknown.details.get("transaction_id")
        written_by = getattr(self.recorder, "written_by", None)
        if self.command_log is None or not isinstance(transaction_id, str) or written_by is None:
            return None
        versions = [(aggregate.id, aggregate.version) for aggregate in saved]
        deadline = time.monotonic() + self.settle_seconds
        while True:
            try:
                committed = self.command_log.committed(transaction_id)
                if committed:
                    committed = bool(written_by(transaction_id, versions))
            except Unavailable:
                committed = None  # the database is not back yet
            if committed is not None or time.monotonic() >= deadline:
                return committed
            time.sleep(self.settle_poll_seconds)

    def close(self) -> None:
        self.spend.close()
        super().close()

    def _take_snapshots(self, processing_event: ProcessingEvent[UUID]) -> None:
        """Snapshots are a shortcut for reading, taken after the command committed: failing to
        write one must not turn a committed command into a failure."""
        try:
            self._snapshot_saved(processing_event)
        except Unavailable:
            log.warning("command.snapshot_skipped: the database is unavailable")

    def _snapshot_saved(self, processing_event: ProcessingEvent[UUID]) -> None:
        """The library's snapshots, taken from the aggregate just saved where it is at the
        snapshot's version: its state is the fold of its stored events, which the library would
        read back (up to an interval of them) and replay for every snapshot."""
        if self.snapshots is None or not self.snapshotting_intervals:
            return
        for event in processing_event.events:
            aggregate = processing_event.aggregates.get(event.originator_id)
            interval = self.snapshotting_intervals.get(type(aggregate))
            if aggregate is None or interval is None or event.originator_version % interval:
                continue
            if aggregate.version != event.originator_version:
                # As the library's ``take_snapshot`` does, with the time set below.
                aggregate = self.repository.get(
                    event.originator_id, version=event.originator_version
                )
            snapshot_class = getattr(type(aggregate), "Snapshot", self.snapshot_class)
            if snapshot_class is None:
                self.take_snapshot(event.originator_id, version=event.originator_version)
                continue
            snapshot = snapshot_class.take(aggregate)
            if isinstance(aggregate, Aggregate) and snapshot.timestamp < aggregate.modified_on:
                # Stamped by this host's clock, behind the version it holds (a command is
                # stamped after what it decided on, which a host whose clock is ahead may have
                # stamped): a read as of an instant between the two would fold from it.
                snapshot = replace(snapshot, timestamp=aggregate.modified_on)
            self.snapshots.put([snapshot])

    def _save_with_record(
        self,
        changed: list[Aggregate],
        scope: str,
        cmd: m.Command,
        digest: str,
        actor: Actor,
        provisional: CommandResult,
        reads: _Reads,
    ) -> CommandResult:
        """Save the events and the command's idempotency record, atomically; and, when the
        decision read cached aggregates, the store's check that they were current."""
        record = CommandRecord(
            scope=scope,
            command_id=str(cmd.command_id),
            command_type=type(cmd).__name__,
            fingerprint=digest,
            actor=actor.user_id,
            result=provisional.as_dict(),
        )
        if reads.served_from_cache:
            unchanged = reads.unchanged_since(changed)
            recordings = self.save(*changed, command_record=record, unchanged_since=unchanged)
        else:
            recordings = self.save(*changed, command_record=record)
        if self.cached_reads:
            self._cache_saved(changed)
        position = max((r.notification.id for r in recordings), default=0)
        return replace(provisional, position=position)

    def _cache_saved(self, saved: list[Aggregate]) -> None:
        """Put copies of what a command saved in the cache: the next command on them then needs
        no round trip to the store. (A fast-forwarding cache is otherwise only updated by reads;
        copies, because the caller may go on changing its own instances.)"""
        cache = self.repository.cache
        assert cache is not None  # cached_reads needs one
        for aggregate in saved:
            try:
                current = cache.get(aggregate.id).version
            except KeyError:
                current = 0
            # Another thread may have cached a later version meanwhile; never go back.
            if current < aggregate.version:
                cache.put(aggregate.id, deepcopy(aggregate))

    def _recorded(self, scope: str, command_id: str) -> StoredCommand | None:
        """The command log's record of ``command_id`` in ``scope`` now (None: none, or no log)."""
        return None if self.command_log is None else self.command_log.find(scope, command_id)

    def _earlier_result(
        self,
        stored: StoredCommand | None,
        command_id: str,
        cmd: m.Command,
        digest: str,
        decide: Callable[[EventMeta], Decision],
        meta: EventMeta,
    ) -> CommandResult | None:
        """The first result of a command sent again (``stored``: its record), for a caller who
        may run it now; None when it has no record.

        The replay re-runs the command's checks against the current state and writes nothing
        (so does a command sent under an id used for another, before VALIDATION names that one):
        a refusal of who is asking (FORBIDDEN, NOT_FOUND) is the answer, so a VIEWER replaying an
        owner's commandId learns nothing; a refusal of the state (the card has moved since, a
        version moved on, a lane renamed or a member removed: ``MissingPart``) is expected after
        the first run and the first result stands.
        """
        if stored is None:
            return None
        if stored.command_type != type(cmd).__name__ or stored.fingerprint != digest:
            # What the id was first used for is told only to a caller who may run the command
            # sent; anyone else gets the refusal a new command would get.
            try:
                decide(meta)
            except (Forbidden, NotFound, Unauthenticated, Unavailable):
                raise
            except AgentWorksError:
                pass
            raise ValidationFailed(
                f"commandId {command_id} was already used for a different command "
                f"({stored.command_type}); use a new commandId for a new command"
            )
        try:
            decide(meta)
        except MissingPart:
            pass
        except (Forbidden, NotFound, Unauthenticated, Unavailable):
            raise
        except AgentWorksError:
            pass
        return CommandResult.from_stored(stored.result)

    def _target_workspace(self, cmd: m.Command) -> UUID | None:
        """The workspace a user token's command acts in, from the object it names: user tokens
        carry no workspace, and every event must still be stamped with its tenant."""
        direct = getattr(cmd, "workspace_id", None)
        if isinstance(direct, UUID):
            return direct
        for field_name, cls in _TARGETS:
            target = getattr(cmd, field_name, None)
            if isinstance(target, UUID):
                try:
                    owner: UUID = self.aggregate(cls, target, copy=False).workspace_id  # type: ignore[attr-defined]
                except NotFound:
                    return None
                except UndecodableEvent as unread:
                    # Refused (or not) by the command's own load, which checks the caller.
                    return unread_workspace(unread)
                return owner
        return None

    def _scope_hint(self, actor: Actor) -> UUID | None:
        try:
            return UUID(actor.workspace_id)
        except ValueError:
            return None

    def aggregate(
        self, cls: type[A], aggregate_id: UUID, *, version: int | None = None, copy: bool = True
    ) -> A:
        """Load an aggregate; ``copy=False`` shares the cached instance, for reading only.

        Inside a command's decision the load is noted (see :class:`_Reads`), and on a first
        attempt with ``cached_reads`` a cached aggregate is taken without asking the store.
        """
        reads = _READS.get() if version is None else None
        try:
            aggregate = (
                self._cached(aggregate_id, copy=copy) if reads and reads.from_cache else None
            )
            if aggregate is None:
                aggregate = self.repository.get(
                    aggregate_id, version=version, deepcopy_from_cache=copy
                )
            elif reads is not None:
                reads.served_from_cache = True
        except AggregateNotFoundError:
            raise NotFound(f"{kind_of(cls)} {aggregate_id} does not exist") from None
        except UndecodableEvent as unread:
            failed = "applied" if isinstance(unread, UnappliableEvent) else "decoded"
            raise type(unread)(
                f"{kind_of(cls)} {aggregate_id} cannot be loaded: its stored event at version "
                f"{unread.version} ({unread.details.get('stored_type')}) could not be {failed}; "
                "nothing was written, and commands on it are refused until the event is repaired",
                version=unread.version,
                at=unread.at,
                kind=kind_of(cls),
                aggregate_id=str(aggregate_id),
                workspace_id=unread.details.get("workspace_id"),
            ) from unread
        if not isinstance(aggregate, cls):
            raise NotFound(f"{kind_of(cls)} {aggregate_id} does not exist")
        if reads is not None:
            reads.versions.setdefault(aggregate.id, aggregate.version)
            changed = aggregate.modified_on
            if reads.latest is None or changed > reads.latest:
                reads.latest = changed
        return aggregate

    def _cached(self, aggregate_id: UUID, *, copy: bool) -> Aggregate | None:
        cache = self.repository.cache
        try:
            cached = cache.get(aggregate_id) if cache is not None else None
        except KeyError:
            return None
        if not isinstance(cached, Aggregate):
            return None
        return deepcopy(cached) if copy and self.repository.deepcopy_from_cache else cached

    def load(
        self,
        cls: type[A],
        aggregate_id: UUID,
        actor: Actor,
        needed: Role,
        action: str,
        *,
        version: int | None = None,
    ) -> A:
        """An aggregate the actor may act on; another workspace's ids look like missing ones.

        One whose stored events cannot all be decoded is refused as UNDECODABLE, to those who
        may see it only: its workspace is read from the versions before that event, or, when
        there are none it can read, from the unreadable event's own metadata; when not even
        that can be read, nobody but a service is told more than NOT_FOUND."""
        try:
            aggregate = self.aggregate(cls, aggregate_id, version=version)
        except UndecodableEvent as unread:
            before = self._readable_before(cls, aggregate_id, unread)
            if before is not None:
                self._may_act(before, actor, needed, action)
                raise
            workspace_id = unread_workspace(unread)
            if workspace_id is not None:
                self._may_act_in(workspace_id, cls, aggregate_id, actor, needed, action)
            elif not actor.is_service:
                raise NotFound(f"{kind_of(cls)} {aggregate_id} does not exist") from None
            raise
        self._may_act(aggregate, actor, needed, action)
        return aggregate

    def _readable_before(
        self, cls: type[A], aggregate_id: UUID, unread: UndecodableEvent
    ) -> A | None:
        """The aggregate as of the version before ``unread``'s; None when there is none, or
        that cannot be read either (an unreadable snapshot)."""
        if unread.version is None or unread.version <= 1:
            return None
        try:
            return self.aggregate(cls, aggregate_id, version=unread.version - 1)
        except UndecodableEvent:
            return None

    def _may_act(self, aggregate: Aggregate, actor: Actor, needed: Role, action: str) -> None:
        workspace_id: UUID = aggregate.workspace_id  # type: ignore[attr-defined]
        self._may_act_in(workspace_id, type(aggregate), aggregate.id, actor, needed, action)

    def _may_act_in(
        self,
        workspace_id: UUID,
        cls: type[Aggregate],
        aggregate_id: UUID,
        actor: Actor,
        needed: Role,
        action: str,
    ) -> None:
        """Whether ``actor`` may act on the ``cls`` ``aggregate_id`` of ``workspace_id``.

        Refused to a stranger as for an id that exists nowhere, naming the object the command
        named: a user token (no workspace claim) reaches here with any workspace's objects, and
        naming their workspace, or that it cannot be loaded, would tell a stranger that the
        object exists, and whose it is."""
        missing = NotFound(f"{kind_of(cls)} {aggregate_id} does not exist")
        if actor.workspace_id != USER_SCOPE and str(workspace_id) != actor.workspace_id:
            raise missing
        if actor.is_service:
            return
        try:
            workspace = self.aggregate(Workspace, workspace_id, copy=False)
        except (NotFound, UndecodableEvent):
            if actor.workspace_id == USER_SCOPE:
                raise missing from None
            raise
        if workspace.role_of(actor.user_id) is None:
            raise missing
        self._check_role(workspace, actor, needed, action)

    def workspace_for(
        self, actor: Actor, workspace_id: UUID, needed: Role, action: str
    ) -> Workspace:
        if actor.workspace_id != USER_SCOPE and str(workspace_id) != actor.workspace_id:
            raise NotFound(f"workspace {workspace_id} does not exist")
        workspace = self.aggregate(Workspace, workspace_id)
        if not actor.is_service:
            self._check_role(workspace, actor, needed, action)
        return workspace

    def _check_role(self, workspace: Workspace, actor: Actor, needed: Role, action: str) -> None:
        role = workspace.role_of(actor.user_id)
        if role is None:
            raise NotFound(f"workspace {workspace.id} does not exist")
        actor.require(role, needed, action=action)

    def may_grant(self, workspace: Workspace, actor: Actor, role: Role) -> None:
        if role is Role.OWNER and not actor.is_service:
            mine = workspace.role_of(actor.user_id) or Role.VIEWER
            actor.require(mine, Role.OWNER, action="granting or taking OWNER")

    def spend_for(self, workspace: Workspace, at: datetime, meta: EventMeta) -> MonthlySpend:
        """The spend of ``at``'s month, or of the first open month after it once that is closed
        (late usage of a closed month is billed in the next statement)."""
        month = month_of(at)
        while True:
            try:
                spend = self.aggregate(MonthlySpend, spend_id_for(workspace.id, month))
            except NotFound:
                return MonthlySpend.open(workspace_id=workspace.id, month=month, meta=meta)
            if not spend.closed:
                return spend
            month = next_month(month)


_TARGETS: tuple[tuple[str, type[Aggregate]], ...] = (
    ("card_id", Card),
    ("project_id", Project),
    ("run_id", AgentRun),
    ("charge_id", UsageCharge),
)


class WriteModelSpend:
    """A month's usage as the write side's ``MonthlySpend`` holds it. Every charge updates it in
    its own transaction, so it counts each charge (and every pending hold's) at once."""

    def __init__(self, app: WriteSide) -> None:
        self._app = app

    def read(self, workspace_id: UUID, month: str, pending: Collection[UUID] = ()) -> SpendReading:
        try:
            spend = self._app.aggregate(MonthlySpend, spend_id_for(workspace_id, month), copy=False)
        except NotFound:
            return SpendReading(0, frozenset(pending))
        return SpendReading(spend.spent_micros, frozenset(pending))

    def close(self) -> None:
        """Nothing of its own: it reads through the write side that closes it."""


def expect_version(aggregate: Aggregate, expected: int | None) -> None:
    if expected is not None and aggregate.version != expected:
        raise Conflict(
            f"{kind_of(type(aggregate))} {aggregate.id} is at version {aggregate.version}, "
            f"not the expected {expected}; reload it and retry",
            expected=expected,
            actual=aggregate.version,
        )


def unread_workspace(unread: UndecodableEvent) -> UUID | None:
    """The workspace of an aggregate that could not be loaded, as its unreadable event's
    metadata names it; ``None`` when that cannot be read either."""
    try:
        return UUID(str(unread.details["workspace_id"]))
    except (KeyError, ValueError):
        return None


def kind_of(cls: type[Aggregate]) -> str:
    return {
        "Workspace": "workspace",
        "Project": "project",
        "Card": "card",
        "AgentRun": "agent run",
        "UsageCharge": "usage charge",
        "MonthlySpend": "monthly spend",
    }.get(cls.__name__, cls.__name__.lower())


#: Decisions in a row that may find what they loaded changed after their instant (see
#: :func:`_decided_now`) before the command is refused as having lost to concurrent writes.
_RESTAMPS = 8
#: The resolution of event times.
_TICK = timedelta(microseconds=1)


def _decided_now(
    decide: Callable[[EventMeta], Decision], meta: EventMeta
) -> tuple[Decision, _Reads]:
    """A decision stamped with its instant (:func:`domain.base.decided_at`), and what it read
    (the :class:`_Reads` in ``_READS``).

    The instant is after every change of the aggregates it loaded: an aggregate's event times
    rise with its versions, which histories, boards as of an instant and export windows rest on
    (and each command's state is the one at its own instant). The instant is taken before the
    loads, so a command committed in between (or stamped by a host whose clock is ahead) is in
    what the decision read yet stamped later, or in the same microsecond: the decision is then
    taken again, stamped a microsecond after it, on fresh loads."""
    instant = datetime.now(UTC)
    for _ in range(_RESTAMPS):
        reads = _READS.get()
        assert reads is not None
        with decided_at(instant):
            decision = decide(meta)
        if reads.latest is None or reads.latest < instant:
            return decision, reads
        instant = reads.latest + _TICK
        _READS.set(_Reads(from_cache=reads.from_cache))
    raise Conflict(
        f"what this command read kept changing after it was decided ({_RESTAMPS} times); "
        "retry later"
    )
