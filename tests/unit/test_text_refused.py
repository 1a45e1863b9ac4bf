"""Text PostgreSQL cannot hold (NUL, lone surrogates) is refused everywhere it can come in:
the text rule itself, every command, the aggregates recording events, cursors and tokens."""

from __future__ import annotations

import base64
import json
import re
import typing
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import pydantic
import pytest
import strawberry
from aw_builders import World, meta
from hypothesis import example, given, settings
from hypothesis import strategies as st

from commands import models as m
from domain.card import Card
from domain.errors import ValidationFailed
from domain.meta import EventMeta
from domain.roles import Role
from domain.text import find_unstorable, refuse_unstorable, storable_text, text_problem
from domain.workspace import Workspace
from read_api import cursors
from read_api.consistency import ConsistencyToken
from read_api.errors import describe_validation_error
from read_api.input_checks import StorableTextOnly

#: Every character PostgreSQL text can hold: anything but NUL and the surrogate block.
storable = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))
poison = st.sampled_from(["\x00", "\ud800", "\udfff", "\udc80"])


@st.composite
def unstorable(draw: st.DrawFn) -> str:
    """A storable text with one NUL or lone surrogate put in somewhere."""
    text = draw(storable)
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(poison) + text[at:]


class TestTheRule:
    @given(storable)
    def test_any_text_without_nul_or_surrogates_passes_unchanged(self, text: str) -> None:
        assert text_problem(text) is None
        assert storable_text(text, what="name") is text
        # What passes can really be stored: it is UTF-8 and has no NUL.
        assert b"\x00" not in text.encode("utf-8")

    @given(unstorable())
    def test_any_text_with_nul_or_a_lone_surrogate_is_refused_naming_the_field(
        self, text: str
    ) -> None:
        with pytest.raises(ValidationFailed, match=r"^reason (must not contain NUL|must be valid)"):
            storable_text(text, what="reason")

    @given(st.recursive(storable, lambda inner: st.lists(inner) | st.dictionaries(storable, inner)))
    def test_nested_storable_values_have_nothing_to_report(self, value: Any) -> None:
        assert find_unstorable(value) is None

    def test_the_path_names_where_in_a_nested_value(self) -> None:
        value = {"input": {"lanes": [{"name": "ok"}, {"name": "b\x00d"}]}}
        assert find_unstorable(value) == (
            "input.lanes.1.name",
            "must not contain NUL (U+0000); found at character 1",
        )
        assert find_unstorable({"k\ud800": "v"}) is not None

    @pytest.mark.parametrize(
        ("name", "said"),
        [("a\x00", "'a\\x00'"), ("\ud800", "'\\ud800'")],
        ids=["nul", "surrogate"],
    )
    def test_a_key_is_named_by_itself_not_by_a_path_that_does_not_exist(
        self, name: str, said: str
    ) -> None:
        """A top-level key is no path at all; the key itself, escaped, is what was wrong."""
        path, problem = find_unstorable({name: "v"}) or ("", "")
        assert path == ""
        assert problem.startswith(f"key {said} must "), problem
        with pytest.raises(ValidationFailed, match=rf"^Card\.Blocked key {re.escape(said)} must "):
            refuse_unstorable({name: "v"}, what="Card.Blocked")
        # Nested keys read as before: the place holding the key, then the key.
        assert find_unstorable({"input": {"lanes": {name: 1}}}) == (
            "input.lanes",
            f"key {said} {text_problem(name)}",
        )

    @pytest.mark.parametrize("name", ["a\x00", "a\ud800"], ids=["nul", "surrogate"])
    def test_a_graphql_variable_whose_name_cannot_be_stored_is_refused_naming_that_name(
        self, name: str
    ) -> None:
        @strawberry.type
        class Query:
            @strawberry.field
            def echo(self, text: str) -> str:
                return text

        schema = strawberry.Schema(query=Query, extensions=[StorableTextOnly])
        result = schema.execute_sync(
            "query($a: String!) { echo(text: $a) }", variable_values={"a": "x", name: "y"}
        )
        assert result.errors is not None
        [error] = result.errors
        assert error.extensions == {"code": "VALIDATION"}
        assert error.message.startswith(f"variable name {name!r} must "), error.message


def _str_fields(model: type[pydantic.BaseModel]) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        if "str" in str(info.annotation):
            names.append(name)
    return names


class TestCommands:
    @pytest.mark.parametrize(
        ("build", "field"),
        [
            (lambda t: m.BlockCard(card_id=uuid4(), reason=t), "reason"),
            (lambda t: m.UpdateCard(card_id=uuid4(), labels=["fine", t]), "labels"),
            (lambda t: m.UpdateCard(card_id=uuid4(), title=t), "title"),
            (lambda t: m.AssignCard(card_id=uuid4(), assignee=t), "assignee"),
            (lambda t: m.StartAgentRun(card_id=uuid4(), agent=t), "agent"),
            (lambda t: m.StartAgentRun(card_id=uuid4(), agent="coder", model=t), "model"),
            (lambda t: m.AddMember(workspace_id=uuid4(), user_id=t, role="MEMBER"), "userId"),
            (lambda t: m.CreateWorkspace(name=t), "name"),
            (
                lambda t: m.CreateProject(workspace_id=uuid4(), name="P", lanes=[{"name": t}]),
                "lanes.0.name",
            ),
            (lambda t: m.ReorderLanes(project_id=uuid4(), order=["a", t]), "order"),
            (
                lambda t: m.AppendRunLog(
                    run_id=uuid4(), lines=[{"at": "2025-01-01T00:00:00Z", "stream": t}]
                ),
                "lines.0.stream",
            ),
            (lambda t: m.BeginRun(run_id=uuid4(), worker=t), "worker"),
        ],
    )
    @settings(max_examples=25)
    @given(text=unstorable())
    # Longer than some fields allow, too: refused for its length, still naming the field.
    @example(text="x" * 150 + "\x00")
    @example(text="x" * 250 + "\ud800")
    def test_every_kind_of_text_field_refuses_unstorable_text(
        self, build: Any, field: str, text: str
    ) -> None:
        with pytest.raises(pydantic.ValidationError) as caught:
            build(text)
        message = describe_validation_error(caught.value)
        assert message.startswith(f"invalid input: {field}: "), message
        limit = re.search(r"should have at most (\d+) characters", message)
        if limit is not None:
            # Longer than the field allows as well: pydantic-core checks the length first, and
            # that refusal (naming the field) is as true as the other.
            assert len(text) > int(limit.group(1)), message
            return
        # Constrained fields (max_length) meet pydantic-core's own UTF-8 check first.
        assert any(word in message for word in ("NUL", "surrogate", "unicode string")), message

    @settings(max_examples=50)
    @given(text=storable.filter(lambda t: t.strip() and len(t) <= 200))
    def test_storable_text_reaches_the_command_unchanged(self, text: str) -> None:
        command = m.UpdateCard(card_id=uuid4(), title=text, labels=[text])
        assert command.title == text
        assert command.labels == [text]

    @given(text=unstorable())
    def test_tool_output_is_kept_with_replacement_characters_not_refused(self, text: str) -> None:
        """Run logs and a run's error are what tools and models printed: worth keeping."""
        line = m.LogLineInput(at="2025-01-01T00:00:00Z", text=text)
        assert text_problem(line.text) is None
        assert "\ufffd" in line.text
        assert len(line.text) == len(text)
        finished = m.FinishRun(run_id=uuid4(), outcome="FAILED", error=text)
        assert finished.error == line.text

    def test_no_model_a_command_nests_escapes_the_check(self) -> None:
        """Every command and every model nested in one derives from ``Input``, so a text field
        added later is checked without anyone remembering to."""
        seen: set[type[pydantic.BaseModel]] = set()

        def visit(model: type[pydantic.BaseModel]) -> None:
            seen.add(model)
            for info in model.model_fields.values():
                for part in _types_in(info.annotation):
                    if isinstance(part, type) and issubclass(part, pydantic.BaseModel):
                        assert issubclass(part, m.Input), part
                        if part not in seen:
                            visit(part)

        commands = [c for c in vars(m).values() if isinstance(c, type) and issubclass(c, m.Command)]
        assert len(commands) > 25
        for command in commands:
            visit(command)
        assert m.LaneInput in seen
        assert m.LogLineInput in seen
        assert any(_str_fields(c) for c in seen)


def _types_in(annotation: Any) -> list[Any]:
    found = [annotation]
    for arg in typing.get_args(annotation):
        found.extend(_types_in(arg))
    return found


class TestAggregatesRefuseToRecordIt:
    """The last gate: whatever reaches an aggregate, an event holding such text is not recorded."""

    @pytest.mark.parametrize(
        ("record", "refusal"),
        [
            (
                lambda card, mt: card.block("a\x00b", meta=mt),
                r"Card\.Blocked\.reason must not contain NUL",
            ),
            (
                lambda card, mt: card.label("x\ud800", meta=mt),
                r"Card\.Labelled\.label must be valid Unicode",
            ),
        ],
        ids=["nul-in-a-block-reason", "lone-surrogate-in-a-label"],
    )
    def test_a_card_records_no_event_holding_such_text(
        self, record: Callable[[Card, EventMeta], object], refusal: str
    ) -> None:
        world = World.build()
        card: Card = world.get(world.card_id)
        with pytest.raises(ValidationFailed, match=refusal):
            record(card, meta(world.workspace_id))
        assert not card.pending_events

    def test_an_actor_with_a_nul_is_not_recorded_in_the_metadata(self) -> None:
        world = World.build()
        card: Card = world.get(world.card_id)
        with pytest.raises(ValidationFailed, match=r"meta\.actor must not contain NUL"):
            card.label("ok", meta=meta(world.workspace_id, actor="u\x00"))

    def test_a_workspace_is_not_created_for_an_owner_with_a_nul(self) -> None:
        workspace_id = uuid4()
        with pytest.raises(ValidationFailed, match=r"Workspace\.Created\.owner_id"):
            Workspace.create(
                workspace_id=workspace_id, name="Acme", owner_id="o\x00", meta=meta(workspace_id)
            )

    def test_the_write_side_appends_nothing_when_a_command_built_without_checks_holds_it(
        self,
    ) -> None:
        world = World.build()
        # model_construct skips validation, as a caller bypassing the command models would.
        command = m.BlockCard.model_construct(card_id=world.card_id, reason="a\x00b")
        world.refuses(ValidationFailed, world.app.block_card, command)


class TestAssignCard:
    def test_assigning_a_member_works(self) -> None:
        world = World.build()
        bob = str(uuid4())
        world.member(bob, Role.MEMBER)
        result = world.app.assign_card(
            m.AssignCard(card_id=world.card_id, assignee=bob), world.owner
        )
        assert world.get(world.card_id).assignee == bob
        assert result.version == 2

    def test_assigning_someone_who_is_not_a_member_is_refused(self) -> None:
        world = World.build()
        stranger = str(uuid4())
        error = world.refuses(
            ValidationFailed,
            world.app.assign_card,
            m.AssignCard(card_id=world.card_id, assignee=stranger),
        )
        assert stranger in error.message
        assert "not a member" in error.message

    def test_a_member_of_another_workspace_is_not_a_member_here(self) -> None:
        world = World.build()
        other = World.build(app=world.app, owner="mallory")
        world.refuses(
            ValidationFailed,
            world.app.assign_card,
            m.AssignCard(card_id=world.card_id, assignee="mallory"),
        )
        assert other.get(other.workspace_id).role_of("mallory") is not None


def _cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


#: Any card or run id: parameters are the same in every collection (pytest-xdist compares them).
_SOME_ID = "5f0c6c1e-8f56-4a8e-9a53-2d1d2f1e7b10"


class TestForgedCursors:
    @pytest.mark.parametrize(
        ("cursor", "parse"),
        [
            (_cursor("card", "a\x00", _SOME_ID), cursors.parse_card_cursor),
            (_cursor("card", "\ud800", _SOME_ID), cursors.parse_card_cursor),
            (_cursor("activity", 10**30), cursors.parse_activity_cursor),
            (_cursor("activity", -1), cursors.parse_activity_cursor),
            (_cursor("activity", 2**63), cursors.parse_activity_cursor),
            (_cursor("run", "2025-01-01T00:00:00\x00", _SOME_ID), cursors.parse_run_cursor),
            (base64.urlsafe_b64encode(b"\xff\xfe").decode(), cursors.parse_activity_cursor),
        ],
    )
    def test_a_cursor_that_decodes_to_what_sql_cannot_take_is_validation(
        self, cursor: str, parse: Any
    ) -> None:
        with pytest.raises(ValidationFailed):
            parse(cursor)

    @given(st.integers(0, 2**63 - 1))
    def test_every_position_a_bigint_holds_round_trips(self, position: int) -> None:
        assert cursors.parse_activity_cursor(cursors.activity_cursor(position)) == position

    @given(st.integers(min_value=2**63))
    def test_a_consistency_token_beyond_bigint_is_validation(self, big: int) -> None:
        with pytest.raises(ValidationFailed):
            ConsistencyToken.parse(f"{big}:{uuid4()}:1")
        with pytest.raises(ValidationFailed):
            ConsistencyToken.parse(f"1:{uuid4()}:{big}")
