"""How the cost limit estimates a document: objects it may return, at the page sizes asked, and
the reads (lists, fields resolved by a query) it may make, each costing objects besides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from graphql import OperationDefinitionNode, parse

from domain.errors import ValidationFailed
from read_api import limits
from read_api.limits import DEFAULT_PAGE, READ_COST, UNPAGED_LIST, Estimate, estimate
from read_api.services import QueryLimits

if TYPE_CHECKING:
    from collections.abc import Mapping


def cost(document: str, **variables: int) -> Estimate:
    operation = parse(document).definitions[0]
    assert isinstance(operation, OperationDefinitionNode)
    return estimate(operation, {}, variables)


def test_scalars_and_connection_wrappers_add_no_objects() -> None:
    bare = cost("{ board(projectId: 1) { lanes { cards { edges { node { id } } } } } }")
    wide = cost(
        "{ board(projectId: 1) { lanes { name count cards { edges { cursor node {"
        " id title lane position labels version } } } } } }"
    )

    lanes = UNPAGED_LIST
    assert bare == wide
    assert bare.objects == 1 + lanes + lanes * DEFAULT_PAGE["cards"]


def test_page_info_comes_once_per_connection_not_once_per_item() -> None:
    without = cost("{ board(projectId: 1) { lanes { cards { edges { node { id } } } } } }")
    with_page_info = cost(
        "{ board(projectId: 1) { lanes { cards { pageInfo { hasNextPage }"
        " edges { node { id } } } } } }"
    )

    assert with_page_info.objects - without.objects == UNPAGED_LIST
    assert with_page_info.reads == without.reads


def test_the_page_size_asked_sets_the_cost_literal_or_variable() -> None:
    small = cost("{ board(projectId: 1) { lanes { cards(first: 5) { edges { node { id } } } } } }")
    by_variable = cost(
        "query($n: Int) { board(projectId: 1) { lanes { cards(first: $n) {"
        " edges { node { id } } } } } }",
        n=5,
    )

    assert small == by_variable
    assert small.objects == 1 + UNPAGED_LIST + UNPAGED_LIST * 5


def test_nested_pages_multiply() -> None:
    runs = cost(
        "{ board(projectId: 1) { lanes { cards(first: 200) { edges { node {"
        " runs(first: 200) { edges { node { id } } } } } } } } }"
    )

    assert runs.objects > UNPAGED_LIST * 200 * 200


def test_every_list_read_costs_besides_its_items_however_small_its_page() -> None:
    """A page of one card cost a lane's read as much as a page of five: counted by its objects
    alone, thirty aliased one-card pages of every lane looked cheaper than one page of 100."""
    one = cost("{ board(projectId: 1) { lanes { cards(first: 1) { edges { node { id } } } } } }")
    thirty = cost(
        "{ board(projectId: 1) { lanes { "
        + " ".join(f"c{i}: cards(first: 1) {{ edges {{ node {{ id }} }} }}" for i in range(30))
        + " } } }"
    )

    # The board (a root field), its lanes, and a page of cards in each lane.
    assert one.reads == 1 + 1 + UNPAGED_LIST
    assert thirty.reads - one.reads == 29 * UNPAGED_LIST
    assert thirty.total == thirty.objects + READ_COST * thirty.reads
    assert thirty.total > 30 * one.objects


def test_scalars_resolved_by_a_query_are_reads() -> None:
    plain = cost("{ workspace(id: 1) { name } }")
    spent = cost("{ workspace(id: 1) { name spentThisMonth } }")
    outputs = cost("{ card(id: 1) { runs(first: 10) { edges { node { id output } } } } }")

    assert spent.reads - plain.reads == 1
    assert spent.objects == plain.objects
    # card (root), its runs, and each run's output
    assert outputs.reads == 1 + 1 + 10


def test_the_board_a_spa_draws_at_the_default_page_sizes_is_well_within_the_limit() -> None:
    """lanes x 100 cards x 20 runs, as the SPA asks (tests/e2e/test_query_cost.py)."""
    board = cost(
        "{ board(projectId: 1) { lanes { name count cards { pageInfo { hasNextPage }"
        " edges { cursor node { id title cost lastRun { id status } runs {"
        " pageInfo { hasNextPage } edges { node { id status billed } } } } } } } } }"
    )

    assert board.total < 0.6 * QueryLimits().max_cost


def test_a_list_longer_than_estimated_is_estimated_again_once_per_change_of_lengths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every list without pages past the estimate's 20 makes the document be estimated again
    with the real lengths: a workspace of 300 projects read with each board's lanes estimated
    the whole document 300 times over in one request, where the lengths had changed once. Each
    new set of lengths is estimated once; a refusal still refuses every later read."""
    document = (
        "{ workspace(id: 1) { projects { board { lanes { cards { edges { node { id } } } } } } } }"
    )
    operation = parse(document).definitions[0]
    assert isinstance(operation, OperationDefinitionNode)
    made: list[dict[str, int]] = []

    def counted(*args: Any, lengths: Mapping[str, int], **kwargs: Any) -> Estimate:
        made.append(dict(lengths))
        return estimate(*args, lengths=lengths, **kwargs)

    monkeypatch.setattr(limits, "estimate", counted)
    known: dict[str, int] = {}
    memo: dict[tuple[tuple[str, int], ...], Estimate] = {}

    def read(field: str, length: int, max_cost: int) -> None:
        limits.refuse_longer_than_estimated(
            operation, {}, {}, field=field, length=length, known=known, max_cost=max_cost,
            estimates=memo,
        )  # fmt: skip

    generous = 10**9
    read("projects", 300, generous)
    for _ in range(300):
        read("lanes", 3, generous)
    assert len(made) == 2  # 300 projects; then their 3 lanes each

    made.clear()
    known.clear()
    memo.clear()
    for _ in range(3):
        with pytest.raises(ValidationFailed, match="with 300 projects"):
            read("projects", 300, 1_000)
    assert len(made) == 1
