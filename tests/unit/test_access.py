"""Invitation and API-key rules, pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from aw_builders import World

from commands.access import AcceptInvitation, InviteMember, accept_invitation, invite_member
from commands.handlers import USER_SCOPE, Actor
from domain.access import ApiKey, Invitation
from domain.errors import Forbidden, InvalidTransition, ValidationFailed
from domain.meta import EventMeta
from domain.roles import Role
from domain.user import User

WORKSPACE = UUID(int=7)
META = EventMeta.for_command(workspace_id=WORKSPACE, actor="owner")
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
OWNER = Role.OWNER


def invitation(expires_in: timedelta = timedelta(days=7), role: Role = Role.MEMBER) -> Invitation:
    return Invitation.create(
        invitation_id=uuid4(), workspace_id=WORKSPACE, email="a@example.com", role=role,
        token_hash="h", expires_at=NOW + expires_in, invited_by="owner", meta=META,
    )  # fmt: skip


def test_accepting_twice_is_harmless_but_not_by_someone_else() -> None:
    made = invitation()
    assert made.accept("u1", "a@example.com", inviter_role=OWNER, now=NOW, meta=META) is True
    assert made.accept("u1", "a@example.com", inviter_role=OWNER, now=NOW, meta=META) is False
    with pytest.raises(InvalidTransition):
        made.accept("u2", "a@example.com", inviter_role=OWNER, now=NOW, meta=META)
    with pytest.raises(InvalidTransition):
        made.revoke(meta=META)


def test_expired_revoked_and_misaddressed_invitations_are_refused() -> None:
    with pytest.raises(InvalidTransition, match="expired"):
        invitation(timedelta(seconds=-1)).accept(
            "u1", "a@example.com", inviter_role=OWNER, now=NOW, meta=META
        )
    with pytest.raises(Forbidden):
        invitation().accept("u1", "b@example.com", inviter_role=OWNER, now=NOW, meta=META)
    revoked = invitation()
    revoked.revoke(meta=META)
    revoked.revoke(meta=META)  # again: nothing more happens
    assert len(list(revoked.collect_events())) == 2
    with pytest.raises(InvalidTransition, match="revoked"):
        revoked.accept("u1", "a@example.com", inviter_role=OWNER, now=NOW, meta=META)


@pytest.mark.parametrize(
    ("role", "inviter_role"),
    [
        (Role.VIEWER, None),
        (Role.VIEWER, Role.MEMBER),
        (Role.ADMIN, Role.VIEWER),
        (Role.OWNER, Role.ADMIN),
    ],
)
def test_an_invitation_grants_only_what_its_inviter_may_still_grant(
    role: Role, inviter_role: Role | None
) -> None:
    made = invitation(role=role)
    with pytest.raises(Forbidden, match="may no longer grant"):
        made.accept("u1", "a@example.com", inviter_role=inviter_role, now=NOW, meta=META)
    assert made.accepted_by is None
    assert made.accept("u1", "a@example.com", inviter_role=Role.OWNER, now=NOW, meta=META)
    admin_made = invitation(role=Role.ADMIN)
    assert admin_made.accept("u1", "a@example.com", inviter_role=Role.ADMIN, now=NOW, meta=META)


def test_api_key_names_are_checked_and_revocation_is_idempotent() -> None:
    with pytest.raises(ValidationFailed):
        ApiKey.create(
            key_id=uuid4(), workspace_id=WORKSPACE, name="  ", role=Role.ADMIN,
            created_by="owner", secret_hash="h", meta=META,
        )  # fmt: skip
    key = ApiKey.create(
        key_id=uuid4(), workspace_id=WORKSPACE, name=" ci ", role=Role.ADMIN,
        created_by="owner", secret_hash="h", meta=META,
    )  # fmt: skip
    assert key.name == "ci"
    key.revoke(meta=META)
    first = key.revoked_at
    key.revoke(meta=META)
    assert key.revoked_at == first
    assert first is not None


def test_an_account_stored_with_a_labels_accepts_an_invitation_to_its_unicode_spelling() -> None:
    """Accounts made before addresses spelled their domain in Unicode keep the spelling they
    were typed in; an invitation to the same mailbox in the other spelling is theirs."""
    world = World.build()
    user_id = uuid4()
    # As sign-up stored it then: the address as typed (register() now normalises it).
    meta = EventMeta.for_command(workspace_id="", actor=str(user_id)).as_dict()
    user = User._create(
        User.Registered, id=user_id, email="bob@xn--bcher-kva.example", name="Bob",
        password_hash=None, meta=meta,
    )  # fmt: skip
    world.app.save(user)
    assert world.app.repository.get(user_id).email == "bob@xn--bcher-kva.example"
    issued = invite_member(
        world.app,
        InviteMember(
            workspace_id=world.workspace_id, email="Bob@B\u00dcCHER.example", role="MEMBER"
        ),
        world.owner,
    )
    assert issued.secret is not None

    accept_invitation(
        world.app,
        AcceptInvitation(token=issued.secret),
        Actor(user_id=str(user_id), workspace_id=USER_SCOPE),
    )

    workspace = world.app.repository.get(world.workspace_id)
    assert workspace.role_of(str(user_id)) is Role.MEMBER
