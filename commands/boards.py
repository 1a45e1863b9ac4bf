"""Project and board commands: creating a project, and its lanes and WIP limits."""

from __future__ import annotations

from collections.abc import Callable
from uuid import uuid4

from commands import models as m
from commands.service import Actor, CommandResult, Decision, WriteSide
from domain.meta import EventMeta
from domain.project import LaneSpec, Project
from domain.roles import Role


class ProjectCommands(WriteSide):
    """Commands on a :class:`~domain.project.Project` and its board."""

    def create_project(self, cmd: m.CreateProject, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self.workspace_for(actor, cmd.workspace_id, Role.MEMBER, cmd.action)
            project = Project.create(
                project_id=uuid4(),
                workspace_id=workspace.id,
                name=cmd.name,
                lanes=[LaneSpec(lane.name, lane.wip_limit) for lane in cmd.lanes],
                meta=meta,
            )
            return Decision(project, "project", [project])

        return self.execute(cmd, actor, cmd.workspace_id, decide)

    def set_wip_limit(self, cmd: m.SetWipLimit, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, lambda p, meta: p.set_wip_limit(cmd.lane, cmd.wip_limit, meta=meta)
        )

    def add_lane(self, cmd: m.AddLane, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd,
            actor,
            lambda p, meta: p.add_lane(
                cmd.name, wip_limit=cmd.wip_limit, index=cmd.index, meta=meta
            ),
        )

    def rename_lane(self, cmd: m.RenameLane, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, lambda p, meta: p.rename_lane(cmd.lane, cmd.name, meta=meta)
        )

    def reorder_lanes(self, cmd: m.ReorderLanes, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, lambda p, meta: p.reorder_lanes(cmd.order, meta=meta)
        )

    def remove_lane(self, cmd: m.RemoveLane, actor: Actor) -> CommandResult:
        return self._change_project(cmd, actor, lambda p, meta: p.remove_lane(cmd.lane, meta=meta))

    def archive_project(self, cmd: m.ArchiveProject, actor: Actor) -> CommandResult:
        return self._change_project(cmd, actor, lambda p, meta: p.archive(meta=meta))

    def _change_project(
        self, cmd: m.ProjectCommand, actor: Actor, change: Callable[[Project, EventMeta], object]
    ) -> CommandResult:
        """A board setting, changed by an ADMIN; the project is saved alone."""
        return self._change(
            Project, "project", cmd.project_id, cmd, actor, needed=Role.ADMIN, change=change
        )
