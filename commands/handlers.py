"""The write-side application service: one method per command, one ``save()`` per command.

:class:`AgentWorks` is the one facade the rest of the code calls. Its commands are written beside
their aggregate (:mod:`commands.workspaces`, :mod:`commands.boards`, :mod:`commands.cards`,
:mod:`commands.runs`) on the machinery of :mod:`commands.service`, which this module also
re-exports, so callers import every write-side name from here.
"""

from __future__ import annotations

from commands.boards import ProjectCommands
from commands.cards import CardCommands
from commands.runs import RunBudget, RunCommands
from commands.service import (
    BOOTSTRAP_SCOPE,
    USER_SCOPE,
    Actor,
    CommandObserver,
    CommandResult,
    Decision,
)
from commands.workspaces import WorkspaceCommands

__all__ = [
    "BOOTSTRAP_SCOPE",
    "USER_SCOPE",
    "Actor",
    "AgentWorks",
    "CommandObserver",
    "CommandResult",
    "Decision",
    "RunBudget",
]


class AgentWorks(WorkspaceCommands, ProjectCommands, CardCommands, RunCommands):
    """The AgentWorks write side (one bounded context, one event store)."""

    name = "AgentWorks"
