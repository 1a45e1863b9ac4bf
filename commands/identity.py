"""Sign-up, login, sessions and TOTP: the identity use cases, on the same event store.

Credentials are checked by adapters handed in by the composition root (argon2id, TOTP, the
sealing key, the access-token signer); this module decides and saves. Every answer a guesser
could learn from is the same for an unknown address and a wrong password, and both cost one
argon2 verification.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate

from domain.errors import (
    Conflict,
    Duplicate,
    MfaRequired,
    NotFound,
    RateLimited,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)
from domain.meta import EventMeta
from domain.text import text_problem
from domain.user import (
    MAX_NAME_LENGTH,
    EmailClaim,
    OidcLink,
    Session,
    User,
    check_password,
    clean_user_name,
    email_claim_ids,
    email_to_find,
    normalise_email,
    oidc_link_id,
)

log = logging.getLogger(__name__)

A = TypeVar("A", bound=Aggregate)
T = TypeVar("T")

RECOVERY_CODE_COUNT = 10
#: How often a failed sign-in's record is tried again after conflicting with others: each
#: conflict is another record's success, so it takes as many as guesses are sent together.
_FAILURE_RECORD_RETRIES = 100
_WRONG_CREDENTIALS = "email or password is wrong"
_OUTLIVED = "the password was changed since this sign-in"
_RACED = (
    "this refresh token was rotated by another refresh sent at the same time; refresh with the "
    "newer token (the aw_refresh cookie holds it)"
)


class Passwords(Protocol):
    def hash(self, password: str) -> str: ...

    def verify(self, password_hash: str | None, password: str) -> bool:
        """True when ``password`` matches; with ``None`` costs the same and answers False."""
        ...


class TotpCodes(Protocol):
    def new_secret(self) -> str: ...

    def uri(self, secret: str, *, account: str, issuer: str) -> str: ...

    def matching_step(self, secret: str, code: str, *, now: float) -> int | None: ...


class Sealer(Protocol):
    def seal(self, plaintext: str) -> str: ...

    def open(self, sealed: str) -> str: ...


class AccessTokens(Protocol):
    @property
    def ttl_seconds(self) -> int: ...

    def issue(self, user_id: UUID) -> str: ...


@dataclass(frozen=True)
class UserView:
    id: UUID
    email: str
    name: str
    mfa_enabled: bool


@dataclass(frozen=True)
class SessionGrant:
    """What a successful login or refresh answers (API.md ``Session``)."""

    access_token: str
    expires_in: int
    refresh_token: str
    user: UserView

    def as_json(self) -> dict[str, object]:
        return {
            "accessToken": self.access_token,
            "expiresIn": self.expires_in,
            "refreshToken": self.refresh_token,
            "user": {"id": str(self.user.id), "email": self.user.email, "name": self.user.name},
        }


def digest(secret: str) -> str:
    """SHA-256 of a high-entropy secret: enough for random tokens, unlike for passwords."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_recovery_codes() -> list[str]:
    """Ten codes of 16 base32 characters (80 bits each), in groups of four."""
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = base64.b32encode(secrets.token_bytes(10)).decode().lower()
        codes.append("-".join(raw[i : i + 4] for i in range(0, 16, 4)))
    return codes


def recovery_code_digest(code: str) -> str:
    compact = code.strip().lower().replace("-", "").replace(" ", "")
    return digest("-".join(compact[i : i + 4] for i in range(0, len(compact), 4)))


def _view(user: User) -> UserView:
    return UserView(id=user.id, email=user.email, name=user.name, mfa_enabled=user.mfa_enabled)


@dataclass(eq=False)
class Identity:
    """The identity use cases. ``app`` is the write side's event-sourced application."""

    app: Application[UUID]
    _: KW_ONLY
    passwords: Passwords
    totp: TotpCodes
    sealer: Sealer = field(repr=False)
    access_tokens: AccessTokens = field(repr=False)
    refresh_ttl_seconds: int = 30 * 86400
    issuer_name: str = "AgentWorks"
    clock: Callable[[], float] = time.time
    retries: int = 5

    # -- sign-up and login --------------------------------------------------------------------

    def signup(self, *, email: str, password: str, name: str, correlation_id: str = "") -> UUID:
        address = normalise_email(email)
        check_password(password)
        display = clean_user_name(name)
        user_id = uuid4()
        meta = self._meta(str(user_id), correlation_id)
        password_hash = self.passwords.hash(password)
        user = User.register(
            user_id=user_id, email=address, name=display, password_hash=password_hash, meta=meta
        )
        claim = EmailClaim.claim(email=address, user_id=user_id, meta=meta)
        taken = f"an account for {address} already exists"
        if self._user_by_email(address) is not None:
            raise Duplicate(taken)
        try:
            self._save(user, claim)
        except Conflict as error:
            # A concurrent sign-up claimed the address since the look-up above.
            raise Duplicate(taken) from error
        except Unavailable as unknown:
            # Its commit interrupted: committed, the account is made (a retry would be told it
            # exists already); not, nothing was written and a retry is safe.
            if self._commit_settled(unknown, [user, claim]) is not True:
                raise
        return user_id

    def login(
        self, *, email: str, password: str, totp: str | None = None, correlation_id: str = ""
    ) -> SessionGrant:
        try:
            address = email_to_find(email)
        except ValidationFailed:
            address = None
        user = self._user_by_email(address) if address is not None else None
        if not self.passwords.verify(user.password_hash if user else None, password) or not user:
            if user is not None:
                self._record_failure(user.id, "wrong password", correlation_id)
            raise Unauthenticated(_WRONG_CREDENTIALS)

        def decide(meta: EventMeta) -> tuple[list[Aggregate], T_Grant | MfaRequired]:
            current = self._get(User, user.id)
            if current.password_hash != user.password_hash:
                # Changed (or ended by a proven address) while it was checked: the password
                # this login knows no longer signs in, and a session begun now would outlive it.
                raise Unauthenticated(_WRONG_CREDENTIALS)
            method = "password"
            if current.mfa_enabled:
                checked = self._second_factor(current, totp, meta)
                if isinstance(checked, MfaRequired):
                    return [current], checked
                method = checked
            token = secrets.token_urlsafe(32)
            session = Session.start(
                session_id=uuid4(),
                user_id=current.id,
                token_hash=digest(token),
                expires_at=self._now() + timedelta(seconds=self.refresh_ttl_seconds),
                meta=meta,
            )
            current.record_login(session.id, method, meta=meta)
            return [current, session], (current, session.id, token)

        outcome = self._retrying(str(user.id), correlation_id, decide)
        if isinstance(outcome, MfaRequired):
            raise outcome
        current, session_id, token = outcome
        return self._grant(current, session_id, token)

    def refresh(
        self, refresh_token: str, *, correlation_id: str = "", session: Session | None = None
    ) -> SessionGrant:
        """Rotate the session's token. ``session``: the session as :meth:`session_of` read it
        for this token, decided on at first rather than read again (a refresh read its session
        three times); if it changed since, the save is refused as a concurrent change and the
        refresh is decided again on the session as it is now."""
        session_id, secret = _parse_refresh(refresh_token)
        presented = digest(secret)
        new_secret = secrets.token_urlsafe(32)
        given = [session] if session is not None and session.id == session_id else []
        held_at_first: list[bool] = []  # whether the first read found the token current

        def decide(meta: EventMeta) -> tuple[list[Aggregate], tuple[Session, User] | None]:
            current = given.pop() if given else self._get(Session, session_id)
            if held_at_first and held_at_first[0] and _just_rotated(current, presented):
                raise Conflict(_RACED)
            held_at_first.append(not current.revoked and current.current_hash == presented)
            # Only a session holding the token can rotate: its user is read for that one alone,
            # and is the user the grant is for.
            user = self._get(User, current.user_id) if current.holds(presented) else None
            if user is not None and current.outlived_password(user):
                current.revoke(_OUTLIVED, meta=meta)
                return [current], None
            rotated = current.rotate(
                presented, digest(new_secret), now=self._now(), most=self._most_tokens(),
                meta=meta,
            )  # fmt: skip
            return [current], (current, user) if rotated and user is not None else None

        try:
            rotated = self._retrying(str(session_id), correlation_id, decide)
        except NotFound:
            raise Unauthenticated("refresh token is not valid") from None
        if rotated is not None and not self._outlived_since(*rotated, correlation_id):
            return self._grant(rotated[1], session_id, new_secret)
        raise Unauthenticated(
            "refresh token is not valid, spent or revoked, or its session has handed out all "
            "its tokens; log in again"
        )

    def _outlived_since(self, session: Session, user: User, correlation_id: str) -> bool:
        """Whether the password changed between the refresh's reading of ``user`` and the
        rotation's commit, which saved the session alone: the user is read again now, after
        the commit, and a session that outlived the password is revoked, its new token with it.
        A change committed after this read comes after the rotation too, and the next refresh
        finds it."""
        latest = self._get(User, user.id)
        if latest.version == user.version or not session.outlived_password(latest):
            return False

        def decide(meta: EventMeta) -> tuple[list[Aggregate], None]:
            current = self._get(Session, session.id)
            current.revoke(_OUTLIVED, meta=meta)
            return [current], None

        self._retrying(str(session.id), correlation_id, decide)
        return True

    def session_of(self, refresh_token: str) -> Session:
        """The session ``refresh_token`` names (its secret unchecked: for counting the refresh
        against its user's account before it is made, then handed to :meth:`refresh`);
        UNAUTHENTICATED when it names none."""
        session_id, _ = _parse_refresh(refresh_token)
        try:
            return self._get(Session, session_id)
        except NotFound:
            raise Unauthenticated("refresh token is not valid") from None

    def logout(self, refresh_token: str, *, correlation_id: str = "") -> bool:
        """Revoke the session the token belongs to; an unknown token is already logged out.
        Returns whether the token was one of its session's (the API counts the others against
        the client's address: each named session is looked for)."""
        try:
            session_id, secret = _parse_refresh(refresh_token)
        except Unauthenticated:
            return False
        presented = digest(secret)

        def decide(meta: EventMeta) -> tuple[list[Aggregate], bool]:
            session = self._get(Session, session_id)
            held = session.holds(presented)
            if held:
                session.revoke("logged out", meta=meta)
            return [session], held

        try:
            return self._retrying(str(session_id), correlation_id, decide)
        except NotFound:
            return False

    def change_password(
        self, user_id: UUID, *, current: str, new: str, correlation_id: str = ""
    ) -> None:
        """Replace the password after checking the current one (a stolen access token alone
        cannot lock the owner out). Every session begun before it stops refreshing: whoever
        knew the old password may hold one; access tokens already issued live out their TTL."""
        check_password(new)
        user = self._user(user_id)
        if not self.passwords.verify(user.password_hash, current):
            self._record_failure(user.id, "wrong password on password change", correlation_id)
            raise Unauthenticated("the current password is wrong")
        new_hash = self.passwords.hash(new)

        def decide(meta: EventMeta) -> tuple[list[Aggregate], None]:
            latest = self._user(user_id)
            if latest.password_hash != user.password_hash:
                # Changed or ended (a proven address) since it was checked: what was checked is
                # no longer the password, and its holder may no longer set one.
                raise Unauthenticated("the current password is wrong")
            latest.change_password(new_hash, meta=meta)
            return [latest], None

        self._retrying(str(user_id), correlation_id, decide)

    # -- TOTP ---------------------------------------------------------------------------------

    def mfa_enroll(self, user_id: UUID, *, correlation_id: str = "") -> tuple[str, str]:
        """A new TOTP secret and its ``otpauth://`` URI; MFA is on after :meth:`mfa_confirm`."""
        secret = self.totp.new_secret()

        def decide(meta: EventMeta) -> tuple[list[Aggregate], str]:
            user = self._user(user_id)
            user.start_mfa_enrolment(self.sealer.seal(secret), meta=meta)
            return [user], user.email

        email = self._retrying(str(user_id), correlation_id, decide)
        return secret, self.totp.uri(secret, account=email, issuer=self.issuer_name)

    def mfa_confirm(self, user_id: UUID, code: str, *, correlation_id: str = "") -> list[str]:
        codes = new_recovery_codes()

        def decide(meta: EventMeta) -> tuple[list[Aggregate], None]:
            user = self._user(user_id)
            if user.pending_totp_secret_sealed is None:
                user.enable_mfa(totp_step=0, recovery_code_hashes=[], meta=meta)  # raises
            secret = self.sealer.open(user.pending_totp_secret_sealed or "")
            step = self.totp.matching_step(secret, code, now=self.clock())
            if step is None:
                raise ValidationFailed("code does not match the enrolled secret; check the clock")
            user.enable_mfa(
                totp_step=step,
                recovery_code_hashes=[recovery_code_digest(c) for c in codes],
                meta=meta,
            )
            return [user], None

        self._retrying(str(user_id), correlation_id, decide)
        return codes

    def mfa_disable(self, user_id: UUID, code: str, *, correlation_id: str = "") -> None:
        def decide(meta: EventMeta) -> tuple[list[Aggregate], MfaRequired | None]:
            user = self._user(user_id)
            if not user.mfa_enabled:
                user.disable_mfa(meta=meta)  # raises: not on
            # A wrong code here counts as at login: a holder of an access token guesses too.
            checked = self._second_factor(user, code, meta)
            if isinstance(checked, MfaRequired):
                return [user], checked
            user.disable_mfa(meta=meta)
            return [user], None

        refused = self._retrying(str(user_id), correlation_id, decide)
        if refused is not None:
            raise refused

    # -- external identity providers ---------------------------------------------------------

    def external_user(
        self,
        *,
        issuer: str,
        subject: str,
        email: str | None,
        email_verified: bool,
        name: str | None,
    ) -> UUID:
        """The user an identity provider's (issuer, subject) is, provisioned on first use.

        A first sign-in whose address already has an account is linked to it only when the
        provider says the address is verified; anyone could otherwise claim another's account.
        Nothing else proves an address (sign-up sends no mail), so that first verified link
        also ends the credentials of whoever held the account before (a squatter's password or
        unverified provider identity; see ``User.AddressProven``).
        """
        link_id = oidc_link_id(issuer, subject)
        for _ in range(self.retries + 1):
            try:
                linked = self._get(OidcLink, link_id).user_id
            except NotFound:
                pass
            else:
                if not self._user(linked).signs_in_as(issuer, subject):
                    raise Unauthenticated(
                        "this sign-in was unlinked from its account: the provider verified the "
                        "address for another of its identities"
                    )
                return linked
            if email is None:
                raise Unauthenticated("the provider's token has no email claim to sign up with")
            address = email_to_find(email)
            meta = self._meta(f"oidc:{subject}", "")
            existing = self._user_by_email(address)
            if existing is not None:
                if not email_verified:
                    raise Unauthenticated(
                        f"{address} already has an account and the provider did not verify it"
                    )
                existing.link_oidc_subject(issuer, subject, verified=True, meta=meta)
                changed: list[Aggregate] = [existing]
                user_id = existing.id
            else:
                address = normalise_email(email)  # a new account's: refused as sign-up's is
                user_id = uuid4()
                user = User.register(
                    user_id=user_id, email=address, name=_provider_name(name, address),
                    password_hash=None, meta=meta,
                )  # fmt: skip
                user.link_oidc_subject(issuer, subject, verified=email_verified, meta=meta)
                changed = [user, EmailClaim.claim(email=address, user_id=user_id, meta=meta)]
            link = OidcLink.link(issuer=issuer, subject=subject, user_id=user_id, meta=meta)
            try:
                self._save(*changed, link)
            except Conflict:
                continue  # a concurrent first sign-in linked it (or took the address): look again
            return user_id
        raise Conflict("too many concurrent first sign-ins for this identity; retry")

    # -- reading ------------------------------------------------------------------------------

    def user(self, user_id: UUID) -> UserView:
        return _view(self._user(user_id))

    def user_id_of(self, email: str) -> UUID | None:
        user = self._user_by_email(email_to_find(email))
        return None if user is None else user.id

    # -- the machinery ------------------------------------------------------------------------

    def _second_factor(self, user: User, code: str | None, meta: EventMeta) -> str | MfaRequired:
        """Spend a TOTP step or a recovery code of ``user`` and answer the sign-in method; when
        neither fits, record the failure on ``user`` and answer the MFA_REQUIRED to raise once
        it is saved. Saved with ``user`` at the version its lock was read from: guesses sent
        together conflict and are decided again, so none is checked past the lock."""
        if code is None or not code.strip():
            refused = MfaRequired("this account needs a TOTP code (totp)", reason="code missing")
        else:
            now = self._now()
            locked = user.second_factor_locked_until(now)
            if locked is not None:
                wait = (locked - now).total_seconds()
                raise RateLimited(
                    "too many wrong codes for this account in a short time: its codes are "
                    f"refused for {math.ceil(wait)} s more",
                    retry_after_seconds=wait,
                )
            secret = self.sealer.open(user.totp_secret_sealed or "")
            step = self.totp.matching_step(secret, code, now=self.clock())
            code_hash = None if step is not None else recovery_code_digest(code)
            if step is not None and step > user.last_totp_step:
                user.use_totp_step(step, meta=meta)
                return "password+totp"
            if step is not None:
                refused = MfaRequired("this TOTP code was already used", reason="code replayed")
            elif code_hash is not None and code_hash in user.recovery_code_hashes:
                user.use_recovery_code(code_hash, meta=meta)
                return "password+recovery_code"
            else:
                refused = MfaRequired("the TOTP code is wrong", reason="wrong code")
        reason = str(refused.details.get("reason", "second factor"))
        user.record_failed_login(reason, at=self._failed_at(user), meta=meta)
        return refused

    def _most_tokens(self) -> int:
        """How many refresh tokens one session hands out: a client refreshes once per access
        token lifetime, so twice that over the session's life, and 100 more for retries."""
        access = max(1, self.access_tokens.ttl_seconds)
        return 2 * math.ceil(self.refresh_ttl_seconds / access) + 100

    def _record_failure(self, user_id: UUID, reason: str, correlation_id: str) -> None:
        """Record a wrong password on the account. The caller's answer must not depend on it
        (it is the answer of an address with no account): guesses sent together conflict on
        the record, and each conflict is another one's success, so it is tried until recorded
        (up to :data:`_FAILURE_RECORD_RETRIES`; past that it is logged, not raised)."""

        def decide(meta: EventMeta) -> tuple[list[Aggregate], None]:
            user = self._get(User, user_id)
            user.record_failed_login(reason, at=self._failed_at(user), meta=meta)
            return [user], None

        try:
            self._retrying(str(user_id), correlation_id, decide, retries=_FAILURE_RECORD_RETRIES)
        except Conflict:
            log.warning("identity.failed_login_unrecorded: user %s, %s", user_id, reason)

    def _grant(self, user: User, session_id: UUID, secret: str) -> SessionGrant:
        return SessionGrant(
            access_token=self.access_tokens.issue(user.id),
            expires_in=self.access_tokens.ttl_seconds,
            refresh_token=f"{session_id.hex}.{secret}",
            user=_view(user),
        )

    def _user_by_email(self, address: str) -> User | None:
        for claim_id in email_claim_ids(address):
            try:
                claim = self._get(EmailClaim, claim_id)
                return self._get(User, claim.user_id)
            except NotFound:
                continue
        return None

    def _user(self, user_id: UUID) -> User:
        try:
            return self._get(User, user_id)
        except NotFound:
            raise Unauthenticated("this token's user has no account") from None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _failed_at(self, user: User) -> datetime:
        """When a failed sign-in of ``user`` is recorded: now, or the account's latest event
        when this clock reads earlier (another host's, ahead, wrote it; or this clock stepped
        back). The failure happened after that event, so it is dated no earlier: moved
        forward, by that skew, never back before what the account already holds."""
        return max(self._now(), user.modified_on)

    def _meta(self, actor: str, correlation_id: str) -> EventMeta:
        return EventMeta.for_command(
            workspace_id="", actor=actor, correlation_id=correlation_id or None
        )

    def _retrying(
        self,
        actor: str,
        correlation_id: str,
        decide: Callable[[EventMeta], tuple[list[Aggregate], T]],
        *,
        retries: int | None = None,
    ) -> T:
        """Decide and save; after a concurrent write to the same aggregates, decide again (up
        to ``retries`` times, the identity's own by default)."""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            meta = self._meta(actor, correlation_id)
            changed, answer = decide(meta)
            saving = [agg for agg in changed if agg.pending_events]
            try:
                self._save(*saving)
            except Conflict as error:
                if attempt == retries:
                    raise Conflict("too many concurrent changes to this account; retry") from error
                continue
            except Unavailable as unknown:
                # The connection broke while the COMMIT was on its way. The answer must be the
                # truth: a client that retries a refresh the store did commit presents a spent
                # token, which revokes its session. Committed, this answer stands; not, decide
                # again.
                settled = self._commit_settled(unknown, saving)
                if settled is None:
                    raise
                if not settled:
                    if attempt == retries:
                        raise Unavailable(
                            "the database connection kept breaking; nothing was written, "
                            "retry shortly",
                            retry_after_seconds=1.0,
                        ) from unknown
                    continue
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _commit_settled(self, unknown: Unavailable, saved: list[Aggregate]) -> bool | None:
        """Whether an interrupted commit of ``saved`` committed (see
        ``WriteSide.commit_settled``); None when the error is no interrupted commit or the store
        cannot tell."""
        settle = getattr(self.app, "commit_settled", None)
        if unknown.outcome != "unknown" or settle is None:
            return None
        settled: bool | None = settle(unknown, saved)
        return settled

    def _save(self, *aggregates: Aggregate) -> None:
        """Save together; the store raises CONFLICT for a concurrent write and UNAVAILABLE when
        it cannot be reached (nothing was written)."""
        if aggregates:
            self.app.save(*aggregates)

    def _get(self, cls: type[A], aggregate_id: UUID) -> A:
        try:
            aggregate: Aggregate = self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            raise NotFound(f"{cls.__name__} {aggregate_id} does not exist") from None
        if not isinstance(aggregate, cls):
            raise NotFound(f"{cls.__name__} {aggregate_id} does not exist")
        return aggregate


T_Grant = tuple[User, UUID, str]


def _provider_name(name: str | None, address: str) -> str:
    """The display name an identity provider gave, cut to length; the address when the name is
    blank or cannot be stored. It is only a display name: a sign-in is never refused for it."""
    cut = (name or "").strip()[:MAX_NAME_LENGTH]
    if not cut or text_problem(cut) is not None:
        return address
    return clean_user_name(cut)


def _just_rotated(session: Session, presented: str) -> bool:
    """Whether ``presented``, current when a refresh first read its session, is the token the
    session's last rotation spent, the session still live: a refresh sent alongside (two tabs
    of one browser share the cookie) won the save. That is no reuse: the session stays, the
    loser gets no token (it may not hold the new one) and is told to retry. A token already
    spent when the refresh read it, or rotated twice since, is reuse as ever."""
    return not session.revoked and session.spent_hashes[-1:] == [presented]


def _parse_refresh(token: str) -> tuple[UUID, str]:
    session_hex, dot, secret = token.strip().partition(".")
    if text_problem(secret) is not None:  # no UTF-8 form to digest: no token of ours
        raise Unauthenticated("refresh token is not valid")
    try:
        session_id = UUID(hex=session_hex)
    except ValueError:
        raise Unauthenticated("refresh token is not valid") from None
    if not dot or not secret:
        raise Unauthenticated("refresh token is not valid")
    return session_id, secret
