"""Workspace: the tenant. Owns members and their roles, the billing plan and the spend limit."""

from __future__ import annotations

from datetime import datetime
from decimal import Context, Decimal
from typing import TYPE_CHECKING
from uuid import UUID

from domain.base import TenantAggregate
from domain.errors import Duplicate, InvalidTransition, MissingPart, ValidationFailed
from domain.meta import EventMeta
from domain.money import (
    DEFAULT_BILLING_INCREMENT_MICROS,
    DEFAULT_MARKUP,
    at_most_max_markup,
    format_usd,
    positive_micros,
)
from domain.roles import Role
from domain.text import trimmed

MAX_NAME_LENGTH = 200
MARKUP_QUANTUM = Decimal("0.000001")


def clean_name(value: str, *, what: str) -> str:
    """Trimmed, non-empty, bounded names: the same rule for workspaces, projects, lanes, cards."""
    name = value.strip()
    if not name:
        raise ValidationFailed(f"{what} must not be empty")
    if "\x00" in name:
        raise ValidationFailed(f"{what} must not contain NUL characters")
    if len(name) > MAX_NAME_LENGTH:
        raise ValidationFailed(f"{what} is {len(name)} characters; at most {MAX_NAME_LENGTH}")
    return name


class Workspace(TenantAggregate):
    """A tenant: its members, plan (markup and billing increment) and monthly spend limit.

    A workspace is its own tenant, so its ``workspace_id`` equals its ``id``.
    """

    if TYPE_CHECKING:
        name: str
        members: dict[str, Role]
        members_since: dict[str, datetime]
        markup: Decimal
        billing_increment_micros: int
        monthly_limit_micros: int | None
        stripe_customer_id: str | None

    class Created(TenantAggregate.Created):
        name: str
        owner_id: str

        def apply(self, aggregate: Workspace) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.name = self.name
            aggregate.members = {self.owner_id: Role.OWNER}
            aggregate.members_since = {self.owner_id: self.timestamp}
            aggregate.markup = DEFAULT_MARKUP
            aggregate.billing_increment_micros = DEFAULT_BILLING_INCREMENT_MICROS
            aggregate.monthly_limit_micros = None
            aggregate.stripe_customer_id = None

    class Renamed(TenantAggregate.Event):
        name: str

        def apply(self, aggregate: Workspace) -> None:
            aggregate.name = self.name

    class MemberAdded(TenantAggregate.Event):
        user_id: str
        role: str

        def apply(self, aggregate: Workspace) -> None:
            aggregate.members[self.user_id] = Role(self.role)
            _since(aggregate)[self.user_id] = self.timestamp

    class RoleChanged(TenantAggregate.Event):
        user_id: str
        role: str

        def apply(self, aggregate: Workspace) -> None:
            aggregate.members[self.user_id] = Role(self.role)

    class MemberRemoved(TenantAggregate.Event):
        user_id: str

        def apply(self, aggregate: Workspace) -> None:
            del aggregate.members[self.user_id]
            _since(aggregate).pop(self.user_id, None)

    class PlanSet(TenantAggregate.Event):
        markup: str
        billing_increment_micros: int

        def apply(self, aggregate: Workspace) -> None:
            aggregate.markup = Decimal(self.markup)
            aggregate.billing_increment_micros = self.billing_increment_micros

    class SpendLimitSet(TenantAggregate.Event):
        monthly_limit_micros: int | None

        def apply(self, aggregate: Workspace) -> None:
            aggregate.monthly_limit_micros = self.monthly_limit_micros

    class StripeCustomerLinked(TenantAggregate.Event):
        customer_id: str

        def apply(self, aggregate: Workspace) -> None:
            aggregate.stripe_customer_id = self.customer_id

    def member_since(self, user_id: str) -> datetime | None:
        """When ``user_id``'s current membership began (None: not a member, or a member since
        before the workspace kept it). What a member made in an earlier membership (an API key)
        is not theirs in this one. (Read without keeping: the aggregate may be the cache's.)"""
        since: dict[str, datetime] = self.__dict__.get("members_since", {})
        return since.get(user_id)

    @classmethod
    def create(cls, *, workspace_id: UUID, name: str, owner_id: str, meta: EventMeta) -> Workspace:
        return cls._create(
            cls.Created,
            id=workspace_id,
            workspace_id=workspace_id,
            name=clean_name(name, what="workspace name"),
            owner_id=_user_id(owner_id),
            meta=meta.as_dict(),
        )

    def role_of(self, user_id: str) -> Role | None:
        return self.members.get(user_id)

    def rename(self, name: str, *, meta: EventMeta) -> None:
        new = clean_name(name, what="workspace name")
        if new != self.name:
            self._record(self.Renamed, meta, name=new)

    def add_member(self, user_id: str, role: Role, *, meta: EventMeta) -> None:
        user_id = _user_id(user_id)
        if user_id in self.members:
            raise Duplicate(
                f"user {user_id} is already a member of workspace {self.id} "
                f"(role {self.members[user_id].value}); use changeRole"
            )
        self._record(self.MemberAdded, meta, user_id=user_id, role=role.value)

    def change_role(self, user_id: str, role: Role, *, meta: EventMeta) -> None:
        user_id = user_id.strip()
        current = self._member(user_id)
        if current is role:
            return
        if current is Role.OWNER:
            self._keep_an_owner(user_id, action="demote")
        self._record(self.RoleChanged, meta, user_id=user_id, role=role.value)

    def remove_member(self, user_id: str, *, meta: EventMeta) -> None:
        user_id = user_id.strip()
        if self._member(user_id) is Role.OWNER:
            self._keep_an_owner(user_id, action="remove")
        self._record(self.MemberRemoved, meta, user_id=user_id)

    def set_plan(self, *, markup: Decimal, billing_increment_micros: int, meta: EventMeta) -> None:
        if (
            not markup.is_finite()
            or markup <= 0
            # A context wide enough for the markup's digits and six decimals: the default one
            # (28 digits) raised InvalidOperation for a markup of 23 digits or more.
            or markup
            != markup.quantize(MARKUP_QUANTUM, context=Context(prec=max(28, markup.adjusted() + 8)))
        ):
            raise ValidationFailed(
                f"markup must be a positive number with at most 6 decimals, got {markup}"
            )
        at_most_max_markup(markup)
        self._record(
            self.PlanSet,
            meta,
            markup=str(markup),
            billing_increment_micros=positive_micros(billing_increment_micros, "billing increment"),
        )

    def set_spend_limit(self, monthly_limit_micros: int | None, *, meta: EventMeta) -> None:
        if monthly_limit_micros is not None and monthly_limit_micros < 0:
            raise ValidationFailed(
                f"monthly limit must not be negative, got {format_usd(monthly_limit_micros)}"
            )
        if monthly_limit_micros != self.monthly_limit_micros:
            self._record(self.SpendLimitSet, meta, monthly_limit_micros=monthly_limit_micros)

    def link_stripe_customer(self, customer_id: str, *, meta: EventMeta) -> None:
        if not customer_id.strip():
            raise ValidationFailed("Stripe customer id must not be empty")
        if self.stripe_customer_id not in (None, customer_id):
            raise InvalidTransition(
                f"workspace {self.id} is already linked to Stripe customer "
                f"{self.stripe_customer_id}"
            )
        if self.stripe_customer_id is None:
            self._record(self.StripeCustomerLinked, meta, customer_id=customer_id)

    def _member(self, user_id: str) -> Role:
        role = self.members.get(user_id)
        if role is None:
            raise MissingPart(f"user {user_id} is not a member of workspace {self.id}")
        return role

    def _keep_an_owner(self, user_id: str, *, action: str) -> None:
        owners = [u for u, r in self.members.items() if r is Role.OWNER]
        if owners == [user_id]:
            raise InvalidTransition(
                f"cannot {action} user {user_id}: they are the last OWNER of workspace {self.id}"
            )


def _user_id(value: str) -> str:
    return trimmed(value, what="user id", at_most=200)


def _since(workspace: Workspace) -> dict[str, datetime]:
    """The workspace's ``members_since``, kept from the first event after a snapshot taken
    before it was (whose members' times are unknown)."""
    since: dict[str, datetime] | None = workspace.__dict__.get("members_since")
    if since is None:
        since = workspace.__dict__["members_since"] = {}
    return since
