"""Which workspace an aggregate belongs to, for a user token (which names no workspace)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from commands.service import unread_workspace
from domain.errors import UndecodableEvent
from domain.workspace import Workspace

if TYPE_CHECKING:
    from commands.handlers import AgentWorks


def member_workspace_of(write: AgentWorks, aggregate_id: UUID, user_id: str) -> UUID | None:
    """The workspace of an aggregate a user token wrote (its consistency token names only the
    aggregate), when ``user_id`` is a member there; else ``None`` (no wait, as for strangers)."""
    try:
        aggregate: object = write.repository.get(aggregate_id, deepcopy_from_cache=False)
        workspace_id = getattr(aggregate, "workspace_id", None)
    except AggregateNotFoundError:
        return None
    except UndecodableEvent as unread:
        # Whose it is, as its unreadable event says: to anyone else it must read as an id
        # that exists nowhere, not as UNDECODABLE (its members' reads of it go on).
        workspace_id = unread_workspace(unread)
    if not isinstance(workspace_id, UUID):
        return None
    try:
        workspace: object = write.repository.get(workspace_id, deepcopy_from_cache=False)
    except (AggregateNotFoundError, UndecodableEvent):
        return None
    if not isinstance(workspace, Workspace) or workspace.role_of(user_id) is None:
        return None
    return workspace_id
