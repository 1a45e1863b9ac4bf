"""A document that is wrong in many places costs as much as one wrong in a few: validation stops
after a few errors, and a document holding more operations than any client sends is refused
before it is validated.

graphql-core answers each unknown field with "Cannot query field ... Did you mean ...?", the
suggestions computed against every field of the type, and stopped only after 100 of them: a
document of a few thousand unknown fields (within the token limit) spent a fifth of a second of
the event loop on them. Each operation of a document is validated, whichever one is run: 800 of
them took half a second.
"""

from __future__ import annotations

from read_api.limits import MAX_OPERATIONS, MAX_VALIDATION_ERRORS
from read_api.schema import build_schema


def test_a_document_wrong_in_thousands_of_places_gets_a_few_errors() -> None:
    document = "{ " + " ".join(f"madeUp{i}" for i in range(3000)) + " }"
    result = build_schema().execute_sync(document)
    errors = result.errors or []
    assert 0 < len(errors) <= MAX_VALIDATION_ERRORS + 1  # and graphql-core's "too many"
    assert all(e.extensions == {"code": "VALIDATION"} for e in errors)
    assert "madeUp0" in errors[0].message


def test_a_document_of_more_operations_than_any_client_sends_is_refused_unvalidated() -> None:
    schema = build_schema()
    many = " ".join(f"query q{i} {{ __typename }}" for i in range(MAX_OPERATIONS + 1))
    refused = schema.execute_sync(many, operation_name="q0")
    assert [e.extensions for e in refused.errors or []] == [{"code": "VALIDATION"}]
    assert f"more than {MAX_OPERATIONS} operations" in (refused.errors or [])[0].message
    enough = " ".join(f"query q{i} {{ __typename }}" for i in range(MAX_OPERATIONS))
    answered = schema.execute_sync(enough, operation_name=f"q{MAX_OPERATIONS - 1}")
    assert answered.errors is None
    assert answered.data == {"__typename": "Query"}
