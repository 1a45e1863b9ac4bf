"""The one exception family of AgentWorks.

Every rule that refuses a command raises a subclass of :class:`AgentWorksError`. Each subclass has a
stable ``code`` (the ``extensions.code`` of API.md), so every edge — GraphQL, CLI, workers — maps
errors the same way without knowing the rule that raised them::

    AgentWorksError
     ├── NotFound            NOT_FOUND           unknown id, or an id of another workspace
     ├── Forbidden           FORBIDDEN           the actor's role does not allow the command
     ├── Unauthenticated     UNAUTHENTICATED     no or invalid credentials
     ├── ValidationFailed    VALIDATION          malformed or out-of-range input
     ├── Conflict            CONFLICT            stale expectedVersion or a concurrent write
     ├── WipLimitExceeded    WIP_LIMIT           the target lane is full
     ├── InvalidTransition   INVALID_TRANSITION  the aggregate's state does not allow it
     ├── BudgetExceeded      BUDGET_EXCEEDED     spend limit or run budget reached
     ├── RateLimited         RATE_LIMITED        too many requests
     └── Duplicate           DUPLICATE           a name or member that already exists
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


class Forbidden(AgentWorksError):
    code = "FORBIDDEN"


class Unauthenticated(AgentWorksError):
    code = "UNAUTHENTICATED"


class ValidationFailed(AgentWorksError):
    code = "VALIDATION"


class Conflict(AgentWorksError):
    code = "CONFLICT"


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
    )
)
