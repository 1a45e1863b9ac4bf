"""The write side's aggregate cache (as infra.bootstrap configures it: cached, fast-forwarded).

Commands get copies of the cached aggregates that copy only their containers
(``TenantAggregate.__deepcopy__``). These tests hold that cheaper copy to the promise of the
library's full ``deepcopy``: whatever a command does to its copy, the cached aggregate changes only
through events that were stored.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from aw_builders import POPO_ENV, World, state_of

from commands import models as m
from commands.handlers import AgentWorks
from domain.errors import Unavailable, ValidationFailed
from domain.project import Project

CACHED_ENV = {**POPO_ENV, "AGGREGATE_CACHE_MAXSIZE": "100", "AGGREGATE_CACHE_FASTFORWARD": "y"}


def cached_world() -> World:
    world = World.build(
        app=AgentWorks(env=dict(CACHED_ENV)),
        lanes=[m.LaneInput(name="Todo"), m.LaneInput(name="Doing"), m.LaneInput(name="Done")],
    )
    world.card("Second")
    return world


def cached(world: World, aggregate_id: Any) -> Any:
    cache = world.app.repository.cache
    assert cache is not None
    return cache.get(aggregate_id)


def snapshot(world: World) -> dict[Any, dict[str, Any]]:
    """A deep copy of the state of every cached aggregate of the world."""
    ids = (world.workspace_id, world.project_id, world.card_id)
    for aggregate_id in ids:
        world.app.repository.get(aggregate_id)  # into the cache, fast-forwarded
    return {i: copy.deepcopy(state_of(cached(world, i))) for i in ids}


def reconstructed(world: World, aggregate_id: Any) -> dict[str, Any]:
    """The aggregate as its stored events alone make it, bypassing the cache."""
    # A load at a given version never reads the cache.
    version = cached(world, aggregate_id).version
    return state_of(world.app.repository.get(aggregate_id, version=version))


def test_a_command_that_fails_after_changing_its_aggregates_leaves_the_cache_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = cached_world()
    before = snapshot(world)

    def unavailable(*args: object, **kwargs: object) -> None:
        raise Unavailable("the store is down")

    # The move changes the card and the project's placements, then its save fails.
    monkeypatch.setattr(world.app.recorder, "insert_events", unavailable)
    with pytest.raises(Unavailable):
        world.app.move_card(m.MoveCard(card_id=world.card_id, to_lane="Doing"), world.owner)
    with pytest.raises(Unavailable):
        world.app.update_card(
            m.UpdateCard(card_id=world.card_id, title="Renamed", labels=["bug", "ui"]), world.owner
        )
    with pytest.raises(Unavailable):
        world.app.add_lane(
            m.AddLane(project_id=world.project_id, name="Review", wip_limit=3), world.owner
        )
    monkeypatch.undo()

    assert snapshot(world) == before
    # And the cache goes on following the store once writes succeed again.
    world.app.move_card(m.MoveCard(card_id=world.card_id, to_lane="Done"), world.owner)
    for aggregate_id in before:
        world.app.repository.get(aggregate_id)
        assert state_of(cached(world, aggregate_id)) == reconstructed(world, aggregate_id)


def test_a_command_refused_after_changing_its_aggregate_leaves_the_cache_as_it_was() -> None:
    world = cached_world()
    before = snapshot(world)
    # The title and the first label are applied to the copy before the second label is refused.
    update = m.UpdateCard(card_id=world.card_id, title="Renamed", labels=["a", "z" * 1000])
    with pytest.raises(ValidationFailed, match="label"):
        world.app.update_card(update, world.owner)
    assert snapshot(world) == before


def test_a_commands_copy_shares_no_container_with_the_cached_aggregate() -> None:
    world = cached_world()
    world.app.repository.get(world.project_id)
    original: Project = cached(world, world.project_id)
    copied = copy.deepcopy(original)
    assert state_of(copied) == state_of(original)
    for name, value in vars(original).items():
        if isinstance(value, dict | list | set):
            assert vars(copied)[name] is not value, f"{name} is shared with the cache"
