"""What every event carries besides its payload: who, which command, and which trace.

Metadata travels inside each stored event so that audit, billing reconciliation and tracing never
depend on anything but the event log itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from uuid import UUID, uuid4

SCHEMA_VERSION = "1"


@dataclass(frozen=True, kw_only=True)
class EventMeta:
    """Who caused a change and in answer to which command.

    ``command_id`` is the idempotency key; ``correlation_id`` groups everything one user action set
    off; ``causation_id`` names the command or event that directly caused this one.
    """

    workspace_id: str
    actor: str
    command_id: str
    correlation_id: str
    causation_id: str
    traceparent: str = ""
    schema_version: str = SCHEMA_VERSION

    @classmethod
    def for_command(
        cls,
        *,
        workspace_id: UUID | str,
        actor: str,
        command_id: UUID | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        traceparent: str = "",
    ) -> EventMeta:
        cid = str(command_id or uuid4())
        return cls(
            workspace_id=str(workspace_id),
            actor=actor,
            command_id=cid,
            correlation_id=correlation_id or cid,
            causation_id=causation_id or cid,
            traceparent=traceparent,
        )

    def in_workspace(self, workspace_id: UUID | str) -> EventMeta:
        return replace(self, workspace_id=str(workspace_id))

    def as_dict(self) -> dict[str, str]:
        return asdict(self)
