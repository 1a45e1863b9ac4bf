"""Users, the e-mail addresses they claim, and their sign-in sessions.

Users are event-sourced like every tenant object so that the audit trail shows sign-ins and
security changes. Nothing secret is in an event in the clear: passwords arrive as argon2id
hashes, the TOTP secret as ciphertext, recovery codes and refresh tokens as SHA-256 digests
(both are long random strings, so a fast hash is enough), all computed outside the domain.

E-mail uniqueness under concurrent sign-ups is an aggregate of its own: :class:`EmailClaim`,
whose id is derived from the normalised address. Two sign-ups for one address both try to create
version 1 of the same claim; the event store's primary key lets exactly one succeed.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.base import StampedEvent
from domain.errors import InvalidTransition, Unauthenticated, ValidationFailed
from domain.instants import instant_text
from domain.meta import EventMeta
from domain.text import storable_text

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
MAX_EMAIL_LENGTH = 254
MAX_NAME_LENGTH = 200
#: Wrong second factors (TOTP or recovery codes) an account takes within
#: :data:`SECOND_FACTOR_WINDOW` before its codes are refused until the oldest of them is that old.
MAX_SECOND_FACTOR_FAILURES = 5
SECOND_FACTOR_WINDOW = timedelta(minutes=15)
#: The reasons of a failed login that are a guess of a second factor (not a missing code).
SECOND_FACTOR_GUESSES = frozenset({"wrong code", "code replayed"})

_EMAIL_NAMESPACE = UUID("6f1e3a52-8d0c-4a7e-9b57-2a1f3c4d5e60")
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")
#: Zero-width non-joiner and joiner: formatting characters words of some scripts need.
_JOINERS = frozenset("\u200c\u200d")
#: The prefix of an IDNA A-label: the ASCII form of a domain label in Unicode.
_ACE = "xn--"
_UNICODE_LABEL = re.compile(r"[^@\s.\x00\ud800-\udfff]+")


def normalise_email(raw: str) -> str:
    """The address as compared and stored: NFKC, trimmed and lower-cased (API.md: addresses
    compare case-insensitively), its domain's A-labels (``xn--…``) spelled as the Unicode labels
    they encode (one mailbox, ``bücher.example`` or ``xn--bcher-kva.example``, one claim). Not
    case-folded: folding also equates letters that are not case variants (ß with ss, final sigma
    with sigma), which IDNA 2008 keeps apart, so the owner of one address (straße.de) would have
    claimed another's (strasse.de). A new address: one holding characters no address holds is
    refused (:func:`_refuse_unseen`)."""
    return _normal_form(raw, new=True)


def email_to_find(raw: str) -> str:
    """The address to look an account up by: :func:`normalise_email`'s form, without refusing
    the characters new addresses may not hold. An account registered before they were refused
    (an address pasted with a zero-width space) still signs in, and is still found."""
    return _normal_form(raw, new=False)


def _normal_form(raw: str, *, new: bool) -> str:
    lowered = unicodedata.normalize("NFKC", raw).strip().lower()
    email = unicodedata.normalize("NFKC", lowered)  # lowering may decompose: compose again
    if len(email) > MAX_EMAIL_LENGTH:
        raise ValidationFailed(f"email is {len(email)} characters; at most {MAX_EMAIL_LENGTH}")
    if new:
        _refuse_unseen(email)
    if not _EMAIL.fullmatch(email):
        raise ValidationFailed("email must look like name@example.com")
    local, _, domain = email.partition("@")
    email = f"{local}@{'.'.join(map(_unicode_label, domain.split('.')))}"
    if new:
        # Again as stored: an A-label may encode what its Unicode spelling was refused for.
        _refuse_unseen(email)
    # NUL cannot be stored, a lone surrogate has no UTF-8 form for the claim's id (uuid5).
    return storable_text(email, what="email")


def _refuse_unseen(email: str) -> None:
    """Refuse characters no address holds: controls (C0, DEL, C1) and invisible formatting
    characters (Unicode's Cf: bidi overrides and isolates, zero-width spaces, soft hyphens,
    tags), which make an address display as another one, or as one it is not, to whoever reads
    it (a member or invitation list). ZWNJ and ZWJ are kept: some scripts need them inside
    words, and IDNA 2008 allows them there. NUL is left to :func:`storable_text`."""
    for at, char in enumerate(email):
        if char in _JOINERS or char == "\x00":
            continue
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise ValidationFailed(
                "email must not contain control or invisible formatting characters; found "
                f"U+{ord(char):04X} at character {at}"
            )


def _unicode_label(label: str) -> str:
    """The Unicode label an A-label encodes; any other label as it is. An ``xn--`` label that
    encodes nothing an encoder would have written (bad Punycode, ASCII only, a form that
    normalising changes, a dot, NUL, not the encoding of what it decodes to) stays as typed:
    it names no other spelling of a domain."""
    if not label.startswith(_ACE) or not label.isascii():
        return label
    encoded = label.removeprefix(_ACE)
    try:
        decoded = encoded.encode("ascii").decode("punycode")
    except UnicodeError:
        return label
    normal = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", decoded).lower())
    if (
        decoded != normal
        or decoded.isascii()
        or not _UNICODE_LABEL.fullmatch(decoded)
        or decoded.encode("punycode") != encoded.encode("ascii")
    ):
        return label
    return decoded


def email_claim_ids(email: str) -> list[UUID]:
    """The ids a claim on a normalised address may have, its own first. Before 2026-12-07 an
    address kept its domain as typed, so one typed with A-labels was claimed under that
    spelling: the second id. (A domain typed half in A-labels, half in Unicode, is not looked
    for: that would be a spelling per mix of its labels.)"""
    local, _, domain = email.partition("@")
    if domain.isascii():
        return [email_claim_id(email)]
    ascii_domain = ".".join(
        label if label.isascii() else _ACE + label.encode("punycode").decode("ascii")
        for label in domain.split(".")
    )
    return [email_claim_id(email), email_claim_id(f"{local}@{ascii_domain}")]


def email_claim_id(email: str) -> UUID:
    """The id of the claim on a normalised address: the same address always gives the same id."""
    return uuid5(_EMAIL_NAMESPACE, email)


def check_password(password: str) -> None:
    """At least 10 characters (API.md), not all of them white space, bounded so hashing stays
    cheap. The one rule wherever a password is set (sign-up, a change)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationFailed(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if not password.strip():
        raise ValidationFailed("password must not be white space alone")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValidationFailed(f"password must be at most {MAX_PASSWORD_LENGTH} characters")


def clean_user_name(raw: str) -> str:
    name = raw.strip()
    if not name:
        raise ValidationFailed("name must not be empty")
    if len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise ValidationFailed(f"name must be at most {MAX_NAME_LENGTH} characters, without NUL")
    return name


class IdentityAggregate(Aggregate):
    """An aggregate outside any workspace; its events carry :class:`EventMeta` like the rest."""

    class Event(StampedEvent, Aggregate.Event):
        meta: dict[str, str]

    class Created(Event, Aggregate.Created):
        pass

    def _record(
        self, event_class: type[Aggregate.Event], meta: EventMeta, **payload: object
    ) -> None:
        self.trigger_event(event_class, meta=meta.as_dict(), **payload)


class EmailClaim(IdentityAggregate):
    """Who holds an e-mail address. Exists once per address; never changes hands."""

    if TYPE_CHECKING:
        email: str
        user_id: UUID

    class Claimed(IdentityAggregate.Created):
        email: str
        user_id: UUID

        def apply(self, aggregate: EmailClaim) -> None:
            aggregate.email = self.email
            aggregate.user_id = self.user_id

    @classmethod
    def claim(cls, *, email: str, user_id: UUID, meta: EventMeta) -> EmailClaim:
        return cls._create(
            cls.Claimed,
            id=email_claim_id(email),
            email=email,
            user_id=user_id,
            meta=meta.as_dict(),
        )


class User(IdentityAggregate):
    """A person who signs in. Holds the hashes and ciphertexts that check their credentials.

    ``last_totp_step`` is the last 30-second TOTP step accepted: a code is only taken for a later
    step, so each code works once (RFC 6238 section 5.2).
    """

    if TYPE_CHECKING:
        email: str
        name: str
        password_hash: str | None
        mfa_enabled: bool
        totp_secret_sealed: str | None
        pending_totp_secret_sealed: str | None
        recovery_code_hashes: list[str]
        last_totp_step: int
        oidc_subjects: list[str]
        password_changed_at: datetime | None
        address_proven: bool
        second_factor_failures: list[datetime]

    class Registered(IdentityAggregate.Created):
        email: str
        name: str
        password_hash: str | None

        def apply(self, aggregate: User) -> None:
            aggregate.email = self.email
            aggregate.name = self.name
            aggregate.password_hash = self.password_hash
            aggregate.mfa_enabled = False
            aggregate.totp_secret_sealed = None
            aggregate.pending_totp_secret_sealed = None
            aggregate.recovery_code_hashes = []
            aggregate.last_totp_step = -1
            aggregate.oidc_subjects = []
            aggregate.password_changed_at = None
            aggregate.address_proven = False
            aggregate.second_factor_failures = []

    class PasswordChanged(IdentityAggregate.Event):
        password_hash: str

        def apply(self, aggregate: User) -> None:
            aggregate.password_hash = self.password_hash
            aggregate.password_changed_at = self.timestamp

    class MfaEnrolmentStarted(IdentityAggregate.Event):
        totp_secret_sealed: str

        def apply(self, aggregate: User) -> None:
            aggregate.pending_totp_secret_sealed = self.totp_secret_sealed

    class MfaEnabled(IdentityAggregate.Event):
        totp_secret_sealed: str
        recovery_code_hashes: list[str]
        totp_step: int

        def apply(self, aggregate: User) -> None:
            aggregate.mfa_enabled = True
            aggregate.totp_secret_sealed = self.totp_secret_sealed
            aggregate.pending_totp_secret_sealed = None
            aggregate.recovery_code_hashes = list(self.recovery_code_hashes)
            aggregate.last_totp_step = self.totp_step

    class MfaDisabled(IdentityAggregate.Event):
        def apply(self, aggregate: User) -> None:
            aggregate.mfa_enabled = False
            aggregate.totp_secret_sealed = None
            aggregate.recovery_code_hashes = []

    class TotpCodeUsed(IdentityAggregate.Event):
        totp_step: int

        def apply(self, aggregate: User) -> None:
            aggregate.last_totp_step = self.totp_step
            aggregate.second_factor_failures = []

    class RecoveryCodeUsed(IdentityAggregate.Event):
        code_hash: str

        def apply(self, aggregate: User) -> None:
            aggregate.recovery_code_hashes = [
                h for h in aggregate.recovery_code_hashes if h != self.code_hash
            ]
            aggregate.second_factor_failures = []

    class OidcSubjectLinked(IdentityAggregate.Event):
        issuer: str
        subject: str

        def apply(self, aggregate: User) -> None:
            aggregate.oidc_subjects = [*aggregate.oidc_subjects, f"{self.issuer} {self.subject}"]

    class AddressProven(IdentityAggregate.Event):
        """An identity provider vouched for the address of the subject it signed in
        (``email_verified``). Every credential the account had before was set by someone who
        never proved the address (a sign-up, a provider's unverified claim), maybe a squatter
        waiting for its owner: they end here. The password and second factor go, sessions begun
        before stop refreshing (``password_changed_at``), and only this subject stays linked."""

        issuer: str
        subject: str

        def apply(self, aggregate: User) -> None:
            aggregate.address_proven = True
            aggregate.password_hash = None
            aggregate.password_changed_at = self.timestamp
            aggregate.mfa_enabled = False
            aggregate.totp_secret_sealed = None
            aggregate.pending_totp_secret_sealed = None
            aggregate.recovery_code_hashes = []
            aggregate.oidc_subjects = [f"{self.issuer} {self.subject}"]

    class LoginSucceeded(IdentityAggregate.Event):
        session_id: UUID
        method: str

        def apply(self, aggregate: User) -> None:
            pass

    class LoginFailed(IdentityAggregate.Event):
        reason: str

        def apply(self, aggregate: User) -> None:
            if self.reason in SECOND_FACTOR_GUESSES:
                # (getattr: users snapshotted before the count was kept)
                failures = getattr(aggregate, "second_factor_failures", [])
                kept = MAX_SECOND_FACTOR_FAILURES
                aggregate.second_factor_failures = [*failures, self.timestamp][-kept:]

    @classmethod
    def register(
        cls,
        *,
        user_id: UUID,
        email: str,
        name: str,
        password_hash: str | None,
        meta: EventMeta,
    ) -> User:
        return cls._create(
            cls.Registered,
            id=user_id,
            email=normalise_email(email),
            name=clean_user_name(name),
            password_hash=password_hash,
            meta=meta.as_dict(),
        )

    def change_password(self, password_hash: str, *, meta: EventMeta) -> None:
        self._record(self.PasswordChanged, meta, password_hash=password_hash)

    def start_mfa_enrolment(self, totp_secret_sealed: str, *, meta: EventMeta) -> None:
        if self.mfa_enabled:
            raise InvalidTransition("MFA is already on; disable it before enrolling again")
        self._record(self.MfaEnrolmentStarted, meta, totp_secret_sealed=totp_secret_sealed)

    def enable_mfa(
        self, *, totp_step: int, recovery_code_hashes: list[str], meta: EventMeta
    ) -> None:
        """Turn MFA on with the pending secret, once a code from it was checked (``totp_step``)."""
        if self.mfa_enabled:
            raise InvalidTransition("MFA is already on")
        if self.pending_totp_secret_sealed is None:
            raise InvalidTransition("no MFA enrolment is pending; call /auth/mfa/enroll first")
        self._record(
            self.MfaEnabled,
            meta,
            totp_secret_sealed=self.pending_totp_secret_sealed,
            recovery_code_hashes=list(recovery_code_hashes),
            totp_step=totp_step,
        )

    def disable_mfa(self, *, meta: EventMeta) -> None:
        if not self.mfa_enabled:
            raise InvalidTransition("MFA is not on")
        self._record(self.MfaDisabled, meta)

    def use_totp_step(self, step: int, *, meta: EventMeta) -> None:
        """Spend a TOTP step; a step at or before the last one spent is a replayed code."""
        if step <= self.last_totp_step:
            raise Unauthenticated("this code was already used; wait for the next one")
        self._record(self.TotpCodeUsed, meta, totp_step=step)

    def use_recovery_code(self, code_hash: str, *, meta: EventMeta) -> None:
        if code_hash not in self.recovery_code_hashes:
            raise Unauthenticated("recovery code is not valid or was already used")
        self._record(self.RecoveryCodeUsed, meta, code_hash=code_hash)

    def link_oidc_subject(
        self, issuer: str, subject: str, *, verified: bool, meta: EventMeta
    ) -> None:
        """Link a provider's subject; ``verified``: the provider vouched for this account's
        address, which proves it the first time (see :class:`AddressProven`)."""
        if verified and not getattr(self, "address_proven", False):
            self._record(self.AddressProven, meta, issuer=issuer, subject=subject)
        elif f"{issuer} {subject}" not in self.oidc_subjects:
            self._record(self.OidcSubjectLinked, meta, issuer=issuer, subject=subject)

    def signs_in_as(self, issuer: str, subject: str) -> bool:
        """Whether a provider's subject still signs in to this account (the address's proven
        owner unlinks every subject linked before)."""
        return f"{issuer} {subject}" in self.oidc_subjects

    def record_login(self, session_id: UUID, method: str, *, meta: EventMeta) -> None:
        self._record(self.LoginSucceeded, meta, session_id=session_id, method=method)

    def record_failed_login(self, reason: str, *, at: datetime, meta: EventMeta) -> None:
        """A sign-in refused at ``at``, which is no earlier than the account's latest event
        (refused otherwise): the audit trail never shows a failure before the account existed
        or before what it already holds, and the lockout counts failures in time order."""
        if at < self.modified_on:
            raise InvalidTransition(
                f"a failed login of user {self.id} dated {at.isoformat()} is before the "
                f"account's latest event ({self.modified_on.isoformat()})"
            )
        self._record(self.LoginFailed, meta, reason=reason, timestamp=at)

    def second_factor_locked_until(self, now: datetime) -> datetime | None:
        """Until when this account's codes are refused (None: they are not): the
        :data:`MAX_SECOND_FACTOR_FAILURES` latest wrong ones all fell within
        :data:`SECOND_FACTOR_WINDOW` of now. A holder of the password could otherwise guess
        codes at the login rate, and hit one of the three a step accepts in days."""
        failures = getattr(self, "second_factor_failures", [])
        if len(failures) < MAX_SECOND_FACTOR_FAILURES:
            return None
        until = failures[-MAX_SECOND_FACTOR_FAILURES] + SECOND_FACTOR_WINDOW
        return until if until > now else None


class Session(IdentityAggregate):
    """One sign-in: the chain of refresh tokens it handed out, only as digests.

    Presenting the current token rotates it; presenting an earlier (spent) one means two parties
    hold the chain, so the whole session is revoked (OAuth 2.0 Security BCP, refresh token
    rotation). ``expires_at`` bounds the session however often it is refreshed.
    """

    if TYPE_CHECKING:
        user_id: UUID
        current_hash: str
        spent_hashes: list[str]
        expires_at: datetime
        revoked: bool

    class Started(IdentityAggregate.Created):
        user_id: UUID
        token_hash: str
        expires_at: str

        def apply(self, aggregate: Session) -> None:
            aggregate.user_id = self.user_id
            aggregate.current_hash = self.token_hash
            aggregate.spent_hashes = []
            aggregate.expires_at = datetime.fromisoformat(self.expires_at)
            aggregate.revoked = False

    class Rotated(IdentityAggregate.Event):
        token_hash: str

        def apply(self, aggregate: Session) -> None:
            # In place: a command is handed its own copy of the session (the repository copies
            # what it caches), and a new list per event made a long session's fold quadratic.
            aggregate.spent_hashes.append(aggregate.current_hash)
            aggregate.current_hash = self.token_hash

    class Revoked(IdentityAggregate.Event):
        reason: str

        def apply(self, aggregate: Session) -> None:
            aggregate.revoked = True

    @classmethod
    def start(
        cls,
        *,
        session_id: UUID,
        user_id: UUID,
        token_hash: str,
        expires_at: datetime,
        meta: EventMeta,
    ) -> Session:
        return cls._create(
            cls.Started,
            id=session_id,
            user_id=user_id,
            token_hash=token_hash,
            expires_at=instant_text(expires_at, what="expires_at"),
            meta=meta.as_dict(),
        )

    def rotate(
        self,
        presented_hash: str,
        new_hash: str,
        *,
        now: datetime,
        most: int | None = None,
        meta: EventMeta,
    ) -> bool:
        """Rotate on the current token. Returns False (after revoking, for a spent token) when
        the presented token may not refresh; the caller answers 401 after saving. ``most``: how
        many tokens the session hands out before its holder must log in again (it keeps every
        one it spent, to know one presented again, so that list is bounded too)."""
        if self.revoked or now >= self.expires_at:
            return False
        if presented_hash == self.current_hash:
            if most is not None and len(self.spent_hashes) + 1 >= most:
                return False
            self._record(self.Rotated, meta, token_hash=new_hash)
            return True
        if presented_hash in self.spent_hashes:
            self._record(self.Revoked, meta, reason="a spent refresh token was presented again")
        return False

    def revoke(self, reason: str, *, meta: EventMeta) -> None:
        if not self.revoked:
            self._record(self.Revoked, meta, reason=reason)

    def outlived_password(self, user: User) -> bool:
        """Whether this session began before its user's last password change: a new password
        signs every earlier session out (whoever knew the old one may hold one of them)."""
        changed: datetime | None = getattr(user, "password_changed_at", None)
        return changed is not None and self.created_on <= changed

    def holds(self, presented_hash: str) -> bool:
        return presented_hash == self.current_hash or presented_hash in self.spent_hashes


def oidc_link_id(issuer: str, subject: str) -> UUID:
    """The id of the link of an identity provider's subject: stable per (issuer, subject)."""
    return uuid5(_EMAIL_NAMESPACE, f"oidc\n{issuer}\n{subject}")


class OidcLink(IdentityAggregate):
    """Which user an identity provider's (issuer, subject) signs in as. Created once."""

    if TYPE_CHECKING:
        issuer: str
        subject: str
        user_id: UUID

    class Linked(IdentityAggregate.Created):
        issuer: str
        subject: str
        user_id: UUID

        def apply(self, aggregate: OidcLink) -> None:
            aggregate.issuer = self.issuer
            aggregate.subject = self.subject
            aggregate.user_id = self.user_id

    @classmethod
    def link(cls, *, issuer: str, subject: str, user_id: UUID, meta: EventMeta) -> OidcLink:
        return cls._create(
            cls.Linked,
            id=oidc_link_id(issuer, subject),
            issuer=issuer,
            subject=subject,
            user_id=user_id,
            meta=meta.as_dict(),
        )
