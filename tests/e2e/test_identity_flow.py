"""Signing in as a single-page app does it, over HTTP: sign up, log in, refresh, MFA, log out.

TOTP codes are computed by the RFC 6238 algorithm itself (HMAC-SHA-1, dynamic truncation, in
``credentials.rfc6238``), not by the library the server uses.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from api_client import first_change, subscribe
from credentials import rfc6238
from e2e_stack import Stack, StackBuilder
from undecodable import plant_renamed

PASSWORD = "correct horse battery"
ME = "{ me { id email name mfaEnabled workspaces { id name role } } }"


#: Every test here signs in from 127.0.0.1: the per-address limit has its own test below.
AUTH_SETTINGS = {"login_per_address_per_minute": 10_000}


def signup(http: httpx.Client, email: str, name: str = "Ada") -> str:
    answer = http.post("/auth/signup", json={"email": email, "password": PASSWORD, "name": name})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["userId"])


def login(http: httpx.Client, email: str, **extra: Any) -> httpx.Response:
    return http.post("/auth/login", json={"email": email, "password": PASSWORD, **extra})


def signed_in(http: httpx.Client, email: str) -> dict[str, Any]:
    """A new account's first session: the login's answer."""
    signup(http, email)
    answer = login(http, email)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def error_of(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["error"]["code"]


def graphql(
    http: httpx.Client, token: str, query: str, *, after: str | None = None, **variables: Any
) -> dict[str, Any]:
    """``after``: a consistencyToken the read must include."""
    headers = {"Authorization": f"Bearer {token}"}
    if after is not None:
        headers["X-Consistency-Token"] = after
    answer = http.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_sign_up_log_in_refresh_reuse_and_log_out(http: httpx.Client, auth_stack: Stack) -> None:
    user_id = signup(http, "Ada.Lovelace@Example.com")
    assert error_of(
        http.post("/auth/signup", json={"email": "ada.lovelace@example.COM", "password": PASSWORD,
                                        "name": "Eve"})
    ) == (409, "DUPLICATE")  # fmt: skip
    assert error_of(
        http.post("/auth/signup", json={"email": "nope", "password": PASSWORD, "name": "X"})
    ) == (400, "VALIDATION")
    assert error_of(
        http.post("/auth/signup", json={"email": "x@example.com", "password": "short", "name": "X"})
    ) == (400, "VALIDATION")

    wrong = http.post(
        "/auth/login", json={"email": "ada.lovelace@example.com", "password": "not the password"}
    )
    unknown = login(http, "nobody@example.com")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["error"]["code"] == "UNAUTHENTICATED"

    first = login(http, "ADA.LOVELACE@example.com")
    assert first.status_code == 200, first.text
    session = first.json()
    assert session["user"] == {"id": user_id, "email": "ada.lovelace@example.com", "name": "Ada"}
    assert session["expiresIn"] == 900
    cookie = first.headers["set-cookie"]
    assert cookie.startswith(f"aw_refresh={session['refreshToken']}")
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert "Secure" not in cookie  # a dev stack; build_auth sets Secure outside dev

    # The access token is a user token: it creates a workspace and then acts in it.
    token = session["accessToken"]
    created = graphql(
        http, token,
        "mutation($n: String!) { createWorkspace(input: {name: $n}) { workspace { id } } }",
        n="Ada's",
    )  # fmt: skip
    assert "errors" not in created, created
    workspace_id = created["data"]["createWorkspace"]["workspace"]["id"]
    project = graphql(
        http, token,
        "mutation($w: ID!) { createProject(input: {workspaceId: $w, name: \"P\","
        " lanes: [{name: \"Todo\"}]}) { project { id workspaceId } } }",
        w=workspace_id,
    )  # fmt: skip
    assert "errors" not in project, project
    seen = graphql(http, token, "query($w: ID!) { workspace(id: $w) { name } }", w=workspace_id)
    assert seen["data"]["workspace"] == {"name": "Ada's"}
    project_id = project["data"]["createProject"]["project"]["id"]
    assert project["data"]["createProject"]["project"]["workspaceId"] == workspace_id
    card = graphql(
        http, token,
        "mutation($p: ID!) { createCard(input: {projectId: $p, title: \"T\"})"
        " { card { id lane } } }",
        p=project_id,
    )  # fmt: skip
    assert card["data"]["createCard"]["card"]["lane"] == "Todo", card
    board = graphql(
        http, token, "query($p: ID!) { board(projectId: $p) { lanes { name count } } }",
        p=project_id,
    )  # fmt: skip
    assert board["data"]["board"]["lanes"] == [{"name": "Todo", "count": 1}]
    # Subscriptions too: the board's changes reach a user token's WebSocket.
    with subscribe(
        auth_stack.ws_url, token,
        "subscription($p: ID!) { boardChanged(projectId: $p) { kind card { title } } }",
        {"p": project_id},
    ) as changes:  # fmt: skip
        live = first_change(changes, lambda: graphql(
            http, token,
            "mutation($p: ID!) { createCard(input: {projectId: $p, title: \"Live\"})"
            " { card { id } } }",
            p=project_id,
        ))  # fmt: skip
        assert live["data"]["boardChanged"]["card"] == {"title": "Live"}

    # A colleague added by user id acts there at their membership's role, and sees it in `me`.
    colleague_id = signup(http, "charles@example.com", "Charles")
    colleague = login(http, "charles@example.com").json()["accessToken"]
    assert graphql(http, colleague, ME)["data"]["me"]["workspaces"] == []
    added = graphql(
        http, token,
        "mutation($w: ID!, $u: ID!) { addMember(input: {workspaceId: $w, userId: $u,"
        " role: VIEWER}) { consistencyToken } }",
        w=workspace_id, u=colleague_id,
    )  # fmt: skip
    assert "errors" not in added, added
    written = added["data"]["addMember"]["consistencyToken"]
    me = graphql(http, colleague, ME, after=written)["data"]["me"]
    assert me == {
        "id": colleague_id, "email": "charles@example.com", "name": "Charles",
        "mfaEnabled": False,
        "workspaces": [{"id": workspace_id, "name": "Ada's", "role": "VIEWER"}],
    }  # fmt: skip
    refused = graphql(
        http, colleague,
        "mutation($w: ID!) { createProject(input: {workspaceId: $w, name: \"Q\","
        " lanes: [{name: \"Todo\"}]}) { project { id } } }",
        w=workspace_id,
    )  # fmt: skip
    assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    stranger = graphql(
        http, colleague, "query($w: ID!) { workspace(id: $w) { name } }",
        w="00000000-0000-0000-0000-00000000000f",
    )  # fmt: skip
    assert stranger["data"]["workspace"] is None
    signup(http, "mallory@example.com", "Mallory")  # a user who is no member there
    mallory = login(http, "mallory@example.com").json()["accessToken"]
    hidden = graphql(
        http, mallory, "query($p: ID!) { board(projectId: $p) { version } }", p=project_id
    )
    assert hidden["data"]["board"] is None

    # Refresh from the body, then from the cookie alone; each spends the token it got.
    second = http.post("/auth/refresh", json={"refreshToken": session["refreshToken"]})
    assert second.status_code == 200, second.text
    assert second.json()["refreshToken"] != session["refreshToken"]
    http.cookies.clear()
    http.cookies.set("aw_refresh", second.json()["refreshToken"], path="/auth")
    third = http.post("/auth/refresh")
    assert third.status_code == 200, third.text
    http.cookies.clear()

    # A spent token presented again: the whole session is revoked, the newest token too.
    reuse = http.post("/auth/refresh", json={"refreshToken": session["refreshToken"]})
    assert error_of(reuse) == (401, "UNAUTHENTICATED")
    newest = http.post("/auth/refresh", json={"refreshToken": third.json()["refreshToken"]})
    assert error_of(newest) == (401, "UNAUTHENTICATED")

    # Logging out ends that session only.
    other = login(http, "ada.lovelace@example.com").json()
    kept = login(http, "ada.lovelace@example.com").json()
    assert (
        http.post("/auth/logout", json={"refreshToken": other["refreshToken"]}).status_code == 204
    )
    gone = http.post("/auth/refresh", json={"refreshToken": other["refreshToken"]})
    assert error_of(gone) == (401, "UNAUTHENTICATED")
    assert (
        http.post("/auth/refresh", json={"refreshToken": kept["refreshToken"]}).status_code == 200
    )


def test_mfa_enrol_confirm_and_log_in_with_codes(
    http: httpx.Client, auth_stack: Stack, capfd: pytest.CaptureFixture[str]
) -> None:
    signup(http, "grace@example.com", "Grace")
    token = login(http, "grace@example.com").json()["accessToken"]
    auth = {"Authorization": f"Bearer {token}"}
    assert error_of(http.post("/auth/mfa/enroll")) == (401, "UNAUTHENTICATED")
    workspace_token = auth_stack.token("grace", "00000000-0000-0000-0000-000000000001")
    assert error_of(
        http.post("/auth/mfa/enroll", headers={"Authorization": f"Bearer {workspace_token}"})
    ) == (403, "FORBIDDEN")

    enrolled = http.post("/auth/mfa/enroll", headers=auth)
    assert enrolled.status_code == 200, enrolled.text
    secret = enrolled.json()["secret"]
    assert enrolled.json()["otpauthUri"].startswith("otpauth://totp/")
    bad = http.post("/auth/mfa/confirm", headers=auth, json={"code": "12345"})
    assert error_of(bad) == (400, "VALIDATION")
    confirmed = http.post(
        "/auth/mfa/confirm", headers=auth, json={"code": rfc6238(secret, time.time())}
    )
    assert confirmed.status_code == 200, confirmed.text
    recovery = confirmed.json()["recoveryCodes"]
    assert len(recovery) == 10

    assert error_of(login(http, "grace@example.com")) == (401, "MFA_REQUIRED")
    near = {rfc6238(secret, time.time() + drift) for drift in (-30, 0, 30)}
    wrong_code = next(f"{n:06d}" for n in range(10) if f"{n:06d}" not in near)
    assert error_of(login(http, "grace@example.com", totp=wrong_code)) == (401, "MFA_REQUIRED")
    # The confirming code spent the current step: the next step's code (one step of drift).
    code = rfc6238(secret, time.time() + 30)
    with_code = login(http, "grace@example.com", totp=code)
    assert with_code.status_code == 200, with_code.text
    assert error_of(login(http, "grace@example.com", totp=code)) == (401, "MFA_REQUIRED")
    assert login(http, "grace@example.com", totp=recovery[0]).status_code == 200
    assert error_of(login(http, "grace@example.com", totp=recovery[0])) == (401, "MFA_REQUIRED")
    # A wrong password is never told that MFA is on.
    wrong = http.post(
        "/auth/login",
        json={"email": "grace@example.com", "password": "not the password", "totp": recovery[1]},
    )
    assert error_of(wrong) == (401, "UNAUTHENTICATED")

    assert (
        http.post("/auth/mfa/disable", headers=auth, json={"code": recovery[1]}).status_code == 204
    )
    assert login(http, "grace@example.com").status_code == 200

    # Nothing secret is in the event log in the clear.
    with psycopg.connect(auth_stack.database_url) as conn:
        stored = b"".join(row[0] for row in conn.execute("SELECT state FROM agentworks_events"))
        topics = [row[0] for row in conn.execute("SELECT topic FROM agentworks_events")]
    for plain in [PASSWORD, secret, *recovery, with_code.json()["refreshToken"].split(".")[1]]:
        assert plain.encode() not in stored
    assert any(t.endswith("User.LoginFailed") for t in topics)
    assert any(t.endswith("User.LoginSucceeded") for t in topics)

    # Nor in anything the server logged while this test ran (its threads write here).
    out, err = capfd.readouterr()
    logged = out + err
    assert "auth.refused" in logged or "graphql.request" in logged  # the capture saw the server
    for plain in [PASSWORD, "not the password", secret, *recovery, token]:
        assert plain not in logged


def test_bad_bodies_are_validation_errors(http: httpx.Client) -> None:
    assert error_of(http.post("/auth/login", content=b"{nope")) == (400, "VALIDATION")
    assert error_of(http.post("/auth/login", json=[1])) == (400, "VALIDATION")
    assert error_of(http.post("/auth/login", json={"email": 3, "password": PASSWORD})) == (
        400,
        "VALIDATION",
    )
    assert error_of(http.post("/auth/refresh", json={})) == (401, "UNAUTHENTICATED")
    assert error_of(http.post("/auth/refresh", json={"refreshToken": "x.y"})) == (
        401,
        "UNAUTHENTICATED",
    )


@pytest.mark.parametrize(
    ("method", "path", "status", "named"),
    [
        ("GET", "/auth/refresh", 405, "POST"),
        ("PUT", "/auth/login", 405, "POST"),
        ("POST", "/auth/mfa", 404, "/auth/mfa"),
    ],
)
def test_a_route_or_method_sign_in_has_not_answers_in_its_error_shape(
    http: httpx.Client, method: str, path: str, status: int, named: str
) -> None:
    """The SPA's sign-in client reads ``{"error": {code, message}}`` from every /auth answer;
    a wrong method or path under /auth answered GraphQL's ``{"errors": [...]}``, saying only
    'Method Not Allowed' or 'Not Found'."""
    answer = http.request(method, path)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["code"] == ("NOT_FOUND" if status == 404 else "VALIDATION")
    assert f"{method} {path}" in error["message"], error
    assert named in error["message"], error
    if status == 405:
        assert answer.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "media", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b"]
)
def test_a_body_an_html_form_could_send_is_refused(http: httpx.Client, media: str) -> None:
    """Any type was read as JSON, so another site's HTML form (text/plain, with its fields laid
    out to make a JSON object) could sign its visitor in to the other site's account: a form
    asks no CORS preflight, and the answer's top-level navigation stored the aw_refresh cookie,
    which the victim's app then refreshed with (login CSRF). Bodies must be JSON (415)."""
    email = f"formed-{media.split('/')[1][:5]}@example.com"
    signup(http, email)
    body = json.dumps({"email": email, "password": PASSWORD})
    answer = http.post("/auth/login", content=body, headers={"Content-Type": media})
    assert error_of(answer) == (415, "VALIDATION")
    assert "set-cookie" not in answer.headers
    assert login(http, email).status_code == 200  # JSON, as ever
    refreshed = http.post("/auth/refresh")  # no body: the cookie alone, no type needed
    assert refreshed.status_code == 200, refreshed.text


def test_text_no_json_client_can_encode_is_refused_not_a_server_error(
    http: httpx.Client,
) -> None:
    """A lone surrogate (a ``\\ud800`` escape) has no UTF-8 form: hashing or looking it up
    crashed (HTTP 500) until every /auth body field was checked at the edge."""
    signup(http, "surrogate@example.com")
    token = login(http, "surrogate@example.com").json()["accessToken"]
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    bad = "x\ud800" * 6
    session = "0" * 32
    cases: list[tuple[str, dict[str, str], int, str]] = [
        ("/auth/signup", {"email": f"{bad}@example.com", "password": PASSWORD, "name": "X"},
         400, "VALIDATION"),
        ("/auth/signup", {"email": "new@example.com", "password": bad, "name": "X"},
         400, "VALIDATION"),
        ("/auth/signup", {"email": "new@example.com", "password": PASSWORD, "name": bad},
         400, "VALIDATION"),
        ("/auth/login", {"email": f"{bad}@example.com", "password": PASSWORD},
         400, "VALIDATION"),
        ("/auth/login", {"email": "surrogate@example.com", "password": bad},
         400, "VALIDATION"),
        ("/auth/refresh", {"refreshToken": f"{session}.{bad}"}, 401, "UNAUTHENTICATED"),
    ]  # fmt: skip
    for path, body, status, code in cases:
        answer = http.post(path, content=json.dumps(body))  # json.dumps escapes it as \ud800
        assert error_of(answer) == (status, code), (path, body, answer.text)
    logout = http.post("/auth/logout", content=json.dumps({"refreshToken": f"{session}.{bad}"}))
    assert logout.status_code == 204, logout.text
    for path, body in [
        ("/auth/mfa/confirm", {"code": bad}),
        ("/auth/password", {"currentPassword": PASSWORD, "newPassword": bad}),
    ]:
        answer = http.post(path, content=json.dumps(body), headers=auth)
        assert error_of(answer) == (400, "VALIDATION"), (path, answer.text)


#: Addresses no mail system routes, which display as another (or as nothing different): C0,
#: DEL and C1 controls, a bidi override, a zero-width space.
UNSEEN_IN_ADDRESSES = {
    "c0": "s7\x01@example.com",
    "del": "s7\x7f@example.com",
    "c1": "s7\x9b@example.com",
    "bidi-override": "s7\u202e@example.com",
    "zero-width-space": "s7\u200b@example.com",
}


@pytest.mark.parametrize("email", UNSEEN_IN_ADDRESSES.values(), ids=UNSEEN_IN_ADDRESSES.keys())
def test_an_address_with_control_or_invisible_characters_is_refused(
    http: httpx.Client, email: str
) -> None:
    answer = http.post("/auth/signup", json={"email": email, "password": PASSWORD, "name": "S"})
    assert error_of(answer) == (400, "VALIDATION"), answer.text
    assert answer.json()["error"]["message"].startswith("email "), answer.text
    # Nothing was made: a login finds no account.
    assert error_of(login(http, email)) == (401, "UNAUTHENTICATED")


@pytest.mark.parametrize("blank", [" " * 12, "\t\n \u3000\u00a0" * 3], ids=["spaces", "mixed"])
def test_a_password_of_white_space_alone_is_refused_wherever_one_is_set(
    http: httpx.Client, blank: str
) -> None:
    email = f"blank-{len(blank)}@example.com"
    refused = http.post("/auth/signup", json={"email": email, "password": blank, "name": "B"})
    assert error_of(refused) == (400, "VALIDATION"), refused.text
    assert refused.json()["error"]["message"].startswith("password "), refused.text
    assert error_of(login(http, email)) == (401, "UNAUTHENTICATED")  # no account was made

    token = signed_in(http, email)["accessToken"]
    changed = http.post(
        "/auth/password",
        headers={"Authorization": f"Bearer {token}"},
        json={"currentPassword": PASSWORD, "newPassword": blank},
    )
    assert error_of(changed) == (400, "VALIDATION"), changed.text
    assert login(http, email).status_code == 200  # the password is still the old one


@contextmanager
def limited_client(
    database_url: str, redis_url: str, *, per_account: int = 3, per_address: int = 10_000,
    **build: Any,
) -> Iterator[httpx.Client]:  # fmt: skip
    """A client of an API of its own whose sign-in limits are ``per_account`` and
    ``per_address`` a minute, used within one fixed one-minute window of theirs."""
    limits = {"login_per_account_per_minute": per_account,
              "login_per_address_per_minute": per_address}  # fmt: skip
    stacks = StackBuilder(redis_url)
    try:
        stack = stacks.build(database_url, auth=limits, **build)
        if time.time() % 60 > 50:
            time.sleep(60 - time.time() % 60)
        with httpx.Client(base_url=stack.url, timeout=15.0) as http:
            yield http
    finally:
        stacks.close()


def test_logins_are_limited_per_account_and_per_address(
    module_database_url: str, redis_url: str
) -> None:
    with limited_client(module_database_url, redis_url, per_address=6, broadcaster="redis") as http:
        signup(http, "target@example.com")
        for _ in range(3):
            assert error_of(
                http.post("/auth/login", json={"email": "TARGET@example.com", "password": "guess"})
            ) == (401, "UNAUTHENTICATED")
        limited = login(http, "target@example.com")  # even the right password now
        assert error_of(limited) == (429, "RATE_LIMITED")
        assert int(limited.headers["retry-after"]) >= 1
        answers = [error_of(login(http, f"other{i}@example.com"))[0] for i in range(3)]
        assert answers[-1] == 429  # six attempts from this address in the window


def test_an_account_locked_by_wrong_guesses_still_signs_in_on_its_known_devices(
    module_database_url: str, redis_url: str
) -> None:
    """Anyone who knows an address could lock its account: wrong passwords past the account's
    limit made its owner's right one answer 429 too, for as long as they kept guessing. A browser
    that signed in to the account before holds a device cookie, and its logins count against
    that device's limit instead of the account's (OWASP's device cookies); guesses without one
    still meet the account's limit."""
    with limited_client(module_database_url, redis_url) as owner:
        signed_in(owner, "kept@example.com")
        assert owner.cookies.get("aw_device")
        with httpx.Client(base_url=owner.base_url, timeout=15.0) as guesser:
            for _ in range(2):  # the owner's login was the account's first of 3 this minute
                wrong = {"email": "kept@example.com", "password": "guess"}
                assert error_of(guesser.post("/auth/login", json=wrong)) == (401, "UNAUTHENTICATED")
            assert error_of(login(guesser, "kept@example.com")) == (429, "RATE_LIMITED")
            # A device cookie of another account, or a made-up one, is no way round the limit.
            signed_in(guesser, "guesser@example.com")
            assert error_of(login(guesser, "kept@example.com")) == (429, "RATE_LIMITED")
            guesser.cookies.set("aw_device", "v1.made-up.0000", path="/auth/login")
            assert error_of(login(guesser, "kept@example.com")) == (429, "RATE_LIMITED")
        assert login(owner, "kept@example.com").status_code == 200
        # The known device is limited too, on its own count.
        for _ in range(2):
            wrong = {"email": "kept@example.com", "password": "guess"}
            assert error_of(owner.post("/auth/login", json=wrong)) == (401, "UNAUTHENTICATED")
        assert error_of(login(owner, "kept@example.com")) == (429, "RATE_LIMITED")


def test_guessing_codes_to_turn_mfa_off_is_limited_like_logins(
    module_database_url: str, redis_url: str
) -> None:
    """/auth/mfa/disable checks a TOTP code like a login does, but was not limited: whoever holds
    an access token could try codes until one of the three in force matched."""
    with limited_client(module_database_url, redis_url) as http:
        token = signed_in(http, "guessed@example.com")["accessToken"]
        auth = {"Authorization": f"Bearer {token}"}
        secret = http.post("/auth/mfa/enroll", headers=auth).json()["secret"]
        confirmed = http.post(
            "/auth/mfa/confirm", headers=auth, json={"code": rfc6238(secret, time.time())}
        )
        assert confirmed.status_code == 200, confirmed.text
        near = {rfc6238(secret, time.time() + drift) for drift in (-30, 0, 30, 60)}
        wrong = [f"{n:06d}" for n in range(10) if f"{n:06d}" not in near]
        for code in wrong[:3]:
            answer = http.post("/auth/mfa/disable", headers=auth, json={"code": code})
            assert error_of(answer) == (401, "MFA_REQUIRED")
        limited = http.post("/auth/mfa/disable", headers=auth, json={"code": wrong[3]})
        assert error_of(limited) == (429, "RATE_LIMITED")
        assert int(limited.headers["retry-after"]) >= 1


def test_guessing_the_current_password_is_limited_per_account_like_logins(
    module_database_url: str, redis_url: str
) -> None:
    """/auth/password checks the current password, but only per address: whoever holds an access
    token could guess the password from many addresses past the account's login limit."""
    with limited_client(module_database_url, redis_url) as http:
        token = signed_in(http, "guessed-password@example.com")["accessToken"]
        auth = {"Authorization": f"Bearer {token}"}
        for i in range(3):
            guess = {"currentPassword": f"guess number {i}", "newPassword": "a new password!"}
            answer = http.post("/auth/password", headers=auth, json=guess)
            assert error_of(answer) == (401, "UNAUTHENTICATED")
        right = {"currentPassword": PASSWORD, "newPassword": "a new password!"}
        limited = http.post("/auth/password", headers=auth, json=right)
        assert limited.status_code == 429, limited.status_code
        assert error_of(limited) == (429, "RATE_LIMITED")


def test_an_accounts_refreshes_are_limited_like_its_logins(
    module_database_url: str, redis_url: str
) -> None:
    """Every refresh is a write: a holder of a refresh token could rotate it as fast as it can
    send (a client needs one refresh per access token lifetime), and only failed refreshes
    counted against anything. Counted per session, the account's writes still grew with its
    sessions: each login (10 a minute) made one more, each refreshable 10 times a minute for its
    30 days. They count per account now, whichever session refreshes."""
    with limited_client(module_database_url, redis_url) as http:
        token = signed_in(http, "refresher@example.com")["refreshToken"]
        other = login(http, "refresher@example.com").json()["refreshToken"]
        for _ in range(3):
            answer = http.post("/auth/refresh", json={"refreshToken": token})
            assert answer.status_code == 200, answer.text
            token = answer.json()["refreshToken"]
        for spent in (token, other):
            limited = http.post("/auth/refresh", json={"refreshToken": spent})
            assert error_of(limited) == (429, "RATE_LIMITED")
            assert int(limited.headers["retry-after"]) >= 1


def test_refreshes_with_a_wrong_secret_do_not_spend_the_sessions_refreshes(
    module_database_url: str, redis_url: str
) -> None:
    """A session's refreshes were counted before its token was checked, so anyone who knew a
    session's id (it is in the refresh token before the dot, and in the sign-ins an audit
    export shows) could spend its refreshes with made-up secrets and keep its holder from
    refreshing. Only refreshes that rotate count now; wrong ones count against the address."""
    with limited_client(module_database_url, redis_url) as http:
        session = signed_in(http, "refreshed@example.com")["refreshToken"]
        session_id = session.split(".")[0]
        for _ in range(4):
            forged = http.post("/auth/refresh", json={"refreshToken": f"{session_id}.forged"})
            assert error_of(forged) == (401, "UNAUTHENTICATED")
        answer = http.post("/auth/refresh", json={"refreshToken": session})
        assert answer.status_code == 200, answer.text


def test_a_refresh_reads_its_session_once(
    http: httpx.Client, auth_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh read its session three times: once to count it against the session's account
    (before anything is written), again to rotate it, and again after. The session read for
    the count is the one rotated (a concurrent change since makes the refresh decide again)."""
    token = signed_in(http, "read-once@example.com")["refreshToken"]
    session_id = UUID(hex=token.split(".")[0])
    repository = auth_stack.write.repository
    get = repository.get
    loads: list[UUID] = []

    def counted(aggregate_id: UUID, **kwargs: Any) -> Any:
        loads.append(aggregate_id)
        return get(aggregate_id, **kwargs)

    monkeypatch.setattr(repository, "get", counted)
    for _ in range(2):
        loads.clear()
        answer = http.post("/auth/refresh", json={"refreshToken": token})
        assert answer.status_code == 200, answer.text
        assert loads.count(session_id) == 1, loads
        token = answer.json()["refreshToken"]


def test_mfa_enrolments_are_limited_like_an_accounts_logins(
    module_database_url: str, redis_url: str
) -> None:
    """Every enrolment is a write (a new pending secret), and anyone may sign up: an account's
    access token could write to the event store as fast as it could send, unbounded by any
    limit. Enrolling and confirming count at the account's sign-in rate."""
    with limited_client(module_database_url, redis_url) as http:
        token = signed_in(http, "enroller@example.com")["accessToken"]
        auth = {"Authorization": f"Bearer {token}"}
        for _ in range(2):
            assert http.post("/auth/mfa/enroll", headers=auth).status_code == 200
        secret = http.post("/auth/mfa/enroll", headers=auth).json()["secret"]
        code = {"code": rfc6238(secret, time.time())}
        limited = http.post("/auth/mfa/confirm", headers=auth, json=code)
        assert error_of(limited) == (429, "RATE_LIMITED")
        assert int(limited.headers["retry-after"]) >= 1
        assert error_of(http.post("/auth/mfa/enroll", headers=auth)) == (429, "RATE_LIMITED")


def test_change_password_over_http(http: httpx.Client) -> None:
    signup(http, "hopper@example.com", "Grace Hopper")
    token = login(http, "hopper@example.com").json()["accessToken"]
    auth = {"Authorization": f"Bearer {token}"}
    wrong = http.post(
        "/auth/password",
        headers=auth,
        json={"currentPassword": "not the password", "newPassword": "a brand new password"},
    )
    assert error_of(wrong) == (401, "UNAUTHENTICATED")
    changed = http.post(
        "/auth/password",
        headers=auth,
        json={"currentPassword": PASSWORD, "newPassword": "a brand new password"},
    )
    assert changed.status_code == 204, changed.text
    assert error_of(login(http, "hopper@example.com")) == (401, "UNAUTHENTICATED")
    renewed = http.post(
        "/auth/login", json={"email": "hopper@example.com", "password": "a brand new password"}
    )
    assert renewed.status_code == 200


def test_an_account_with_an_unreadable_event_answers_undecodable_500_without_ids(
    http: httpx.Client, auth_stack: Stack
) -> None:
    """Logging in to an account whose stored events cannot all be decoded answered 500
    INTERNAL (the decoding error escaped); now 500 UNDECODABLE, naming no id (anyone may try a
    login), while every other account signs in."""
    user_id = signup(http, "unreadable@example.com")
    plant_renamed(auth_stack.write, UUID(user_id))
    answer = login(http, "unreadable@example.com")
    assert error_of(answer) == (500, "UNDECODABLE")
    assert user_id not in answer.text
    signup(http, "readable@example.com")
    assert login(http, "readable@example.com").status_code == 200


@pytest.mark.parametrize("route", ["/auth/refresh", "/auth/logout"])
def test_the_refresh_cookie_is_taken_only_from_the_api_s_own_or_an_allowed_origin(
    http: httpx.Client, auth_stack: Stack, route: str
) -> None:
    """SameSite=Strict keeps other sites' requests from carrying aw_refresh, but not a page of a
    sibling subdomain (same site, another origin) nor a browser that ignores the attribute: a
    body-less POST is a simple request, asks no preflight, and refreshed or logged out the
    visitor's session. A request carrying the cookie from an Origin that is neither the API's
    own nor a CORS-allowed one is refused (403) and changes nothing; a client that sends no
    Origin (no browser) or the token in its body, as before."""
    signed_in(http, f"origin-{route.rsplit('/', 1)[1]}@example.com")
    foreign = http.post(route, headers={"Origin": "https://evil.example"})
    assert error_of(foreign) == (403, "FORBIDDEN")
    assert "set-cookie" not in foreign.headers
    own = str(auth_stack.url).rstrip("/")
    refreshed = http.post("/auth/refresh", headers={"Origin": own})
    assert refreshed.status_code == 200, refreshed.text  # the session was left as it was
    token = refreshed.json()["refreshToken"]
    http.cookies.clear()
    in_body = http.post(route, json={"refreshToken": token}, headers={"Origin": "https://x.test"})
    assert in_body.status_code in (200, 204), in_body.text


def test_two_tabs_refreshing_at_once_stay_signed_in(
    http: httpx.Client, auth_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tabs of the SPA send /auth/refresh with the one aw_refresh cookie, both reading the
    session before either rotates it (held here until both have read): one gets the new token,
    the other CONFLICT, and the session lives on; before, the other revoked it as reuse and
    both tabs were signed out."""
    signed_in(http, "two-tabs@example.com")
    cookie = http.cookies["aw_refresh"]
    identity = auth_stack.services.auth.identity  # type: ignore[union-attr]
    both_read = threading.Barrier(2, timeout=10)
    session_of = identity.session_of

    def read_together(token: str) -> Any:
        session = session_of(token)
        both_read.wait()
        return session

    monkeypatch.setattr(identity, "session_of", read_together)

    def tab(_: int) -> httpx.Response:
        with httpx.Client(base_url=auth_stack.url, timeout=15.0) as one:
            one.cookies.set("aw_refresh", cookie, path="/auth")
            return one.post("/auth/refresh")

    with ThreadPoolExecutor(2) as pool:
        answers = sorted(pool.map(tab, range(2)), key=lambda a: a.status_code)
    monkeypatch.undo()
    assert [a.status_code for a in answers] == [200, 409], [a.text for a in answers]
    assert answers[1].json()["error"]["code"] == "CONFLICT"
    again = http.post("/auth/refresh", json={"refreshToken": answers[0].json()["refreshToken"]})
    assert again.status_code == 200, again.text
