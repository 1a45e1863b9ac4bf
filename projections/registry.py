"""Every read model the system keeps, by name: what workers, rebuild and the CLI choose from."""

from __future__ import annotations

from domain.errors import ValidationFailed
from projections.activity import ActivityProjector
from projections.base import Projector
from projections.billing import BillingProjector
from projections.kanban import KanbanProjector
from projections.runs import RunsProjector

ALL_PROJECTORS: tuple[type[Projector], ...] = (
    KanbanProjector,
    RunsProjector,
    BillingProjector,
    ActivityProjector,
)


def projector_names() -> list[str]:
    return [projector.name for projector in ALL_PROJECTORS]


def projector_named(name: str) -> Projector:
    """A fresh projector called ``name``; an unknown name is refused with the valid ones."""
    for projector in ALL_PROJECTORS:
        if projector.name == name:
            return projector()
    raise ValidationFailed(
        f"there is no projector named {name!r}; choose one of {', '.join(projector_names())}"
    )


def all_projectors() -> list[Projector]:
    """One fresh instance of every projector, in registry order."""
    return [projector() for projector in ALL_PROJECTORS]
