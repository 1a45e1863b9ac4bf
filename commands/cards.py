"""Card commands. A move, creation, archive or restore changes the card and the board's lane
membership together (one save), so WIP limits hold under concurrent moves.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID, uuid4

from commands import models as m
from commands.service import Actor, CommandResult, Decision, WriteSide, expect_version
from domain.card import Card
from domain.errors import UndecodableEvent, ValidationFailed
from domain.meta import EventMeta
from domain.project import Placed, Project
from domain.roles import Role
from domain.workspace import Workspace


class CardCommands(WriteSide):
    """Commands on a :class:`~domain.card.Card`."""

    def create_card(self, cmd: m.CreateCard, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            project = self.load(Project, cmd.project_id, actor, Role.MEMBER, cmd.action)
            lane = cmd.lane if cmd.lane is not None else project.lanes[0].name
            card_id = uuid4()
            project, placed, respread = self._place(
                project,
                lane,
                lambda board, fixed: board.place_card(card_id, lane, fixed=fixed, meta=meta),
                meta,
            )
            card = Card.create(
                card_id=card_id,
                workspace_id=project.workspace_id,
                project_id=project.id,
                title=cmd.title,
                description=cmd.description,
                lane=lane,
                position=placed.position,
                meta=meta,
            )
            return Decision(card, "card", [card, project, *respread])

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def update_card(self, cmd: m.UpdateCard, actor: Actor) -> CommandResult:
        def change(card: Card, meta: EventMeta) -> None:
            card.edit(title=cmd.title, description=cmd.description, meta=meta)
            if cmd.labels is not None:
                wanted = {label.strip() for label in cmd.labels}
                for label in sorted(set(card.labels) - wanted):
                    card.unlabel(label, meta=meta)
                for label in sorted(wanted - set(card.labels)):
                    card.label(label, meta=meta)

        return self._change_card(cmd, actor, change, expected_version=cmd.expected_version)

    def move_card(self, cmd: m.MoveCard, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            card = self.load(Card, cmd.card_id, actor, Role.MEMBER, cmd.action)
            expect_version(card, cmd.expected_version)
            project = self.aggregate(Project, card.project_id)
            card.ensure_live("move")
            from_lane = project.lane_of(card.id)
            card.ensure_movable(cmd.to_lane, from_lane=from_lane)
            project, placed, respread = self._place(
                project,
                cmd.to_lane,
                lambda board, fixed: board.move_card(
                    card.id,
                    cmd.to_lane,
                    after_card_id=cmd.after_card_id,
                    before_card_id=cmd.before_card_id,
                    fixed=fixed,
                    meta=meta,
                ),
                meta,
            )
            card.move(cmd.to_lane, placed.position, from_lane=from_lane, meta=meta)
            return Decision(card, "card", [card, project, *respread])

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def assign_card(self, cmd: m.AssignCard, actor: Actor) -> CommandResult:
        def assign(card: Card, meta: EventMeta) -> None:
            card.ensure_live("assign")
            if cmd.assignee is not None:
                workspace = self.aggregate(Workspace, card.workspace_id, copy=False)
                if workspace.role_of(cmd.assignee.strip()) is None:
                    raise ValidationFailed(
                        f"assignee {cmd.assignee.strip()[:100]!r} is not a member of workspace "
                        f"{workspace.id}; add them with addMember first"
                    )
            card.assign(cmd.assignee, meta=meta)

        return self._change_card(cmd, actor, assign, expected_version=cmd.expected_version)

    def label_card(self, cmd: m.LabelCard, actor: Actor) -> CommandResult:
        return self._change_card(cmd, actor, lambda card, meta: card.label(cmd.label, meta=meta))

    def unlabel_card(self, cmd: m.UnlabelCard, actor: Actor) -> CommandResult:
        return self._change_card(cmd, actor, lambda card, meta: card.unlabel(cmd.label, meta=meta))

    def block_card(self, cmd: m.BlockCard, actor: Actor) -> CommandResult:
        return self._change_card(cmd, actor, lambda card, meta: card.block(cmd.reason, meta=meta))

    def unblock_card(self, cmd: m.UnblockCard, actor: Actor) -> CommandResult:
        return self._change_card(cmd, actor, lambda card, meta: card.unblock(meta=meta))

    def archive_card(self, cmd: m.ArchiveCard, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            card = self.load(Card, cmd.card_id, actor, Role.MEMBER, cmd.action)
            expect_version(card, cmd.expected_version)
            card.archive(meta=meta)
            project = self.aggregate(Project, card.project_id)
            project.lift_card(card.id, meta=meta)
            return Decision(card, "card", [card, project])

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def restore_card(self, cmd: m.RestoreCard, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            card = self.load(Card, cmd.card_id, actor, Role.MEMBER, cmd.action)
            project = self.aggregate(Project, card.project_id)
            lane = cmd.lane or project.lane_to_restore(card.id)
            left = project.lane_left(card.id)  # before placing the card forgets it
            card.ensure_restorable(lane, from_lane=left)
            project, placed, respread = self._place(
                project,
                lane,
                lambda board, fixed: board.place_card(card.id, lane, fixed=fixed, meta=meta),
                meta,
            )
            card.restore(lane, placed.position, from_lane=left, meta=meta)
            return Decision(card, "card", [card, project, *respread])

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def _place(
        self,
        project: Project,
        lane: str,
        place: Callable[[Project, frozenset[UUID]], Placed],
        meta: EventMeta,
    ) -> tuple[Project, Placed, list[Card]]:
        """``place`` a card on ``project``'s board, and tell each card the board re-spread to
        make room its fresh key (see :meth:`_respread`).

        A card whose events cannot be decoded cannot be told: the placement is decided again on
        a fresh copy of the board with that card's key kept as it is (the re-spread goes around
        it, or there is none), rather than failing a move that is not that card's. Returns the
        board the placement was made on."""
        fixed: frozenset[UUID] = frozenset()
        while True:
            placed = place(project, fixed)
            cards, unreadable = self._respread(lane, placed, meta)
            if not unreadable:
                return project, placed, cards
            fixed |= unreadable
            project = self.aggregate(Project, project.id)

    def _respread(
        self, lane: str, placed: Placed, meta: EventMeta
    ) -> tuple[list[Card], frozenset[UUID]]:
        """Each card the board re-spread to make room for a placement, told its fresh key: the
        card's own history says what happened to it, and the read models follow its event; and
        the re-spread cards that cannot be loaded (an event that cannot be decoded).

        Saved with the placement: a concurrent change of any of them collides on its version
        and the command decides again, as any lost race does."""
        cards: list[Card] = []
        unreadable: set[UUID] = set()
        for card_id, position in placed.respread:
            try:
                card = self.aggregate(Card, card_id)
            except UndecodableEvent:
                unreadable.add(card_id)
                continue
            card.respread(lane, position, meta=meta)
            cards.append(card)
        return cards, frozenset(unreadable)

    def _change_card(
        self,
        cmd: m.CardCommand,
        actor: Actor,
        change: Callable[[Card, EventMeta], object],
        *,
        expected_version: int | None = None,
    ) -> CommandResult:
        """A change of the card alone (not of its place on the board), by a MEMBER."""
        return self._change(
            Card, "card", cmd.card_id, cmd, actor,
            needed=Role.MEMBER, change=change, expected_version=expected_version,
        )  # fmt: skip

    # -- reading the write model ------------------------------------------------------------------

    def card_at(self, card_id: UUID, actor: Actor, *, version: int | None = None) -> Card:
        """A card as it was at ``version`` (or now), for history and audit."""
        return self.load(Card, card_id, actor, Role.VIEWER, "read card", version=version)

    def last_version(self, aggregate_id: UUID) -> int:
        """The version of an aggregate's last stored event (0: none), decoding nothing: what a
        history reader that cannot decode, or see, every event checks its count against."""
        stored = self.recorder.select_events(aggregate_id, desc=True, limit=1)
        return stored[0].originator_version if stored else 0

    def card_snapshot(self, card_id: UUID) -> Card:
        return self.aggregate(Card, card_id)
