"""Identity under concurrent writers, on the real event store.

* Sign-ups of one address in any case from many threads at once: exactly one account.
* Refreshes racing with one refresh token: at most one gets a new token; those that read it
  current and lost the save are told CONFLICT (two tabs sharing a cookie), and the session is
  revoked only when one presented it already spent (reuse).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

import pytest
from credentials import rfc6238
from identities import cheap_identity

from commands.handlers import AgentWorks
from commands.identity import Identity, SessionGrant
from domain.errors import (
    AgentWorksError,
    Conflict,
    Duplicate,
    MfaRequired,
    RateLimited,
    Unauthenticated,
)
from domain.user import MAX_SECOND_FACTOR_FAILURES, Session, User

PASSWORD = "correct horse battery"
WRITERS = 8


@pytest.fixture
def identity(write_side: AgentWorks) -> Identity:
    return cheap_identity(write_side)


def _all_at_once(n: int, work: object) -> list[object]:
    barrier = threading.Barrier(n)

    def one(i: int) -> object:
        barrier.wait()
        try:
            return work(i)  # type: ignore[operator]
        except AgentWorksError as error:
            return error

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_sign_ups_of_one_address_make_one_account(identity: Identity) -> None:
    spellings = ["ada@example.com", "ADA@example.com", "Ada@Example.Com", " ada@EXAMPLE.com "]
    outcomes = _all_at_once(
        WRITERS,
        lambda i: identity.signup(email=spellings[i % 4], password=PASSWORD, name=f"Ada {i}"),
    )
    accounts = [o for o in outcomes if isinstance(o, UUID)]
    assert len(accounts) == 1, outcomes
    assert all(isinstance(o, Duplicate) for o in outcomes if not isinstance(o, UUID)), outcomes
    assert identity.user_id_of("ADA@EXAMPLE.COM") == accounts[0]
    assert identity.login(email="ada@example.com", password=PASSWORD).user.id == accounts[0]


def test_racing_refreshes_with_one_token_rotate_once_and_revoke_on_reuse(
    identity: Identity, write_side: AgentWorks
) -> None:
    identity.signup(email="bob@example.com", password=PASSWORD, name="Bob")
    grant = identity.login(email="bob@example.com", password=PASSWORD)
    outcomes = _all_at_once(WRITERS, lambda _: identity.refresh(grant.refresh_token))
    winners = [o for o in outcomes if isinstance(o, SessionGrant)]
    assert len(winners) <= 1, outcomes
    # A loser that read the token current lost the race to its rotation (CONFLICT, no reuse);
    # one that read it spent presented a spent token: the session is revoked.
    reused = [o for o in outcomes if isinstance(o, Unauthenticated)]
    assert len(winners) + len(reused) + len(
        [o for o in outcomes if isinstance(o, Conflict)]
    ) == len(outcomes), outcomes
    assert _session(write_side, grant.refresh_token).revoked == bool(reused)
    for winner in winners:
        if reused:
            with pytest.raises(Unauthenticated):
                identity.refresh(winner.refresh_token)
        else:
            identity.refresh(winner.refresh_token)


def test_wrong_codes_sent_at_once_count_against_one_lock(identity: Identity) -> None:
    """The second factor is locked after 5 wrong codes; the count was read, the code checked and
    the failure written afterwards in a write of its own, so guesses sent together all read
    "no failures yet" and were all checked: a holder of the password guessed as many codes at
    once as the rate limits let through (unbounded while Redis is away). Each wrong code is now
    written at the version of the user it was checked against: exactly 5 are checked, the rest
    are refused unchecked."""
    user_id = identity.signup(email="cy@example.com", password=PASSWORD, name="Cy")
    secret, _ = identity.mfa_enroll(user_id)
    now = time.time()
    identity.mfa_confirm(user_id, rfc6238(secret, now))
    right = {rfc6238(secret, now + d) for d in range(-60, 61, 30)}
    wrong = [c for c in (f"{n:06d}" for n in range(100)) if c not in right][: WRITERS + 4]
    outcomes = _all_at_once(
        len(wrong),
        lambda i: identity.login(email="cy@example.com", password=PASSWORD, totp=wrong[i]),
    )
    checked = [o for o in outcomes if isinstance(o, MfaRequired)]
    assert len(checked) == MAX_SECOND_FACTOR_FAILURES, outcomes
    assert all(isinstance(o, RateLimited) for o in outcomes if o not in checked), outcomes


def test_one_code_sent_in_logins_at_once_opens_one_session(identity: Identity) -> None:
    """Each TOTP code works once (API.md), also when the logins carrying it race."""
    user_id = identity.signup(email="di@example.com", password=PASSWORD, name="Di")
    secret, _ = identity.mfa_enroll(user_id)
    now = time.time()
    identity.mfa_confirm(user_id, rfc6238(secret, now - 30))
    code = rfc6238(secret, now)
    outcomes = _all_at_once(
        WRITERS, lambda _: identity.login(email="di@example.com", password=PASSWORD, totp=code)
    )
    assert len([o for o in outcomes if isinstance(o, SessionGrant)]) == 1, outcomes
    # A replayed code counts as a wrong one (past 5 the account's codes are locked), and a
    # login that lost every retry to the others answers CONFLICT: all refusals.
    others = [o for o in outcomes if not isinstance(o, SessionGrant)]
    assert all(isinstance(o, MfaRequired | RateLimited | Conflict) for o in others), outcomes


def test_a_refresh_racing_a_password_change_hands_out_no_token_after_it(
    identity: Identity, write_side: AgentWorks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new password signs every earlier session out. A refresh decided on the user as it was
    before the change (its session not yet outlived) and saved after it rotated the session all
    the same: its holder, who may be whoever knew the old password, got fresh tokens after the
    change. The password is changed here between the refresh's decision and its save."""
    user_id = identity.signup(email="ed@example.com", password=PASSWORD, name="Ed")
    grant = identity.login(email="ed@example.com", password=PASSWORD)
    save = identity._save
    changed: list[bool] = []

    def change_first(*aggregates: object) -> None:
        if not changed and any(isinstance(a, Session) for a in aggregates):
            changed.append(True)
            identity.change_password(user_id, current=PASSWORD, new="a new long passphrase")
        save(*aggregates)  # type: ignore[arg-type]

    monkeypatch.setattr(identity, "_save", change_first)
    with pytest.raises(Unauthenticated):
        identity.refresh(grant.refresh_token)
    assert changed
    session = write_side.repository.get(UUID(hex=grant.refresh_token.split(".")[0]))
    assert isinstance(session, Session)
    assert session.revoked


def _session(write_side: AgentWorks, token: str) -> Session:
    session = write_side.repository.get(UUID(hex=token.split(".")[0]))
    assert isinstance(session, Session)
    return session


def test_a_refresh_that_lost_the_race_to_its_token_s_rotation_leaves_the_session_alone(
    identity: Identity, write_side: AgentWorks
) -> None:
    """Two tabs of the SPA refresh at once with the one aw_refresh cookie: both read the session
    with the token current, one rotates it, the other's save conflicts. Decided again, the
    other saw the token spent and revoked the session: the user was signed out of every tab for
    refreshing in two. It is told CONFLICT (retry with the newer token, which the cookie holds)
    and the session stays; a spent token presented later, outside a race, still revokes it."""
    identity.signup(email="fay@example.com", password=PASSWORD, name="Fay")
    grant = identity.login(email="fay@example.com", password=PASSWORD)
    tab_a = identity.session_of(grant.refresh_token)  # as /auth/refresh reads it first
    tab_b = identity.session_of(grant.refresh_token)
    rotated = identity.refresh(grant.refresh_token, session=tab_a)
    with pytest.raises(Conflict, match="at the same time"):
        identity.refresh(grant.refresh_token, session=tab_b)
    assert not _session(write_side, grant.refresh_token).revoked
    again = identity.refresh(rotated.refresh_token)
    with pytest.raises(Unauthenticated):
        identity.refresh(rotated.refresh_token)  # replayed later: reuse
    assert _session(write_side, grant.refresh_token).revoked
    with pytest.raises(Unauthenticated):
        identity.refresh(again.refresh_token)


def test_wrong_passwords_sent_at_once_get_the_answer_of_an_unknown_address(
    identity: Identity,
) -> None:
    """Each wrong password of an existing account is recorded on it (the audit trail shows
    failed sign-ins), and guesses sent together conflict on that record: past its retries one
    answered 409 CONFLICT, which a login naming no account never does, so a burst of guesses
    told which addresses have accounts. Every one answers as an unknown address does."""
    user_id = identity.signup(email="gus@example.com", password=PASSWORD, name="Gus")
    guesses = 4 * WRITERS  # (the HTTP limits may be off, or be per device)
    outcomes = _all_at_once(
        guesses, lambda i: identity.login(email="gus@example.com", password=f"wrong guess {i}")
    )
    assert all(isinstance(o, Unauthenticated) for o in outcomes), outcomes
    assert {str(o) for o in outcomes} == {"email or password is wrong"}
    events = [
        identity.app.mapper.to_domain_event(e) for e in identity.app.recorder.select_events(user_id)
    ]
    assert len([e for e in events if isinstance(e, User.LoginFailed)]) == guesses  # each recorded
