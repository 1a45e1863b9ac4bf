"""The one path every mutation takes to the write side: input, command, handler, result.

A resolver names its command model and its handler, and shapes only the input fields whose
GraphQL form differs from the command's (enums, Money, user ids, fields left to the command's
default); every other field passes by name. Here, once for all mutations: a command that does
not validate is ``VALIDATION`` (never a handler call), the handler runs on a worker thread as the
caller (``UNAUTHENTICATED`` without a token), in the request's trace, and its domain errors reach
``read_api.errors`` unchanged, which gives them their GraphQL codes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

import pydantic

from commands.models import Command
from domain.errors import ValidationFailed
from read_api.errors import describe_validation_error

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from commands.handlers import Actor, AgentWorks
    from read_api.context import Info

C = TypeVar("C", bound=Command)
R = TypeVar("R")

DEFAULT: Final = object()
"""A shaped field's value meaning "leave it out": the command's own default applies."""


def command_from(kind: type[C], input: DataclassInstance, /, **shaped: object) -> C:
    """``kind`` from the fields of a GraphQL ``input``, ``shaped`` ones replacing theirs."""
    fields = {field.name: getattr(input, field.name) for field in dataclasses.fields(input)}
    fields.update(shaped)
    try:
        return kind(**{name: value for name, value in fields.items() if value is not DEFAULT})
    except pydantic.ValidationError as error:
        raise ValidationFailed(describe_validation_error(error)) from error


async def perform(
    info: Info,
    handler: Callable[[AgentWorks, C, Actor], R],
    kind: type[C],
    input: DataclassInstance,
    /,
    **shaped: object,
) -> R:
    """Build the command, then run ``handler`` on the write side as the caller."""
    command = command_from(kind, input, **shaped)
    ctx = info.context
    return await ctx.offload(handler, ctx.runtime.services.write, command, ctx.actor())


__all__ = ["DEFAULT", "command_from", "perform"]
