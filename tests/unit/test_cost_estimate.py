"""How the cost limit estimates a document: objects it may return, at the page sizes asked."""

from __future__ import annotations

from graphql import OperationDefinitionNode, parse

from read_api.limits import DEFAULT_PAGE, UNPAGED_LIST, _cost


def cost(document: str, **variables: int) -> int:
    operation = parse(document).definitions[0]
    assert isinstance(operation, OperationDefinitionNode)
    return _cost(operation.selection_set, {}, variables, multiplier=1, depth=0)


def test_scalars_and_connection_wrappers_add_no_objects() -> None:
    bare = cost("{ board(projectId: 1) { lanes { cards { edges { node { id } } } } } }")
    wide = cost(
        "{ board(projectId: 1) { lanes { name count cards { edges { cursor node {"
        " id title lane position labels version } } } } } }"
    )

    lanes = UNPAGED_LIST
    assert bare == wide == 1 + lanes + lanes * DEFAULT_PAGE["cards"]


def test_page_info_comes_once_per_connection_not_once_per_item() -> None:
    without = cost("{ board(projectId: 1) { lanes { cards { edges { node { id } } } } } }")
    with_page_info = cost(
        "{ board(projectId: 1) { lanes { cards { pageInfo { hasNextPage }"
        " edges { node { id } } } } } }"
    )

    assert with_page_info - without == UNPAGED_LIST


def test_the_page_size_asked_sets_the_cost_literal_or_variable() -> None:
    small = cost("{ board(projectId: 1) { lanes { cards(first: 5) { edges { node { id } } } } } }")
    by_variable = cost(
        "query($n: Int) { board(projectId: 1) { lanes { cards(first: $n) {"
        " edges { node { id } } } } } }",
        n=5,
    )

    assert small == by_variable == 1 + UNPAGED_LIST + UNPAGED_LIST * 5


def test_nested_pages_multiply() -> None:
    runs = cost(
        "{ board(projectId: 1) { lanes { cards(first: 200) { edges { node {"
        " runs(first: 200) { edges { node { id } } } } } } } } }"
    )

    assert runs > UNPAGED_LIST * 200 * 200
