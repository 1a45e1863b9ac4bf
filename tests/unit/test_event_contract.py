"""The event contract (domain/events.py) is the aggregates' events, and every projector decides
about each of them.

A payload class per domain event, with the event's fields; a projector handles only events of
the contract, and handles or explicitly ignores every one of them, so a new event cannot slip
past a read model unnoticed.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
from eventsourcing.domain import Aggregate

from domain.envelope import TOPIC_BY_AGGREGATE
from domain.events import PAYLOAD_TYPES, CardMoved, EventPayload, UnlistedEvent, payload_of
from projections.base import Projector
from projections.registry import ALL_PROJECTORS

DOMAIN = Path(__file__).resolve().parents[2] / "domain"
_BASE_FIELDS = {"originator_id", "originator_version", "timestamp", "meta", "originator_topic"}


def _domain_events() -> dict[str, type[Aggregate.Event]]:
    """Every event class an aggregate in domain/ defines in its body, by its wire name."""
    found: dict[str, type[Aggregate.Event]] = {}
    for path in sorted(DOMAIN.glob("*.py")):
        module = importlib.import_module(f"domain.{path.stem}")
        for node in ast.parse(path.read_text()).body:
            aggregate = getattr(module, node.name, None) if isinstance(node, ast.ClassDef) else None
            if not (inspect.isclass(aggregate) and issubclass(aggregate, Aggregate)):
                continue
            if aggregate.__subclasses__():
                continue  # a base (TenantAggregate): its events are its subclasses'
            assert isinstance(node, ast.ClassDef)
            for inner in node.body:
                if isinstance(inner, ast.ClassDef) and inner.name != "Event":
                    event = getattr(aggregate, inner.name)
                    found[event.__qualname__] = event
    return found


DOMAIN_EVENTS = _domain_events()


#: How the JSON payload carries a type an aggregate's event annotates (the envelope's
#: ``json_safe``): ids, money and times as text.
_ON_THE_WIRE = {"UUID": "IdText", "Decimal": "str", "datetime": "str", "date": "str"}


def _fields(event_class: type) -> dict[str, str]:
    """Field name → annotation (as written, both sides use postponed annotations), the way the
    JSON payload carries it."""
    fields: dict[str, str] = {}
    for klass in reversed(event_class.__mro__):
        for name, annotation in getattr(klass, "__annotations__", {}).items():
            text = str(annotation)
            if name in _BASE_FIELDS or text.startswith("ClassVar"):
                continue
            fields[name] = re.sub(r"\w+", lambda m: _ON_THE_WIRE.get(m[0], m[0]), text)
    return fields


def test_every_domain_event_has_one_payload_class_and_no_other() -> None:
    assert sorted(PAYLOAD_TYPES) == sorted(DOMAIN_EVENTS)


@pytest.mark.parametrize("event_type", sorted(DOMAIN_EVENTS))
def test_a_payload_class_has_its_events_fields_as_the_json_carries_them(event_type: str) -> None:
    assert _fields(PAYLOAD_TYPES[event_type]) == _fields(DOMAIN_EVENTS[event_type])


@pytest.mark.parametrize("projector", ALL_PROJECTORS, ids=lambda p: p.name)
def test_a_projector_handles_only_events_of_the_contract(projector: type[Projector]) -> None:
    contract = set(PAYLOAD_TYPES.values())
    assert projector.handles <= contract
    assert projector.ignores <= contract
    assert {event.aggregate for event in projector.handles} <= projector.aggregates


@pytest.mark.parametrize("projector", ALL_PROJECTORS, ids=lambda p: p.name)
def test_a_projector_handles_or_ignores_every_domain_event_and_not_both(
    projector: type[Projector],
) -> None:
    handled, ignored = projector.handles, projector.ignores
    assert not handled & ignored, sorted(kind.event_type for kind in handled & ignored)
    undecided = set(PAYLOAD_TYPES.values()) - handled - ignored
    assert not undecided, sorted(kind.event_type for kind in undecided)


@pytest.mark.parametrize("projector", ALL_PROJECTORS, ids=lambda p: p.name)
def test_every_aggregate_a_projector_follows_has_a_kafka_topic(projector: type[Projector]) -> None:
    """A worker subscribes to its aggregates' topics (``streams.worker.projector_topics``): one
    without a topic would go to ``other-events``, which no worker reads, and fail its start."""
    assert projector.aggregates <= set(TOPIC_BY_AGGREGATE)


def test_a_payload_is_a_read_only_view_of_the_json() -> None:
    payload = {"from_lane": "Todo", "to_lane": "Doing", "position": "a0"}
    moved = payload_of("Card.Moved", payload)
    assert isinstance(moved, CardMoved)
    assert (moved.from_lane, moved.to_lane, moved.position) == ("Todo", "Doing", "a0")
    with pytest.raises(AttributeError):
        moved.to_lane = "Done"
    assert moved == payload_of("Card.Moved", dict(payload))
    assert moved != payload_of("Card.Restored", payload)


def test_an_event_type_outside_the_contract_is_no_projectors_business() -> None:
    unknown = payload_of("Card.Teleported", {"to": "Mars"})
    assert type(unknown) is UnlistedEvent
    assert isinstance(unknown, EventPayload)
    for projector in ALL_PROJECTORS:
        assert UnlistedEvent not in projector.handles
