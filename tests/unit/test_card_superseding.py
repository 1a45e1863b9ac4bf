"""Of several overwriting card events of one kind, the latest decides the card.

``domain.card.OVERWRITING_EVENTS`` lets a reader of a long history (a board as of an instant)
skip every overwriting event that a later one of its kind follows. Folding what is left must
make the card that folding everything makes, at every point of any history.
"""

from __future__ import annotations

from typing import Any

from aw_builders import meta, new_card
from eventsourcing.domain import Aggregate
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.card import OVERWRITING_EVENTS, Card
from domain.errors import AgentWorksError

_STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "edit",
                "move",
                "respread",
                "assign",
                "label",
                "unlabel",
                "block",
                "unblock",
                "archive",
                "restore",
            ]
        ),
        st.integers(0, 2),
    ),
    max_size=60,
)


def _history(steps: list[tuple[str, int]]) -> list[Aggregate.Event]:
    card = new_card(title="t", description="d")
    m = meta(card.workspace_id)
    lanes, people, labels = ["Todo", "Doing", "Done"], [None, "bob", "carol"], ["bug", "ui", "x"]
    for step, n in steps:
        try:
            if step == "edit":
                card.edit(title=f"t{n}", description=None if n == 2 else f"d{n}", meta=m)
            elif step == "move":
                card.move(lanes[n], f"P{n}", meta=m)
            elif step == "respread":
                card.respread(lanes[n], f"S{n}", meta=m)
            elif step == "assign":
                card.assign(people[n], meta=m)
            elif step == "label":
                card.label(labels[n], meta=m)
            elif step == "unlabel":
                card.unlabel(labels[n], meta=m)
            elif step == "block":
                card.block(f"r{n}", meta=m)
            elif step == "unblock":
                card.unblock(meta=m)
            elif step == "archive":
                card.archive(meta=m)
            else:
                card.restore(lanes[n], f"R{n}", from_lane=None, meta=m)
        except AgentWorksError:
            pass
    return list(card.collect_events())


def _fold(events: list[Aggregate.Event]) -> dict[str, Any]:
    card: Any = None
    for event in events:
        if card is not None and event.originator_version > card.version + 1:
            card.version = event.originator_version - 1  # as projections.history bridges a skip
        card = event.mutate(card)
    return dict(vars(card))


def _skipping(events: list[Aggregate.Event], kinds: tuple[type, ...]) -> list[Aggregate.Event]:
    """The events left when each one of ``kinds`` that a later one of its kind follows goes."""
    last = {type(e): e.originator_version for e in events}
    return [e for e in events if not isinstance(e, kinds) or last[type(e)] == e.originator_version]


@settings(max_examples=150, deadline=None)
@given(_STEPS)
def test_skipping_overwritten_events_folds_the_same_card_at_every_point(
    steps: list[tuple[str, int]],
) -> None:
    history = _history(steps)
    for end in range(1, len(history) + 1):
        upto = history[:end]
        assert _fold(_skipping(upto, OVERWRITING_EVENTS)) == _fold(upto)


def test_every_kind_of_card_event_is_either_overwriting_or_kept() -> None:
    """A new kind of card event needs a decision here (and in the property above)."""
    kinds = {
        value
        for value in vars(Card).values()
        if isinstance(value, type)
        and issubclass(value, Aggregate.Event)
        and value is not Card.Event
    }
    kept = {Card.Created, Card.Labelled, Card.Unlabelled}
    assert kinds == set(OVERWRITING_EVENTS) | kept
    assert not kept & set(OVERWRITING_EVENTS)


def test_the_property_tells_an_event_that_reads_the_card_apart() -> None:
    """Labels build on the card's labels: skipping all but the last ``Labelled`` loses one."""
    history = _history([("label", 0), ("label", 1)])
    assert _fold(_skipping(history, (Card.Labelled,))) != _fold(history)
