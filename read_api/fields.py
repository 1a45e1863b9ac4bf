"""Typed versions of strawberry's field decorators that take a description.

``strawberry.field(description=...)`` used as a decorator is typed ``Any`` upstream, which makes
mypy --strict call every such resolver untyped; these wrappers keep the resolver's type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import strawberry

F = TypeVar("F", bound=Callable[..., Any])


def field(description: str) -> Callable[[F], F]:
    def decorate(resolver: F) -> F:
        return cast("F", strawberry.field(resolver, description=description))

    return decorate


def mutation(description: str) -> Callable[[F], F]:
    def decorate(resolver: F) -> F:
        return cast("F", strawberry.mutation(resolver, description=description))

    return decorate


def subscription(description: str) -> Callable[[F], F]:
    def decorate(resolver: F) -> F:
        return cast("F", strawberry.subscription(resolver, description=description))

    return decorate
