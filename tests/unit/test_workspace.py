"""Workspace rules: members and roles, the plan, the spend limit, the Stripe link."""

from __future__ import annotations

from decimal import Decimal
from functools import partial
from uuid import uuid4

import pytest
from aw_builders import collect, meta

from domain.errors import Duplicate, InvalidTransition, NotFound, ValidationFailed
from domain.meta import EventMeta
from domain.money import (
    DEFAULT_BILLING_INCREMENT_MICROS,
    DEFAULT_MARKUP,
    MAX_MARKUP,
    parse_markup,
)
from domain.roles import Role
from domain.workspace import MAX_NAME_LENGTH, Workspace


def make_workspace(owner: str = "alice") -> Workspace:
    workspace_id = uuid4()
    workspace = Workspace.create(
        workspace_id=workspace_id, name="  Acme  ", owner_id=owner, meta=meta(workspace_id)
    )
    collect(workspace)
    return workspace


def m(workspace: Workspace) -> EventMeta:
    return meta(workspace.id)


# -- creation -----------------------------------------------------------------------------------


def test_new_workspace_has_its_creator_as_only_owner_and_default_plan() -> None:
    workspace = make_workspace("alice")
    assert workspace.members == {"alice": Role.OWNER}
    assert workspace.workspace_id == workspace.id
    assert workspace.name == "Acme"
    assert workspace.markup == DEFAULT_MARKUP
    assert workspace.billing_increment_micros == DEFAULT_BILLING_INCREMENT_MICROS
    assert workspace.monthly_limit_micros is None
    assert workspace.stripe_customer_id is None


def test_created_event_carries_the_command_metadata() -> None:
    workspace_id = uuid4()
    event_meta = meta(workspace_id, actor="alice")
    workspace = Workspace.create(
        workspace_id=workspace_id, name="Acme", owner_id="alice", meta=event_meta
    )
    (created,) = collect(workspace)
    assert created.meta == event_meta.as_dict()
    assert created.meta["workspace_id"] == str(workspace_id)
    assert created.meta["actor"] == "alice"


@pytest.mark.parametrize("name", ["", "   ", "x" * (MAX_NAME_LENGTH + 1)])
def test_blank_or_overlong_workspace_name_is_refused(name: str) -> None:
    workspace_id = uuid4()
    with pytest.raises(ValidationFailed, match="workspace name"):
        Workspace.create(
            workspace_id=workspace_id, name=name, owner_id="a", meta=meta(workspace_id)
        )


@pytest.mark.parametrize("owner", ["", "  ", "u" * 201])
def test_blank_or_overlong_owner_id_is_refused(owner: str) -> None:
    workspace_id = uuid4()
    with pytest.raises(ValidationFailed, match="user id"):
        Workspace.create(
            workspace_id=workspace_id, name="A", owner_id=owner, meta=meta(workspace_id)
        )


# -- rename ---------------------------------------------------------------------------------------


def test_rename_records_the_trimmed_name() -> None:
    workspace = make_workspace()
    workspace.rename("  Beta ", meta=m(workspace))
    (event,) = collect(workspace)
    assert isinstance(event, Workspace.Renamed)
    assert workspace.name == "Beta"


def test_rename_to_the_same_name_records_nothing() -> None:
    workspace = make_workspace()
    workspace.rename(" Acme ", meta=m(workspace))
    assert collect(workspace) == []


# -- members --------------------------------------------------------------------------------------


def test_add_member_records_user_and_role() -> None:
    workspace = make_workspace()
    workspace.add_member(" bob ", Role.MEMBER, meta=m(workspace))
    (event,) = collect(workspace)
    assert isinstance(event, Workspace.MemberAdded)
    assert (event.user_id, event.role) == ("bob", "MEMBER")
    assert workspace.role_of("bob") is Role.MEMBER


def test_adding_an_existing_member_is_refused_as_duplicate() -> None:
    workspace = make_workspace()
    workspace.add_member("bob", Role.MEMBER, meta=m(workspace))
    collect(workspace)
    with pytest.raises(Duplicate, match="bob") as caught:
        workspace.add_member("bob", Role.ADMIN, meta=m(workspace))
    assert str(workspace.id) in caught.value.message
    assert workspace.role_of("bob") is Role.MEMBER
    assert collect(workspace) == []


def test_adding_the_owner_again_with_padding_is_still_a_duplicate() -> None:
    workspace = make_workspace("alice")
    with pytest.raises(Duplicate, match="alice"):
        workspace.add_member("  alice ", Role.VIEWER, meta=m(workspace))


def test_change_role_records_the_new_role() -> None:
    workspace = make_workspace()
    workspace.add_member("bob", Role.VIEWER, meta=m(workspace))
    workspace.change_role("bob", Role.ADMIN, meta=m(workspace))
    events = collect(workspace)
    assert isinstance(events[-1], Workspace.RoleChanged)
    assert workspace.role_of("bob") is Role.ADMIN


def test_change_role_to_the_current_role_records_nothing() -> None:
    workspace = make_workspace()
    workspace.add_member("bob", Role.MEMBER, meta=m(workspace))
    collect(workspace)
    workspace.change_role("bob", Role.MEMBER, meta=m(workspace))
    assert collect(workspace) == []


def test_change_role_of_a_non_member_is_not_found() -> None:
    workspace = make_workspace()
    with pytest.raises(NotFound, match="carol") as caught:
        workspace.change_role("carol", Role.ADMIN, meta=m(workspace))
    assert str(workspace.id) in caught.value.message


def test_remove_non_member_is_not_found() -> None:
    workspace = make_workspace()
    with pytest.raises(NotFound, match="carol"):
        workspace.remove_member("carol", meta=m(workspace))


@pytest.mark.parametrize(
    "demoted_to", [Role.ADMIN, Role.MEMBER, Role.VIEWER, pytest.param(None, id="removed")]
)
def test_the_last_owner_can_be_neither_demoted_nor_removed(demoted_to: Role | None) -> None:
    workspace = make_workspace("alice")
    workspace.add_member("bob", Role.ADMIN, meta=m(workspace))
    collect(workspace)
    leave = (
        partial(workspace.remove_member, "alice")
        if demoted_to is None
        else partial(workspace.change_role, "alice", demoted_to)
    )
    with pytest.raises(InvalidTransition, match="alice") as caught:
        leave(meta=m(workspace))
    assert "last OWNER" in caught.value.message
    assert str(workspace.id) in caught.value.message
    assert workspace.members == {"alice": Role.OWNER, "bob": Role.ADMIN}
    assert collect(workspace) == []


def test_an_owner_can_be_demoted_when_another_owner_remains() -> None:
    workspace = make_workspace("alice")
    workspace.add_member("bob", Role.OWNER, meta=m(workspace))
    workspace.change_role("alice", Role.MEMBER, meta=m(workspace))
    assert workspace.role_of("alice") is Role.MEMBER
    # bob is now the last owner and is protected in turn
    with pytest.raises(InvalidTransition, match="bob"):
        workspace.remove_member("bob", meta=m(workspace))


def test_an_owner_can_be_removed_when_another_owner_remains() -> None:
    workspace = make_workspace("alice")
    workspace.add_member("bob", Role.OWNER, meta=m(workspace))
    workspace.remove_member("alice", meta=m(workspace))
    assert workspace.members == {"bob": Role.OWNER}
    assert isinstance(collect(workspace)[-1], Workspace.MemberRemoved)


def test_removing_a_member_forgets_their_role() -> None:
    workspace = make_workspace()
    workspace.add_member("bob", Role.MEMBER, meta=m(workspace))
    workspace.remove_member("bob", meta=m(workspace))
    assert workspace.role_of("bob") is None


# -- plan -----------------------------------------------------------------------------------------


def test_set_plan_records_markup_as_text_and_increment_as_int() -> None:
    workspace = make_workspace()
    workspace.set_plan(markup=Decimal("1.5"), billing_increment_micros=10_000, meta=m(workspace))
    (event,) = collect(workspace)
    assert event.markup == "1.5"
    assert event.billing_increment_micros == 10_000
    assert workspace.markup == Decimal("1.5")
    assert workspace.billing_increment_micros == 10_000


@pytest.mark.parametrize("markup", [Decimal(0), Decimal("-1")])
def test_non_positive_markup_is_refused(markup: Decimal) -> None:
    workspace = make_workspace()
    with pytest.raises(ValidationFailed, match=str(markup)):
        workspace.set_plan(markup=markup, billing_increment_micros=1, meta=m(workspace))
    assert workspace.markup == DEFAULT_MARKUP


@pytest.mark.parametrize("increment", [0, -250_000])
def test_non_positive_billing_increment_is_refused(increment: int) -> None:
    workspace = make_workspace()
    with pytest.raises(ValidationFailed, match="billing increment"):
        workspace.set_plan(markup=Decimal(2), billing_increment_micros=increment, meta=m(workspace))


@pytest.mark.parametrize("markup", ["9" * 23, "9" * 33 + ".5", "1E+38", "1000.000001"])
def test_a_markup_of_many_digits_is_refused_not_crashed_on(markup: str) -> None:
    """``parse_markup`` takes up to 40 characters; the check of six decimals used the default
    decimal context (28 digits) and raised InvalidOperation (INTERNAL) past 22 digits. Such a
    markup was then taken, and billed amounts past what the read models store (a bigint of
    micro-USD): those charges were set aside, never shown or invoiced. Past 1000 times it is
    refused."""
    workspace = make_workspace()
    with pytest.raises(ValidationFailed, match="at most 1000"):
        workspace.set_plan(
            markup=Decimal(markup), billing_increment_micros=250_000, meta=m(workspace)
        )
    assert workspace.markup == DEFAULT_MARKUP
    assert collect(workspace) == []
    workspace.set_plan(markup=MAX_MARKUP, billing_increment_micros=250_000, meta=m(workspace))
    assert workspace.markup == MAX_MARKUP


@pytest.mark.parametrize("markup", ["Infinity", "-Infinity", "1.0000001", "NaN", "sNaN"])
def test_markup_that_billing_cannot_use_is_refused(markup: str) -> None:
    workspace = make_workspace()
    with pytest.raises(ValidationFailed, match=markup.lstrip("-s")):
        workspace.set_plan(markup=Decimal(markup), billing_increment_micros=1, meta=m(workspace))
    assert workspace.markup == DEFAULT_MARKUP
    assert collect(workspace) == []


@pytest.mark.parametrize(
    "markup",
    [
        "0.000001",
        "1.5",
        "5",
        "1000",
        "1.0000000",
        "2.50000000",
    ],
)
def test_markup_billing_can_use_exactly_is_accepted(markup: str) -> None:
    """Any markup parse_markup accepts (zeros past six decimals included) is a valid plan."""
    assert parse_markup(markup) == Decimal(markup)
    workspace = make_workspace()
    workspace.set_plan(markup=parse_markup(markup), billing_increment_micros=1, meta=m(workspace))
    assert workspace.markup == Decimal(markup)


# -- spend limit ------------------------------------------------------------------------------


def test_negative_spend_limit_is_refused_and_names_the_amount() -> None:
    workspace = make_workspace()
    with pytest.raises(ValidationFailed, match=r"-0\.000001"):
        workspace.set_spend_limit(-1, meta=m(workspace))
    assert workspace.monthly_limit_micros is None
    assert collect(workspace) == []


@pytest.mark.parametrize("limit", [0, 1, 250_000_000])
def test_zero_or_positive_spend_limit_is_recorded(limit: int) -> None:
    workspace = make_workspace()
    workspace.set_spend_limit(limit, meta=m(workspace))
    (event,) = collect(workspace)
    assert event.monthly_limit_micros == limit
    assert workspace.monthly_limit_micros == limit


def test_clearing_the_spend_limit_records_none() -> None:
    workspace = make_workspace()
    workspace.set_spend_limit(5, meta=m(workspace))
    workspace.set_spend_limit(None, meta=m(workspace))
    assert workspace.monthly_limit_micros is None
    assert len(collect(workspace)) == 2


def test_setting_the_same_spend_limit_records_nothing() -> None:
    workspace = make_workspace()
    workspace.set_spend_limit(None, meta=m(workspace))
    workspace.set_spend_limit(7, meta=m(workspace))
    workspace.set_spend_limit(7, meta=m(workspace))
    assert len(collect(workspace)) == 1


# -- Stripe ---------------------------------------------------------------------------------------


def test_linking_a_stripe_customer_records_it_once() -> None:
    workspace = make_workspace()
    workspace.link_stripe_customer("cus_1", meta=m(workspace))
    workspace.link_stripe_customer("cus_1", meta=m(workspace))
    assert workspace.stripe_customer_id == "cus_1"
    assert len(collect(workspace)) == 1


def test_relinking_to_another_stripe_customer_is_refused() -> None:
    workspace = make_workspace()
    workspace.link_stripe_customer("cus_1", meta=m(workspace))
    with pytest.raises(InvalidTransition, match="cus_1") as caught:
        workspace.link_stripe_customer("cus_2", meta=m(workspace))
    assert str(workspace.id) in caught.value.message
    assert workspace.stripe_customer_id == "cus_1"


def test_blank_stripe_customer_id_is_refused() -> None:
    workspace = make_workspace()
    with pytest.raises(ValidationFailed, match="Stripe customer id"):
        workspace.link_stripe_customer("  ", meta=m(workspace))
