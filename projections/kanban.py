"""The Kanban read model: workspaces and members, projects, lanes with live counts, cards in
board order with their last run and cost so far."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from projections.base import Change, Projector, Tables, on

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

    from streams.envelope import EventEnvelope


def board_channel(project_id: object) -> str:
    return f"board:{project_id}"


class KanbanProjector(Projector):
    name: ClassVar[str] = "kanban"
    aggregates: ClassVar[frozenset[str]] = frozenset({"Workspace", "Project", "Card", "AgentRun"})
    tables: ClassVar[tuple[str, ...]] = (
        "rm_workspaces",
        "rm_members",
        "rm_projects",
        "rm_lanes",
        "rm_cards",
    )

    # -- workspaces ---------------------------------------------------------------------------

    @on("Workspace.Created")
    def _workspace_created(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        cur.execute(
            t.q(
                "INSERT INTO {rm_workspaces} (workspace_id, name, markup, billing_increment_micros,"
                " monthly_limit_micros, stripe_customer_id, version, created_at, updated_at)"
                " VALUES (%s, %s, '5', 250000, NULL, NULL, %s, %s, %s)"
            ),
            (env.originator_id, p["name"], env.originator_version, env.timestamp, env.timestamp),
        )
        cur.execute(
            t.q("INSERT INTO {rm_members} (workspace_id, user_id, role) VALUES (%s, %s, 'OWNER')"),
            (env.originator_id, p["owner_id"]),
        )

    @on(
        "Workspace.Renamed",
        "Workspace.PlanSet",
        "Workspace.SpendLimitSet",
        "Workspace.StripeCustomerLinked",
    )
    def _workspace_changed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        columns = {
            "Workspace.Renamed": {"name": env.payload.get("name")},
            "Workspace.PlanSet": {
                "markup": env.payload.get("markup"),
                "billing_increment_micros": env.payload.get("billing_increment_micros"),
            },
            "Workspace.SpendLimitSet": {
                "monthly_limit_micros": env.payload.get("monthly_limit_micros")
            },
            "Workspace.StripeCustomerLinked": {
                "stripe_customer_id": env.payload.get("customer_id")
            },
        }[env.type]
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, columns)

    @on("Workspace.MemberAdded", "Workspace.RoleChanged")
    def _member_set(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q(
                "INSERT INTO {rm_members} (workspace_id, user_id, role) VALUES (%s, %s, %s)"
                " ON CONFLICT (workspace_id, user_id) DO UPDATE SET role = EXCLUDED.role"
            ),
            (env.originator_id, env.payload["user_id"], env.payload["role"]),
        )
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, {})

    @on("Workspace.MemberRemoved")
    def _member_removed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("DELETE FROM {rm_members} WHERE workspace_id = %s AND user_id = %s"),
            (env.originator_id, env.payload["user_id"]),
        )
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, {})

    # -- projects and lanes -------------------------------------------------------------------

    @on("Project.Created")
    def _project_created(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q(
                "INSERT INTO {rm_projects} (workspace_id, project_id, name, archived, version,"
                " created_at, updated_at) VALUES (%s, %s, %s, false, %s, %s, %s)"
            ),
            (
                env.workspace_id,
                env.originator_id,
                env.payload["name"],
                env.originator_version,
                env.timestamp,
                env.timestamp,
            ),
        )
        lanes: list[dict[str, Any]] = env.payload["lanes"]
        cur.executemany(
            t.q(
                "INSERT INTO {rm_lanes} (workspace_id, project_id, name, ord, wip_limit,"
                " card_count) VALUES (%s, %s, %s, %s, %s, 0)"
            ),
            [
                (env.workspace_id, env.originator_id, lane["name"], i, lane["wip_limit"])
                for i, lane in enumerate(lanes)
            ],
        )
        self._board_changed(env, changes, "board.created")

    @on("Project.Renamed", "Project.Archived")
    def _project_changed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        columns: dict[str, Any] = (
            {"name": env.payload["name"]} if env.type == "Project.Renamed" else {"archived": True}
        )
        self._touch(cur, t, "rm_projects", "project_id", env, columns)
        self._board_changed(env, changes, "board.updated")

    @on("Project.LaneAdded")
    def _lane_added(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        cur.execute(
            t.q("UPDATE {rm_lanes} SET ord = ord + 1 WHERE project_id = %s AND ord >= %s"),
            (env.originator_id, p["index"]),
        )
        cur.execute(
            t.q(
                "INSERT INTO {rm_lanes} (workspace_id, project_id, name, ord, wip_limit,"
                " card_count) VALUES (%s, %s, %s, %s, %s, 0)"
            ),
            (env.workspace_id, env.originator_id, p["name"], p["index"], p["wip_limit"]),
        )
        self._board_version(cur, t, env, changes, "lane.added")

    @on("Project.LaneRenamed")
    def _lane_renamed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        args = (env.payload["name"], env.originator_id, env.payload["lane"])
        cur.execute(
            t.q("UPDATE {rm_lanes} SET name = %s WHERE project_id = %s AND name = %s"), args
        )
        cur.execute(
            t.q("UPDATE {rm_cards} SET lane = %s WHERE project_id = %s AND lane = %s"), args
        )
        self._board_version(cur, t, env, changes, "lane.renamed")

    @on("Project.LanesReordered")
    def _lanes_reordered(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        order: list[str] = env.payload["order"]
        cur.execute(
            t.q(
                "UPDATE {rm_lanes} AS l SET ord = o.ord - 1"
                " FROM unnest(%s::text[]) WITH ORDINALITY AS o(name, ord)"
                " WHERE l.project_id = %s AND l.name = o.name"
            ),
            (order, env.originator_id),
        )
        self._board_version(cur, t, env, changes, "lanes.reordered")

    @on("Project.LaneRemoved")
    def _lane_removed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("DELETE FROM {rm_lanes} WHERE project_id = %s AND name = %s RETURNING ord"),
            (env.originator_id, env.payload["lane"]),
        )
        removed = cur.fetchone()
        if removed is not None:
            cur.execute(
                t.q("UPDATE {rm_lanes} SET ord = ord - 1 WHERE project_id = %s AND ord > %s"),
                (env.originator_id, removed["ord"]),
            )
        self._board_version(cur, t, env, changes, "lane.removed")

    @on("Project.WipLimitSet")
    def _wip_limit_set(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("UPDATE {rm_lanes} SET wip_limit = %s WHERE project_id = %s AND name = %s"),
            (env.payload["wip_limit"], env.originator_id, env.payload["lane"]),
        )
        self._board_version(cur, t, env, changes, "lane.wip_limit")

    @on("Project.CardPlaced")
    def _card_placed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._count(cur, t, env, env.payload["lane"], +1)
        self._board_version(cur, t, env, None, "")

    @on("Project.CardMoved")
    def _card_moved_on_board(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        if env.payload["from_lane"] != env.payload["to_lane"]:
            self._count(cur, t, env, env.payload["from_lane"], -1)
            self._count(cur, t, env, env.payload["to_lane"], +1)
        self._board_version(cur, t, env, None, "")

    @on("Project.CardLifted")
    def _card_lifted(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._count(cur, t, env, env.payload["lane"], -1)
        self._board_version(cur, t, env, None, "")

    # -- cards ----------------------------------------------------------------------------------

    @on("Card.Created")
    def _card_created(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        # Upsert: run events (another topic) may already have left a row carrying run data.
        cur.execute(
            t.q(
                "INSERT INTO {rm_cards} (workspace_id, card_id, project_id, title, description,"
                " lane, position, version, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (card_id) DO UPDATE SET project_id = EXCLUDED.project_id,"
                " title = EXCLUDED.title, description = EXCLUDED.description,"
                " lane = EXCLUDED.lane, position = EXCLUDED.position, version = EXCLUDED.version,"
                " created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at"
            ),
            (
                env.workspace_id,
                env.originator_id,
                p["project_id"],
                p["title"],
                p["description"],
                p["lane"],
                p["position"],
                env.originator_version,
                env.timestamp,
                env.timestamp,
            ),
        )
        self._card_changed(env, changes, "card.created", p["project_id"], p["position"])

    @on(
        "Card.Edited",
        "Card.Moved",
        "Card.Assigned",
        "Card.Blocked",
        "Card.Unblocked",
        "Card.Archived",
        "Card.Restored",
    )
    def _card_updated(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        by_type: dict[str, dict[str, Any]] = {
            "Card.Edited": {"title": p.get("title"), "description": p.get("description")},
            "Card.Moved": {"lane": p.get("to_lane"), "position": p.get("position")},
            "Card.Assigned": {"assignee": p.get("assignee")},
            "Card.Blocked": {"blocked_reason": p.get("reason")},
            "Card.Unblocked": {"blocked_reason": None},
            "Card.Archived": {"archived": True},
            "Card.Restored": {
                "archived": False,
                "lane": p.get("lane"),
                "position": p.get("position"),
            },
        }
        columns = by_type[env.type]
        project_id = self._touch(
            cur, t, "rm_cards", "card_id", env, columns, returning="project_id"
        )
        kind = {
            "Card.Moved": "card.moved",
            "Card.Archived": "card.archived",
            "Card.Restored": "card.restored",
        }.get(env.type, "card.updated")
        self._card_changed(env, changes, kind, project_id, p.get("position"))

    @on("Card.Labelled", "Card.Unlabelled")
    def _card_labels(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        label = env.payload["label"]
        if env.type == "Card.Labelled":
            expression = "ARRAY(SELECT DISTINCT x FROM unnest(labels || %s::text) AS x ORDER BY x)"
        else:
            expression = "array_remove(labels, %s::text)"
        cur.execute(
            t.q(
                "UPDATE {rm_cards} SET labels = " + expression + ", version = %s, updated_at = %s"
                " WHERE card_id = %s RETURNING project_id"
            ),
            (label, env.originator_version, env.timestamp, env.originator_id),
        )
        row = cur.fetchone()
        self._card_changed(env, changes, "card.updated", row["project_id"] if row else None, None)

    # -- runs as the board shows them ------------------------------------------------------------

    @on("AgentRun.Requested")
    def _run_requested(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._card_run_upsert(
            cur,
            t,
            env,
            "last_run_id = CASE WHEN EXCLUDED.last_run_position > c.last_run_position"
            " THEN EXCLUDED.last_run_id ELSE c.last_run_id END,"
            " last_run_position = GREATEST(c.last_run_position, EXCLUDED.last_run_position)",
            last_run_id=env.originator_id,
            last_run_position=env.position,
            cost_micros=0,
        )
        self._run_changed(env, changes, env.payload["project_id"], env.payload["card_id"])

    @on("AgentRun.LlmCallCompleted")
    def _run_cost(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._card_run_upsert(
            cur,
            t,
            env,
            "cost_micros = c.cost_micros + EXCLUDED.cost_micros",
            last_run_id=None,
            last_run_position=0,
            cost_micros=int(env.payload["billed_micros"]),
        )
        self._run_changed(env, changes, env.payload["project_id"], env.payload["card_id"])

    @staticmethod
    def _card_run_upsert(
        cur: Cursor[DictRow],
        t: Tables,
        env: EventEnvelope,
        assignments: str,
        *,
        last_run_id: object,
        last_run_position: int,
        cost_micros: int,
    ) -> None:
        """Apply run data to the card whether or not the card's own events arrived yet.

        A card not seen yet gets a placeholder row (empty lane, version 0) that its creation
        event fills in; both updates commute, so any delivery order ends in the same row.
        """
        cur.execute(
            t.q(
                "INSERT INTO {rm_cards} AS c (workspace_id, card_id, project_id, title,"
                " description, lane, position, version, created_at, updated_at, last_run_id,"
                " last_run_position, cost_micros)"
                " VALUES (%s, %s, %s, '', '', '', '', 0, %s, %s, %s, %s, %s)"
                " ON CONFLICT (card_id) DO UPDATE SET " + assignments
            ),
            (
                env.workspace_id,
                env.payload["card_id"],
                env.payload["project_id"],
                env.timestamp,
                env.timestamp,
                last_run_id,
                last_run_position,
                cost_micros,
            ),
        )

    @on("AgentRun.Started", "AgentRun.Succeeded", "AgentRun.Failed", "AgentRun.Cancelled",
        "AgentRun.TimedOut")  # fmt: skip
    def _run_status(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("SELECT project_id, card_id FROM {rm_cards} WHERE last_run_id = %s"),
            (env.originator_id,),
        )
        row = cur.fetchone()
        if row is not None:
            self._run_changed(env, changes, row["project_id"], row["card_id"])

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _touch(
        cur: Cursor[DictRow],
        t: Tables,
        table: str,
        key: str,
        env: EventEnvelope,
        columns: dict[str, Any],
        *,
        returning: str | None = None,
    ) -> Any:
        assignments = "".join(f"{column} = %s, " for column in columns)
        statement = (
            f"UPDATE {{{table}}} SET {assignments}version = %s, updated_at = %s WHERE {key} = %s"
        )
        if returning:
            statement += f" RETURNING {returning}"
        cur.execute(
            t.q(statement),
            (*columns.values(), env.originator_version, env.timestamp, env.originator_id),
        )
        if returning:
            row = cur.fetchone()
            return row[returning] if row else None
        return None

    @staticmethod
    def _count(cur: Cursor[DictRow], t: Tables, env: EventEnvelope, lane: str, delta: int) -> None:
        cur.execute(
            t.q(
                "UPDATE {rm_lanes} SET card_count = card_count + %s"
                " WHERE project_id = %s AND name = %s"
            ),
            (delta, env.originator_id, lane),
        )

    def _board_version(
        self,
        cur: Cursor[DictRow],
        t: Tables,
        env: EventEnvelope,
        changes: list[Change] | None,
        kind: str,
    ) -> None:
        self._touch(cur, t, "rm_projects", "project_id", env, {})
        if changes is not None and kind:
            self._board_changed(env, changes, kind)

    @staticmethod
    def _board_changed(env: EventEnvelope, changes: list[Change], kind: str) -> None:
        changes.append(
            Change(
                board_channel(env.originator_id),
                {"kind": kind, "cardId": None, "runId": None, "position": env.position},
            )
        )

    @staticmethod
    def _card_changed(
        env: EventEnvelope,
        changes: list[Change],
        kind: str,
        project_id: object,
        _card_position: object,
    ) -> None:
        if project_id is None:
            return
        changes.append(
            Change(
                board_channel(project_id),
                {
                    "kind": kind,
                    "cardId": str(env.originator_id),
                    "runId": None,
                    "position": env.position,
                },
            )
        )

    @staticmethod
    def _run_changed(
        env: EventEnvelope, changes: list[Change], project_id: object, card_id: object
    ) -> None:
        if project_id is None:
            return
        changes.append(
            Change(
                board_channel(project_id),
                {
                    "kind": f"run.{env.type.split('.', 1)[1].lower()}",
                    "cardId": str(card_id) if card_id else None,
                    "runId": str(env.originator_id),
                    "position": env.position,
                },
            )
        )
