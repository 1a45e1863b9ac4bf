"""Card: a unit of work on a board, moved across lanes and worked on by agents."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from domain.base import TenantAggregate
from domain.errors import InvalidTransition, ValidationFailed
from domain.meta import EventMeta
from domain.text import trimmed
from domain.workspace import clean_name

MAX_DESCRIPTION_LENGTH = 100_000
MAX_LABELS = 50
MAX_LABEL_LENGTH = 50


class Card(TenantAggregate):
    """A card's own facts. Where it sits relative to other cards is the board's business."""

    if TYPE_CHECKING:
        project_id: UUID
        title: str
        description: str
        lane: str
        position: str
        assignee: str | None
        labels: list[str]
        blocked_reason: str | None
        archived: bool

    class Created(TenantAggregate.Created):
        project_id: UUID
        title: str
        description: str
        lane: str
        position: str

        def apply(self, aggregate: Card) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.project_id = self.project_id
            aggregate.title = self.title
            aggregate.description = self.description
            aggregate.lane = self.lane
            aggregate.position = self.position
            aggregate.assignee = None
            aggregate.labels = []
            aggregate.blocked_reason = None
            aggregate.archived = False

    class Edited(TenantAggregate.Event):
        title: str
        description: str

        def apply(self, aggregate: Card) -> None:
            aggregate.title = self.title
            aggregate.description = self.description

    class Moved(TenantAggregate.Event):
        from_lane: str
        to_lane: str
        position: str

        def apply(self, aggregate: Card) -> None:
            aggregate.lane = self.to_lane
            aggregate.position = self.position

    class Respread(TenantAggregate.Event):
        """The board gave the card a fresh key in its lane to make room for another card's
        placement (see :meth:`domain.project.Project.move_card`): its order among its neighbours
        is unchanged, and nobody moved it."""

        lane: str
        position: str

        def apply(self, aggregate: Card) -> None:
            aggregate.lane = self.lane
            aggregate.position = self.position

    class Assigned(TenantAggregate.Event):
        assignee: str | None

        def apply(self, aggregate: Card) -> None:
            aggregate.assignee = self.assignee

    class Labelled(TenantAggregate.Event):
        label: str

        def apply(self, aggregate: Card) -> None:
            aggregate.labels = sorted({*aggregate.labels, self.label})

    class Unlabelled(TenantAggregate.Event):
        label: str

        def apply(self, aggregate: Card) -> None:
            aggregate.labels = [label for label in aggregate.labels if label != self.label]

    class Blocked(TenantAggregate.Event):
        reason: str

        def apply(self, aggregate: Card) -> None:
            aggregate.blocked_reason = self.reason

    class Unblocked(TenantAggregate.Event):
        def apply(self, aggregate: Card) -> None:
            aggregate.blocked_reason = None

    class Archived(TenantAggregate.Event):
        def apply(self, aggregate: Card) -> None:
            aggregate.archived = True

    class Restored(TenantAggregate.Event):
        lane: str
        position: str

        def apply(self, aggregate: Card) -> None:
            aggregate.archived = False
            aggregate.lane = self.lane
            aggregate.position = self.position

    @classmethod
    def create(
        cls,
        *,
        card_id: UUID,
        workspace_id: UUID,
        project_id: UUID,
        title: str,
        description: str,
        lane: str,
        position: str,
        meta: EventMeta,
    ) -> Card:
        return cls._create(
            cls.Created,
            id=card_id,
            workspace_id=workspace_id,
            project_id=project_id,
            title=clean_name(title, what="card title"),
            description=_description(description),
            lane=lane,
            position=position,
            meta=meta.as_dict(),
        )

    @property
    def blocked(self) -> bool:
        return self.blocked_reason is not None

    def edit(self, *, title: str | None, description: str | None, meta: EventMeta) -> None:
        self._live("edit")
        new_title = self.title if title is None else clean_name(title, what="card title")
        new_description = self.description if description is None else _description(description)
        if (new_title, new_description) != (self.title, self.description):
            self._record(self.Edited, meta, title=new_title, description=new_description)

    def ensure_movable(self, to_lane: str, *, from_lane: str) -> None:
        """Refuse a move this card's own state forbids; ``from_lane`` is the board's view."""
        self._live("move")
        self._stays_while_blocked(to_lane, from_lane, doing="moving it")

    def ensure_restorable(self, to_lane: str, *, from_lane: str | None) -> None:
        """Refuse a restore this card's own state forbids. ``from_lane`` is the lane it left, under
        its current name (the board's view), ``None`` when that lane is gone: a blocked card goes
        back to the lane it left, as a move of it may not change lane either."""
        if not self.archived:
            raise InvalidTransition(f"card {self.id} is not archived")
        if from_lane is not None:
            self._stays_while_blocked(to_lane, from_lane, doing="restoring it")

    def _stays_while_blocked(self, to_lane: str, from_lane: str, *, doing: str) -> None:
        if self.blocked and to_lane != from_lane:
            raise InvalidTransition(
                f"card {self.id} is blocked ({self.blocked_reason}); unblock it before {doing} "
                f"to another lane than {from_lane!r}"
            )

    def move(
        self, to_lane: str, position: str, *, from_lane: str | None = None, meta: EventMeta
    ) -> None:
        """Record a move the board has admitted (WIP limit, neighbours).

        The board, not the card, knows the card's current lane name (a lane rename changes the
        board only), so callers pass it as ``from_lane``; without it the card's own is used.
        """
        from_lane = self.lane if from_lane is None else from_lane
        self.ensure_movable(to_lane, from_lane=from_lane)
        self._record(self.Moved, meta, from_lane=from_lane, to_lane=to_lane, position=position)

    def respread(self, lane: str, position: str, *, meta: EventMeta) -> None:
        """Record the fresh key the board gave this card in ``lane`` (the board's name for the
        card's lane) while re-spreading it; the board decided it, so there is nothing to refuse."""
        self._record(self.Respread, meta, lane=lane, position=position)

    def assign(self, assignee: str | None, *, meta: EventMeta) -> None:
        self._live("assign")
        if assignee is not None:
            assignee = trimmed(assignee, what="assignee", at_most=200)
        if assignee != self.assignee:
            self._record(self.Assigned, meta, assignee=assignee)

    def label(self, label: str, *, meta: EventMeta) -> None:
        self._live("label")
        text = trimmed(label, what="label", at_most=MAX_LABEL_LENGTH)
        if text in self.labels:
            return
        if len(self.labels) >= MAX_LABELS:
            raise ValidationFailed(f"card {self.id} already has {MAX_LABELS} labels")
        self._record(self.Labelled, meta, label=text)

    def unlabel(self, label: str, *, meta: EventMeta) -> None:
        self._live("unlabel")
        text = label.strip()
        if text in self.labels:
            self._record(self.Unlabelled, meta, label=text)

    def block(self, reason: str, *, meta: EventMeta) -> None:
        self._live("block")
        text = reason.strip()
        if not text:
            raise ValidationFailed(f"blocking card {self.id} needs a reason")
        if self.blocked:
            raise InvalidTransition(f"card {self.id} is already blocked ({self.blocked_reason})")
        self._record(self.Blocked, meta, reason=text[:1000])

    def unblock(self, *, meta: EventMeta) -> None:
        self._live("unblock")
        if not self.blocked:
            raise InvalidTransition(f"card {self.id} is not blocked")
        self._record(self.Unblocked, meta)

    def archive(self, *, meta: EventMeta) -> None:
        if self.archived:
            raise InvalidTransition(f"card {self.id} is already archived")
        self._record(self.Archived, meta)

    def restore(self, lane: str, position: str, *, from_lane: str | None, meta: EventMeta) -> None:
        """Record a restore the board has admitted; ``from_lane`` as for
        :meth:`ensure_restorable`."""
        self.ensure_restorable(lane, from_lane=from_lane)
        self._record(self.Restored, meta, lane=lane, position=position)

    def ensure_live(self, action: str) -> None:
        """Refuse ``action`` on an archived card."""
        self._live(action)

    def _live(self, action: str) -> None:
        if self.archived:
            raise InvalidTransition(f"cannot {action} card {self.id}: it is archived")


#: Card events whose ``apply`` sets the same attributes from the event's own values, whatever the
#: card was, where no card event's ``apply`` reads those attributes: of several of one kind, the
#: latest decides the card (version and time aside). A reader folding many events (a board as of
#: an instant) may skip all but the latest of each kind. ``tests/unit/test_card_superseding.py``
#: holds every kind of card event to this.
OVERWRITING_EVENTS: tuple[type[TenantAggregate.Event], ...] = (
    Card.Edited,
    Card.Moved,
    Card.Respread,
    Card.Assigned,
    Card.Blocked,
    Card.Unblocked,
    Card.Archived,
    Card.Restored,
)


def _description(value: str) -> str:
    if "\x00" in value:
        raise ValidationFailed("description must not contain NUL characters")
    if len(value) > MAX_DESCRIPTION_LENGTH:
        raise ValidationFailed(
            f"description is {len(value)} characters; at most {MAX_DESCRIPTION_LENGTH}"
        )
    return value
