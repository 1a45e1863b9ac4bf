"""The one exception family of AgentWorks.

Every rule that refuses a command raises a subclass of :class:`AgentWorksError`. Each subclass has a
stable ``code`` (the ``extensions.code`` of API.md), so every edge — GraphQL, CLI, workers — maps
errors the same way without knowing the rule that raised them. Library errors never cross a
package edge: ``adapters/`` translates them into these (``raise … from``). The whole tree, with
the module of each class that does not live here::

    AgentWorksError                  INTERNAL
     ├── NotFound                    NOT_FOUND           unknown id, or an id of another workspace
     │    ├── MissingPart            NOT_FOUND           a lane, member or place on the board that
     │    │                                              the aggregate's current state lacks
     │    └── NotYet                 NOT_FOUND           streams.history: not in the log yet
     ├── Forbidden                   FORBIDDEN           the actor's role does not allow it
     ├── Unauthenticated             UNAUTHENTICATED     no or invalid credentials
     │    ├── MfaRequired            MFA_REQUIRED        password right, second factor missing
     │    └── BadSignature           UNAUTHENTICATED     adapters.tokens: a token's signature
     ├── ValidationFailed            VALIDATION          malformed or out-of-range input
     │    ├── WebhookRefused         VALIDATION          adapters.stripe: unsigned or stale webhook
     │    ├── BadRequest             VALIDATION          read_api.app: not one operation (400,
     │    │                                              413 too large, 415 not JSON)
     │    └── BadKey                 VALIDATION          adapters.audit_signing: unusable key
     ├── Conflict                    CONFLICT            stale expectedVersion or a concurrent write
     │    ├── StaleVersion           CONFLICT            adapters.eventstore: version taken
     │    └── DuplicateCommand       CONFLICT            the command id was recorded meanwhile
     │         └── CommandAlreadyRecorded                adapters.eventstore: its primary key
     ├── WipLimitExceeded            WIP_LIMIT           the target lane is full
     ├── InvalidTransition           INVALID_TRANSITION  the aggregate's state does not allow it
     ├── BudgetExceeded              BUDGET_EXCEEDED     spend limit or run budget reached
     ├── RateLimited                 RATE_LIMITED        too many requests
     ├── Duplicate                   DUPLICATE           a name or member that already exists
     ├── UndecodableEvent            UNDECODABLE         a stored event today's code cannot read
     │    │                                              (reported beside what could be read)
     │    └── UnappliableEvent       UNDECODABLE         one that decodes and that its
     │                                                   aggregate's ``apply`` refuses
     ├── Unavailable                 UNAVAILABLE         a dependency is down or saturated; retry
     │    │                                              later (``outcome``: was it written?)
     │    ├── StoreUnavailable       UNAVAILABLE         adapters.eventstore: no database
     │    ├── StripeUnavailable      UNAVAILABLE         adapters.stripe
     │    └── TransientProviderError UNAVAILABLE         adapters.providers.base: 429, 5xx, timeout
     │         └── StreamBroken      UNAVAILABLE         the stream stopped before its usage
     ├── PermanentProviderError      PROVIDER_REFUSED    adapters.providers.base: 4xx of a provider
     ├── IntOverflow                 INT_OVERFLOW        read_api.scalars: a value a GraphQL Int
     │                                                   field cannot carry (past 32 bits); its
     │                                                   BigInt companion can
     ├── UsageError                  USAGE               infra.cli_common (CliError): a CLI call
     └── SetupError                  SETUP               the process cannot run as deployed; an
          │                                              operator fixes it, no client can
          ├── ConfigurationError     CONFIGURATION       infra.settings: an AGENTWORKS_* variable
          │    └── InvalidKey        INVALID_KEY         adapters.tokens: a signing key
          ├── MigrationError         MIGRATION           infra.migrate: a migration file
          ├── KafkaSetupError        KAFKA_SETUP         adapters.kafka: topics not created
          ├── BrokerError            BROKER              adapters.kafka_broker: local broker
          └── FaustInternalsChanged  FAUST_INTERNALS     streams.faust_app: faust no longer keeps
                                                         what the worker relies on

The classes outside ``domain/`` that are also a library's error (``StaleVersion`` is the
eventsourcing ``IntegrityError`` too, ``InvalidKey`` a ``ValueError``, ``FaustInternalsChanged`` a
``RuntimeError``) keep that library's or Python's contract for code that is not ours.
"""

from __future__ import annotations

from typing import ClassVar


class AgentWorksError(Exception):
    """Base of every refusal; ``message`` always names what was wrong and with which id."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class NotFound(AgentWorksError):
    code = "NOT_FOUND"


class MissingPart(NotFound):
    """Something a command names inside an aggregate the caller may act on (a lane, a member, a
    card's place on the board) is not in that aggregate's current state: the state's refusal, not
    one of who is asking, so a replayed commandId still gets its first result."""


class Forbidden(AgentWorksError):
    code = "FORBIDDEN"


class Unauthenticated(AgentWorksError):
    code = "UNAUTHENTICATED"


class MfaRequired(Unauthenticated):
    """The password was right but the account needs a (valid, unused) TOTP or recovery code."""

    code = "MFA_REQUIRED"


class ValidationFailed(AgentWorksError):
    code = "VALIDATION"


class Conflict(AgentWorksError):
    code = "CONFLICT"


class DuplicateCommand(Conflict):
    """The command's id is in the command log already: a copy of the same command committed
    while this one was deciding. The first one's result is the answer, never this error."""


class WipLimitExceeded(AgentWorksError):
    code = "WIP_LIMIT"


class InvalidTransition(AgentWorksError):
    code = "INVALID_TRANSITION"


class BudgetExceeded(AgentWorksError):
    code = "BUDGET_EXCEEDED"


class RateLimited(AgentWorksError):
    code = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_after_seconds: float, **details: object) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds, **details)
        self.retry_after_seconds = retry_after_seconds


class Duplicate(AgentWorksError):
    code = "DUPLICATE"


class UndecodableEvent(AgentWorksError):
    """A stored event that cannot be decoded (its class renamed or removed, its state not what
    the mapper reads), or that this reader may not see: the log holds it, nobody can read it.

    Readers that go on past it say so with this error beside what they could read (a card's
    history, the projectors' parked list); ``version`` and ``at`` (None: unknown) name the event.
    """

    code = "UNDECODABLE"

    def __init__(
        self,
        message: str,
        *,
        version: int | None = None,
        at: str | None = None,
        **details: object,
    ) -> None:
        super().__init__(message, version=version, at=at, **details)
        self.version = version
        self.at = at


class UnappliableEvent(UndecodableEvent):
    """A stored event that decodes and that its aggregate's ``apply`` refuses (a role or a lane
    today's code no longer knows, an attribute an older writer left out): the write side cannot
    fold the aggregate past it, as past an event it cannot decode.

    The same code as :class:`UndecodableEvent`, not a sibling: for a client and for every edge
    both mean the one thing (the aggregate cannot be loaded until an operator repairs a stored
    event, the versions before it can), and every reader that goes on past an undecodable event
    goes on past this one alike. The class and the message ("could not be applied") tell an
    operator which repair it needs.
    """


class Unavailable(AgentWorksError):
    """The database (or another dependency) cannot serve now; nothing about the input is wrong.

    ``outcome`` is ``"unknown"`` when a write may or may not have been committed (the connection
    broke around the commit and the server could not find out in time); the client retries with
    ``command_id`` to learn the truth without writing twice. ``None`` means nothing was written.
    """

    code = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float = 1.0,
        outcome: str | None = None,
        command_id: str | None = None,
        **details: object,
    ) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds, **details)
        self.retry_after_seconds = retry_after_seconds
        self.outcome = outcome
        self.command_id = command_id


class UsageError(AgentWorksError):
    """A command line the user can correct (a missing option, an unknown id)."""

    code = "USAGE"


class SetupError(AgentWorksError):
    """The process cannot start or run as deployed (configuration, keys, schema, broker)."""

    code = "SETUP"


class ConfigurationError(SetupError):
    """The environment describes a configuration this process cannot run with.

    The message is one line that names the ``AGENTWORKS_*`` variable at fault, fit for a CLI.
    """

    code = "CONFIGURATION"


ERROR_CODES: tuple[str, ...] = tuple(
    cls.code
    for cls in (
        NotFound,
        Forbidden,
        Unauthenticated,
        ValidationFailed,
        Conflict,
        WipLimitExceeded,
        InvalidTransition,
        BudgetExceeded,
        RateLimited,
        Duplicate,
        Unavailable,
        MfaRequired,
    )
)
