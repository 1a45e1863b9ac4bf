"""Fixtures of the end-to-end tests: the whole stack, per module or per test (see e2e_stack)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pg
import pytest
from e2e_stack import MakeStack, Stack, StackBuilder


@pytest.fixture
def make_stack(database_url: str, redis_url: str) -> Iterator[MakeStack]:
    """Stacks of this test's own database, for tests that configure or stop parts of them."""
    stacks = StackBuilder(redis_url)
    yield lambda **options: stacks.build(database_url, **options)
    stacks.close()


@pytest.fixture(scope="module")
def module_database_url(clones: pg.Clones) -> Iterator[str]:
    with clones.database(pg.random_name("aw_e2e_")) as url:
        yield url


@pytest.fixture(scope="module")
def stack(module_database_url: str, redis_url: str) -> Iterator[Stack]:
    """One default stack per test module: tests keep apart by making their own workspaces."""
    stacks = StackBuilder(redis_url)
    yield stacks.build(module_database_url)
    stacks.close()


@pytest.fixture(scope="module")
def auth_stack(
    request: pytest.FixtureRequest, module_database_url: str, redis_url: str
) -> Iterator[Stack]:
    """One stack per test module that serves sign-in (``/auth/*``) too, with the module's
    ``AUTH_SETTINGS`` (a dict of ``AuthSettings`` fields) if it has one."""
    stacks = StackBuilder(redis_url)
    yield stacks.build(module_database_url, auth=dict(getattr(request.module, "AUTH_SETTINGS", {})))
    stacks.close()


@pytest.fixture
def http(auth_stack: Stack) -> Iterator[httpx.Client]:
    """A plain HTTP client of the module's ``auth_stack``."""
    with httpx.Client(base_url=auth_stack.url, timeout=15.0) as client:
        yield client
