"""Card snapshots are taken from the card just saved, not replayed from the store: they must be
exactly the snapshots the library's replay would take."""

from __future__ import annotations

from typing import Any

from aw_builders import World

from commands import models as m
from domain.card import Card


def test_a_snapshot_taken_from_the_saved_card_is_the_replayed_one() -> None:
    world = World.build()
    app = world.app
    replays: list[int] = []
    get = app.repository.get

    def counted_get(aggregate_id: Any, version: int | None = None, **kwargs: Any) -> Any:
        if version is not None:
            replays.append(version)
        return get(aggregate_id, version=version, **kwargs)

    app.repository.get = counted_get  # type: ignore[method-assign]
    lanes = ["Review", "Done", "In progress"]
    for i in range(230):  # the card's version passes 100 and 200
        app.move_card(m.MoveCard(card_id=world.card_id, to_lane=lanes[i % 3]), world.owner)
    app.repository.get = get  # type: ignore[method-assign]
    assert replays == []  # taken from the card just saved, not replayed from the store
    assert app.snapshots is not None
    stored = list(app.snapshots.get(world.card_id))
    assert [s.originator_version for s in stored] == [100, 200]
    for snapshot in stored:
        replayed = app.repository.get(world.card_id, version=snapshot.originator_version)
        expected = Card.Snapshot.take(replayed)
        assert (snapshot.topic, snapshot.state) == (expected.topic, expected.state)
        assert snapshot.originator_version == replayed.version
