"""Stored events that today's code cannot read, planted below the API as a bad upgrade would
leave them: one under a topic that no longer resolves (its class renamed), or, with
``broken_json``, one whose state is not JSON (its row then names no workspace either); or one
that decodes and that its aggregate's ``apply`` refuses (:func:`plant_unappliable`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from domain.card import Card

if TYPE_CHECKING:
    from uuid import UUID

    from commands.handlers import AgentWorks

#: The stored type of the planted event whose class "was renamed".
RENAMED = "Card.Relabelled"


def plant_undecodable(
    app: AgentWorks, card_id: UUID, *, broken_json: bool = False, then_good: bool = True
) -> int:
    """Append to ``card_id`` an undecodable event, then (``then_good``) a good one after it (a
    label ``"after"``: the write side cannot load the card past the first, so it cannot write
    that one itself). Returns the undecodable event's version."""
    (stored,) = app.recorder.select_events(card_id, desc=True, limit=1)
    last = app.mapper.to_domain_event(stored)
    bad_version = last.originator_version + 1

    def labelled(version: int, label: str) -> Any:
        return app.mapper.to_stored_event(
            Card.Labelled(
                originator_id=card_id,
                originator_version=version,
                timestamp=datetime.now(UTC),
                meta=dict(last.meta),  # type: ignore[attr-defined]
                label=label,
            )
        )

    good = labelled(bad_version, "planted")
    bad = type(good)(
        originator_id=good.originator_id,
        originator_version=good.originator_version,
        topic=good.topic if broken_json else good.topic.replace("Labelled", "Relabelled"),
        state=b'{"label": "planted", "timest' if broken_json else good.state,
    )
    app.recorder.insert_events([bad])
    if then_good:
        app.recorder.insert_events([labelled(bad_version + 1, "after")])
    return bad_version


def plant_renamed(app: AgentWorks, aggregate_id: UUID) -> int:
    """Append to any aggregate a copy of its last stored event under a class name that no longer
    resolves, as its next version; returns that version."""
    (last,) = app.recorder.select_events(aggregate_id, desc=True, limit=1)
    module, _, qualname = last.topic.partition(":")
    app.recorder.insert_events(
        [
            type(last)(
                originator_id=last.originator_id,
                originator_version=last.originator_version + 1,
                topic=f"{module}:{qualname}Retired",
                state=last.state,
            )
        ]
    )
    return int(last.originator_version) + 1


def plant_unappliable(
    app: AgentWorks,
    aggregate_id: UUID,
    event_class: Any,
    *,
    like: UUID | None = None,
    drop: str = "",
    **fields: Any,
) -> int:
    """Append to any aggregate an ``event_class`` event with ``fields`` as its next version (its
    first when it has none), with the metadata of the last event of ``like`` (by default its
    own), as an older writer or a hand repair leaves one: it decodes, and today's ``apply``
    refuses it (a value it no longer knows; with ``drop``, that attribute left out of the stored
    state). Returns its version."""
    (last,) = app.recorder.select_events(like or aggregate_id, desc=True, limit=1)
    meta = dict(app.mapper.to_domain_event(last).meta)  # type: ignore[attr-defined]
    mine = app.recorder.select_events(aggregate_id, desc=True, limit=1)
    version = mine[0].originator_version + 1 if mine else 1
    stored = app.mapper.to_stored_event(
        event_class(
            originator_id=aggregate_id,
            originator_version=version,
            timestamp=datetime.now(UTC),
            meta=meta,
            **fields,
        )
    )
    if drop:
        state = json.loads(stored.state)
        del state[drop]
        stored = type(stored)(
            originator_id=stored.originator_id,
            originator_version=stored.originator_version,
            topic=stored.topic,
            state=json.dumps(state).encode(),
        )
    app.recorder.insert_events([stored])
    return int(version)
