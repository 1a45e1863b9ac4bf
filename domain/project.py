"""Project and its board: lanes, WIP limits, and where every live card sits.

The board keeps lane membership itself so that a WIP limit is a rule of one aggregate: a move saves
the card and the project together, and two concurrent moves into the last free slot collide on the
project's version instead of both succeeding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from domain.base import TenantAggregate
from domain.errors import (
    Conflict,
    Duplicate,
    InvalidTransition,
    MissingPart,
    ValidationFailed,
    WipLimitExceeded,
)
from domain.meta import EventMeta
from domain.positions import RESPREAD_THRESHOLD, position_between, respread
from domain.workspace import clean_name

if TYPE_CHECKING:
    from collections.abc import Collection

MAX_LANES = 50
MAX_WIP_LIMIT = 10_000


@dataclass(frozen=True)
class LaneSpec:
    name: str
    wip_limit: int | None = None


@dataclass(frozen=True)
class Placement:
    lane: str
    position: str


@dataclass(frozen=True)
class Placed:
    """Where a placement put its card, and the other cards of the lane it re-spread to make room
    (each with its fresh key; empty for almost every placement): the caller records each of
    those on its card too, in the same save."""

    position: str
    respread: tuple[tuple[UUID, str], ...] = ()


def check_wip_limit(value: int | None, *, lane: str) -> int | None:
    if value is not None and not 0 < value <= MAX_WIP_LIMIT:
        raise ValidationFailed(
            f"WIP limit of lane {lane!r} must be between 1 and {MAX_WIP_LIMIT} or null, got {value}"
        )
    return value


class Project(TenantAggregate):
    """A project and its Kanban board."""

    if TYPE_CHECKING:
        name: str
        archived: bool
        lanes: list[LaneSpec]
        placements: dict[UUID, Placement]
        lifted: dict[UUID, str]

    class Created(TenantAggregate.Created):
        name: str
        lanes: list[dict[str, Any]]

        def apply(self, aggregate: Project) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.name = self.name
            aggregate.archived = False
            aggregate.lanes = [LaneSpec(lane["name"], lane["wip_limit"]) for lane in self.lanes]
            aggregate.placements = {}
            aggregate.lifted = {}

    class Renamed(TenantAggregate.Event):
        name: str

        def apply(self, aggregate: Project) -> None:
            aggregate.name = self.name

    class Archived(TenantAggregate.Event):
        def apply(self, aggregate: Project) -> None:
            aggregate.archived = True

    class LaneAdded(TenantAggregate.Event):
        name: str
        wip_limit: int | None
        index: int

        def apply(self, aggregate: Project) -> None:
            aggregate.lanes.insert(self.index, LaneSpec(self.name, self.wip_limit))

    class LaneRenamed(TenantAggregate.Event):
        lane: str
        name: str

        def apply(self, aggregate: Project) -> None:
            aggregate.lanes = [
                LaneSpec(self.name, spec.wip_limit) if spec.name == self.lane else spec
                for spec in aggregate.lanes
            ]
            aggregate.placements = {
                card: Placement(self.name, p.position) if p.lane == self.lane else p
                for card, p in aggregate.placements.items()
            }
            aggregate.lifted = {
                card: self.name if lane == self.lane else lane
                for card, lane in aggregate.lifted.items()
            }

    class LanesReordered(TenantAggregate.Event):
        order: list[str]

        def apply(self, aggregate: Project) -> None:
            by_name = {spec.name: spec for spec in aggregate.lanes}
            aggregate.lanes = [by_name[name] for name in self.order]

    class LaneRemoved(TenantAggregate.Event):
        lane: str

        def apply(self, aggregate: Project) -> None:
            aggregate.lanes = [spec for spec in aggregate.lanes if spec.name != self.lane]

    class WipLimitSet(TenantAggregate.Event):
        lane: str
        wip_limit: int | None

        def apply(self, aggregate: Project) -> None:
            aggregate.lanes = [
                LaneSpec(spec.name, self.wip_limit) if spec.name == self.lane else spec
                for spec in aggregate.lanes
            ]

    class CardPlaced(TenantAggregate.Event):
        """A card entered the board (created or restored from the archive)."""

        card_id: UUID
        lane: str
        position: str

        def apply(self, aggregate: Project) -> None:
            aggregate.placements[self.card_id] = Placement(self.lane, self.position)
            aggregate.lifted.pop(self.card_id, None)

    class CardMoved(TenantAggregate.Event):
        card_id: UUID
        from_lane: str
        to_lane: str
        position: str

        def apply(self, aggregate: Project) -> None:
            aggregate.placements[self.card_id] = Placement(self.to_lane, self.position)

    class CardLifted(TenantAggregate.Event):
        """A card left the board (archived); it no longer counts against a WIP limit."""

        card_id: UUID
        lane: str

        def apply(self, aggregate: Project) -> None:
            del aggregate.placements[self.card_id]
            aggregate.lifted[self.card_id] = self.lane

    @classmethod
    def create(
        cls,
        *,
        project_id: UUID,
        workspace_id: UUID,
        name: str,
        lanes: list[LaneSpec],
        meta: EventMeta,
    ) -> Project:
        if not lanes:
            raise ValidationFailed("a project needs at least one lane")
        if len(lanes) > MAX_LANES:
            raise ValidationFailed(f"a project has at most {MAX_LANES} lanes, got {len(lanes)}")
        cleaned: list[dict[str, Any]] = []
        seen: set[str] = set()
        for spec in lanes:
            lane = clean_name(spec.name, what="lane name")
            if lane in seen:
                raise Duplicate(f"lane {lane!r} appears twice in the new project")
            seen.add(lane)
            cleaned.append({"name": lane, "wip_limit": check_wip_limit(spec.wip_limit, lane=lane)})
        return cls._create(
            cls.Created,
            id=project_id,
            workspace_id=workspace_id,
            name=clean_name(name, what="project name"),
            lanes=cleaned,
            meta=meta.as_dict(),
        )

    # -- lanes ------------------------------------------------------------------------------

    def lane(self, name: str) -> LaneSpec:
        for spec in self.lanes:
            if spec.name == name:
                return spec
        known = ", ".join(repr(s.name) for s in self.lanes)
        raise MissingPart(f"project {self.id} has no lane {name!r}; lanes are {known}")

    def lane_to_restore(self, card_id: UUID) -> str:
        """Where an archived card goes back to: the lane it left (under its current name), or
        the first lane when that lane is gone."""
        return self.lane_left(card_id) or self.lanes[0].name

    def lane_left(self, card_id: UUID) -> str | None:
        """The lane an archived card left, under its current name; ``None`` once it is gone."""
        lane = self.lifted.get(card_id)
        if lane is not None and any(spec.name == lane for spec in self.lanes):
            return lane
        return None

    def lane_of(self, card_id: UUID) -> str:
        return self._placement(card_id).lane

    def cards_in(self, lane: str) -> list[tuple[str, UUID]]:
        """(position, card id) of the live cards of ``lane``, in board order."""
        return sorted((p.position, card) for card, p in self.placements.items() if p.lane == lane)

    def count(self, lane: str) -> int:
        return sum(1 for p in self.placements.values() if p.lane == lane)

    def add_lane(
        self, name: str, *, wip_limit: int | None, index: int | None, meta: EventMeta
    ) -> None:
        self.ensure_writable()
        lane = clean_name(name, what="lane name")
        if any(spec.name == lane for spec in self.lanes):
            raise Duplicate(f"project {self.id} already has a lane {lane!r}")
        if len(self.lanes) >= MAX_LANES:
            raise ValidationFailed(f"project {self.id} already has {MAX_LANES} lanes")
        at = len(self.lanes) if index is None else index
        if not 0 <= at <= len(self.lanes):
            raise ValidationFailed(f"lane index {at} is outside 0..{len(self.lanes)}")
        self._record(
            self.LaneAdded,
            meta,
            name=lane,
            wip_limit=check_wip_limit(wip_limit, lane=lane),
            index=at,
        )

    def rename_lane(self, lane: str, name: str, *, meta: EventMeta) -> None:
        self.ensure_writable()
        self.lane(lane)
        new = clean_name(name, what="lane name")
        if new == lane:
            return
        if any(spec.name == new for spec in self.lanes):
            raise Duplicate(f"project {self.id} already has a lane {new!r}")
        self._record(self.LaneRenamed, meta, lane=lane, name=new)

    def reorder_lanes(self, order: list[str], *, meta: EventMeta) -> None:
        self.ensure_writable()
        if sorted(order) != sorted(spec.name for spec in self.lanes) or len(set(order)) != len(
            order
        ):
            raise ValidationFailed(
                f"new lane order {order} must name each lane of project {self.id} exactly once"
            )
        self._record(self.LanesReordered, meta, order=list(order))

    def remove_lane(self, lane: str, *, meta: EventMeta) -> None:
        self.ensure_writable()
        self.lane(lane)
        if self.count(lane):
            raise InvalidTransition(
                f"lane {lane!r} of project {self.id} still holds {self.count(lane)} card(s)"
            )
        if len(self.lanes) == 1:
            raise InvalidTransition(f"cannot remove {lane!r}: the last lane of project {self.id}")
        self._record(self.LaneRemoved, meta, lane=lane)

    def set_wip_limit(self, lane: str, wip_limit: int | None, *, meta: EventMeta) -> None:
        self.ensure_writable()
        spec = self.lane(lane)
        limit = check_wip_limit(wip_limit, lane=lane)
        if limit is not None and self.count(lane) > limit:
            raise WipLimitExceeded(
                f"lane {lane!r} of project {self.id} holds {self.count(lane)} cards; "
                f"a WIP limit of {limit} would already be broken"
            )
        if spec.wip_limit != limit:
            self._record(self.WipLimitSet, meta, lane=lane, wip_limit=limit)

    def rename(self, name: str, *, meta: EventMeta) -> None:
        self.ensure_writable()
        new = clean_name(name, what="project name")
        if new != self.name:
            self._record(self.Renamed, meta, name=new)

    def archive(self, *, meta: EventMeta) -> None:
        if not self.archived:
            self._record(self.Archived, meta)

    # -- cards on the board ------------------------------------------------------------------

    def place_card(
        self,
        card_id: UUID,
        lane: str,
        *,
        after_card_id: UUID | None = None,
        before_card_id: UUID | None = None,
        fixed: Collection[UUID] = (),
        meta: EventMeta,
    ) -> Placed:
        """Put a new (or restored) card into ``lane``; says where (see :meth:`move_card`)."""
        self.ensure_writable()
        if card_id in self.placements:
            raise Duplicate(f"card {card_id} is already on the board of project {self.id}")
        self._admit(lane, card_id)
        placed = self._position_in(
            lane, card_id, after_card_id, before_card_id, fixed=fixed, meta=meta
        )
        self._record(self.CardPlaced, meta, card_id=card_id, lane=lane, position=placed.position)
        return placed

    def move_card(
        self,
        card_id: UUID,
        to_lane: str,
        *,
        after_card_id: UUID | None = None,
        before_card_id: UUID | None = None,
        fixed: Collection[UUID] = (),
        meta: EventMeta,
    ) -> Placed:
        """Move a card to ``to_lane`` between two neighbours; says where it went.

        ``after_card_id`` is the card that will precede it and ``before_card_id`` the card that
        will follow it; with neither, the card goes to the end of the lane. When the key between
        the neighbours would be longer than :data:`~domain.positions.RESPREAD_THRESHOLD`, the
        lane is re-spread first (see :meth:`_respread`), and ``respread`` names the cards whose
        keys changed: never one of ``fixed``, cards whose keys must stay as they are.
        """
        self.ensure_writable()
        current = self._placement(card_id)
        if current.lane != to_lane:
            self._admit(to_lane, card_id)
        placed = self._position_in(
            to_lane, card_id, after_card_id, before_card_id, fixed=fixed, meta=meta
        )
        self._record(
            self.CardMoved,
            meta,
            card_id=card_id,
            from_lane=current.lane,
            to_lane=to_lane,
            position=placed.position,
        )
        return placed

    def lift_card(self, card_id: UUID, *, meta: EventMeta) -> None:
        placement = self._placement(card_id)
        self._record(self.CardLifted, meta, card_id=card_id, lane=placement.lane)

    def _admit(self, lane: str, card_id: UUID) -> None:
        spec = self.lane(lane)
        if spec.wip_limit is not None and self.count(lane) >= spec.wip_limit:
            raise WipLimitExceeded(
                f"lane {lane!r} of project {self.id} is at its WIP limit of {spec.wip_limit}; "
                f"card {card_id} cannot enter",
                lane=lane,
                wip_limit=spec.wip_limit,
            )

    def _position_in(
        self,
        lane: str,
        card_id: UUID,
        after_card_id: UUID | None,
        before_card_id: UUID | None,
        *,
        fixed: Collection[UUID],
        meta: EventMeta,
    ) -> Placed:
        """The card's new key in ``lane`` (re-spreading the lane when it would be too long)."""
        order = [(pos, cid) for pos, cid in self.cards_in(lane) if cid != card_id]
        gap = self._gap(lane, card_id, order, after_card_id, before_card_id)
        keys = [pos for pos, _ in order]
        position = position_between(
            keys[gap - 1] if gap > 0 else None, keys[gap] if gap < len(keys) else None
        )
        if len(position) <= RESPREAD_THRESHOLD:
            return Placed(position)
        return self._respread(lane, order, gap, fixed, meta) or Placed(position)

    def _respread(
        self,
        lane: str,
        order: list[tuple[str, UUID]],
        gap: int,
        fixed: Collection[UUID],
        meta: EventMeta,
    ) -> Placed | None:
        """Give the cards of ``lane`` around ``gap`` (a window widened until its keys are short,
        see :func:`~domain.positions.respread`) fresh, evenly spread keys, in their order, and
        say where the card going into ``gap`` goes among them.

        Each re-keyed card is a ``CardMoved`` within its lane, recorded before the placement
        that needed the room: the board folds it as any move (no lane count changes, so no WIP
        limit is involved) and a concurrent move of any card collides on the board's version.
        """
        kept = [index for index, (_, card) in enumerate(order) if card in fixed]
        spread = respread([pos for pos, _ in order], gap, kept)
        if spread is None:
            return None
        moved = tuple(
            (card, key)
            for (_, card), key in zip(order[spread.start : spread.end], spread.others, strict=True)
        )
        for card, key in moved:
            self._record(
                self.CardMoved, meta, card_id=card, from_lane=lane, to_lane=lane, position=key
            )
        return Placed(spread.newcomer, moved)

    def _gap(
        self,
        lane: str,
        card_id: UUID,
        order: list[tuple[str, UUID]],
        after_card_id: UUID | None,
        before_card_id: UUID | None,
    ) -> int:
        """Where among ``order`` (the lane's other cards) the card goes: the index it takes."""
        ids = [cid for _, cid in order]
        if after_card_id is not None and after_card_id == before_card_id:
            raise ValidationFailed(
                f"a card cannot go both after and before card {after_card_id}: name two "
                "neighbours, or one"
            )
        for neighbour in (after_card_id, before_card_id):
            if neighbour == card_id:
                raise ValidationFailed(f"card {card_id} cannot be placed next to itself")
            if neighbour is not None and neighbour not in ids:
                raise Conflict(
                    f"card {neighbour} is not in lane {lane!r} of project {self.id}; "
                    "refresh the board and retry"
                )
        if after_card_id is None and before_card_id is None:
            return len(order)
        if after_card_id is not None and before_card_id is not None:
            i, j = ids.index(after_card_id), ids.index(before_card_id)
            if j != i + 1:
                raise Conflict(
                    f"cards {after_card_id} and {before_card_id} are not adjacent in lane "
                    f"{lane!r} (in that order); refresh the board and retry"
                )
            return j
        if after_card_id is not None:
            return ids.index(after_card_id) + 1
        assert before_card_id is not None
        return ids.index(before_card_id)

    def _placement(self, card_id: UUID) -> Placement:
        placement = self.placements.get(card_id)
        if placement is None:
            raise MissingPart(f"card {card_id} is not on the board of project {self.id}")
        return placement

    def ensure_writable(self) -> None:
        """Refuse a change of an archived project: of its board, and of what its cards cost
        (a run started on one of them)."""
        if self.archived:
            raise InvalidTransition(f"project {self.id} is archived")
