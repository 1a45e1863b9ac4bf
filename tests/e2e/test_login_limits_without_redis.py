"""Sign-in limits hold while Redis is away: each API process counts for itself until Redis
answers again, then the shared counts are used again.

Until then a Redis that refused connections or went silent let every request through, so a
password guesser had unlimited tries during an outage. Redis here sits behind a proxy of the
test's own (``redis_proxy``) that refuses or goes silent; the limits are the defaults of
``AuthSettings`` (10 logins a minute per account, 30 per address)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import httpx
import pytest
import redis
from e2e_stack import StackBuilder
from rate_windows import clear_of_a_window_end
from redis_proxy import SilentServer, proxy_to

from read_api.services import AuthSettings

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"
PER_ACCOUNT = AuthSettings.__dataclass_fields__["login_per_account_per_minute"].default


@pytest.fixture
def proxy(redis_url: str) -> Iterator[SilentServer]:
    with proxy_to(redis_url) as server:
        yield server


def _login(http: httpx.Client, password: str) -> tuple[int, str | None]:
    answer = http.post("/auth/login", json={"email": "guessed@example.com", "password": password})
    return answer.status_code, (answer.json().get("error") or {}).get("code")


@pytest.mark.parametrize("away", ["refuse", "silence"])
def test_wrong_logins_past_the_limit_are_refused_while_redis_is_away(
    database_url: str, redis_url: str, proxy: SilentServer, away: str
) -> None:
    stacks = StackBuilder(proxy.url)
    try:
        stack = stacks.build(database_url, broadcaster="redis", auth={})
        clear_of_a_window_end(margin=30)
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            answer = http.post(
                "/auth/signup",
                json={"email": "guessed@example.com", "password": PASSWORD, "name": "Ada"},
            )
            assert answer.status_code == 201, answer.text
            getattr(proxy, away)()
            guesses = [_login(http, "wrong guess") for _ in range(PER_ACCOUNT + 1)]
            proxy.resume()
            # Back on Redis, which counted none of them: the right password signs in (counted
            # in this process it would be refused), once the limiter asks Redis again.
            back = [_login(http, PASSWORD)]
            while back[-1] != (200, None) and len(back) < 100:
                time.sleep(0.05)  # the limiter asks Redis again up to a second after it failed
                back.append(_login(http, PASSWORD))
    finally:
        stacks.close()

    assert guesses == [(401, "UNAUTHENTICATED")] * PER_ACCOUNT + [(429, "RATE_LIMITED")]
    assert back[-1] == (200, None)
    assert set(back[:-1]) <= {(429, "RATE_LIMITED")}
    with redis.Redis.from_url(redis_url) as shared:
        assert shared.keys("*:auth:login-account:*"), "the login after Redis was back not counted"
