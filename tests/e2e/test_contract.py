"""The served schema honours API.md: every type, field and argument there exists, same types."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from graphql import (
    EnumTypeDefinitionNode,
    GraphQLEnumType,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLObjectType,
    GraphQLSchema,
    ObjectTypeDefinitionNode,
    ScalarTypeDefinitionNode,
    parse,
    print_ast,
)

from read_api.schema import build_schema

#: The contract lives beside the repository (``shared/API.md`` next to ``main/``); a copy is
#: kept in ``docs/API.md`` so a clone on its own checks against it too.
SHARED_API_MD = Path(__file__).resolve().parents[3] / "shared" / "API.md"
VENDORED_API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"
API_MD = SHARED_API_MD if SHARED_API_MD.exists() else VENDORED_API_MD


def _contract_sdl() -> str:
    if not API_MD.exists():
        pytest.skip(f"the API contract is at neither {SHARED_API_MD} nor {VENDORED_API_MD}")
    match = re.search(r"```graphql\n(.*?)```", API_MD.read_text(), re.S)
    assert match is not None, "API.md has no graphql block"
    return match.group(1)


def test_every_type_field_and_argument_of_the_contract_is_served() -> None:
    document = parse(_contract_sdl())
    served = build_schema()._schema
    missing: list[str] = []
    for definition in document.definitions:
        name = definition.name.value  # type: ignore[attr-defined]
        ours = served.type_map.get(name)
        if ours is None:
            missing.append(f"type {name}")
            continue
        if isinstance(definition, ScalarTypeDefinitionNode):
            continue
        if isinstance(definition, EnumTypeDefinitionNode):
            assert isinstance(ours, GraphQLEnumType)
            wanted = {value.name.value for value in definition.values or ()}
            assert wanted == set(ours.values), name
            continue
        assert isinstance(definition, ObjectTypeDefinitionNode)
        assert isinstance(ours, GraphQLObjectType), name
        for field in definition.fields or ():
            served_field = ours.fields.get(field.name.value)
            where = f"{name}.{field.name.value}"
            if served_field is None:
                missing.append(where)
                continue
            assert str(served_field.type) == print_ast(field.type), where
            for argument in field.arguments or ():
                served_arg = served_field.args.get(argument.name.value)
                if served_arg is None:
                    missing.append(f"{where}({argument.name.value})")
                    continue
                assert str(served_arg.type) == print_ast(argument.type), where
                if argument.default_value is not None:
                    assert served_arg.default_value == int(print_ast(argument.default_value)), where
    assert missing == []


def _fields_of(schema: GraphQLSchema, name: str) -> dict[str, GraphQLField]:
    named = schema.type_map[name]
    assert isinstance(named, GraphQLObjectType | GraphQLInputObjectType), name
    return dict(named.fields)


def test_payloads_and_connections_have_their_conventional_shape() -> None:
    served = build_schema()._schema
    for payload, field in (
        ("WorkspacePayload", "workspace"),
        ("ProjectPayload", "project"),
        ("CardPayload", "card"),
        ("AgentRunPayload", "run"),
    ):
        fields = _fields_of(served, payload)
        assert str(fields["consistencyToken"].type) == "String!"
        assert field in fields
    for connection in ("CardConnection", "AgentRunConnection", "ActivityConnection"):
        fields = _fields_of(served, connection)
        assert set(fields) >= {"edges", "pageInfo"}
    page_info = _fields_of(served, "PageInfo")
    assert set(page_info) >= {"hasNextPage", "endCursor"}
    for name, mutation in _fields_of(served, "Mutation").items():
        input_type = str(mutation.args["input"].type).rstrip("!")
        assert "commandId" in _fields_of(served, input_type), name
