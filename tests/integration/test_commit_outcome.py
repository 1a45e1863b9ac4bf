"""A connection lost around a COMMIT: the answer is still the truth.

A proxy (``fault_proxy``) between the write side and PostgreSQL cuts the connection exactly when
a COMMIT goes out: after the server received it (the write exists, the client cannot know) or
instead of it (the server rolls back). The write side must find out which before answering, and
when it cannot (the database stays away), say so: UNAVAILABLE, ``outcome: "unknown"``, and the
commandId whose retry returns the real result without writing twice.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import pytest
from board_helpers import LANES, bootstrap_board, command_log_count
from fault_proxy import FaultProxy
from identities import cheap_identity
from outage_helpers import CREATE_CARD, card_ids_in_log, card_titles_in_log, start_api_stack

from commands import models as m
from commands.billing import Billing, Outcome
from domain.billing import invoice_id_for
from domain.errors import Unavailable
from domain.usage import MonthlySpend, spend_id_for
from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from collections.abc import Iterator

    from board_helpers import Board

    from commands.handlers import AgentWorks


@pytest.fixture
def proxy(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    # The proxy reads the protocol: no TLS (the event store's pool takes no sslmode from URLs).
    monkeypatch.setenv("PGSSLMODE", "disable")
    running = FaultProxy("127.0.0.1", 5432)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def through_proxy(database_url: str, proxy: FaultProxy) -> Iterator[AgentWorks]:
    with contextlib.closing(
        build_write_side(proxy.url_for(database_url), pool_size=2, settle_seconds=5.0)
    ) as app:
        yield app


@pytest.fixture
def proxied_board(through_proxy: AgentWorks) -> Board:
    return bootstrap_board(through_proxy, lanes=LANES)


@pytest.mark.parametrize("command_id", [uuid4(), None], ids=["client id", "server id"])
def test_commit_that_landed_before_the_connection_broke_answers_its_result(
    through_proxy: AgentWorks,
    proxied_board: Board,
    proxy: FaultProxy,
    database_url: str,
    command_id: UUID | None,
) -> None:
    title = f"landed-{uuid4().hex[:8]}"
    proxy.cut_after_commit()

    result = through_proxy.create_card(
        m.CreateCard(project_id=proxied_board.project_id, title=title, command_id=command_id),
        proxied_board.owner,
    )

    assert proxy.cuts == 1
    assert result.replayed is False
    assert result.position > 0
    assert card_titles_in_log(database_url)[title] == 1
    assert through_proxy.card_at(result.id, proxied_board.owner).title == title


def test_commit_that_never_reached_the_server_is_written_once_by_deciding_again(
    through_proxy: AgentWorks, proxied_board: Board, proxy: FaultProxy, database_url: str
) -> None:
    title = f"lost-{uuid4().hex[:8]}"
    command = m.CreateCard(project_id=proxied_board.project_id, title=title, command_id=uuid4())
    proxy.cut_before_commit()

    result = through_proxy.create_card(command, proxied_board.owner)

    assert proxy.cuts == 1
    assert card_titles_in_log(database_url)[title] == 1
    assert command_log_count(database_url, command.command_id) == 1
    assert through_proxy.card_at(result.id, proxied_board.owner).title == title


def test_outcome_that_cannot_be_learnt_in_time_is_unknown_and_a_retry_with_its_id_answers_it(
    database_url: str, proxy: FaultProxy
) -> None:
    """Over HTTP, with a client that sent no commandId: the answer carries the one to retry
    with, and the retry returns the card that was written, once."""
    stack = start_api_stack(
        proxy.url_for(database_url), settle_seconds=0.5, pool_timeout=0.5, fanout=False
    )
    try:
        token, (project_id,) = stack.boards(1)
        title = f"unknown-{uuid4().hex[:8]}"
        card = {"projectId": project_id, "title": title}
        proxy.cut_after_commit(then_down=True)

        first = stack.post(token, CREATE_CARD, {"input": card})

        assert proxy.cuts == 1
        assert first.status_code == 503
        assert int(first.headers["retry-after"]) >= 1
        (error,) = first.json()["errors"]
        assert error["extensions"]["code"] == "UNAVAILABLE"
        assert error["extensions"]["outcome"] == "unknown"
        retry_with = error["extensions"]["commandId"]
        assert UUID(retry_with)

        proxy.refuse(False)
        again = stack.post(token, CREATE_CARD, {"input": {**card, "commandId": retry_with}})

        assert again.status_code == 200, again.text
        card_id = again.json()["data"]["createCard"]["consistencyToken"].split(":")[1]
        assert card_titles_in_log(database_url)[title] == 1
        assert command_log_count(database_url, UUID(retry_with)) == 1
        assert card_ids_in_log(database_url)[title] == UUID(card_id)
    finally:
        stack.close()


def test_database_gone_before_the_commit_answers_unavailable_without_unknown(
    through_proxy: AgentWorks, proxied_board: Board, proxy: FaultProxy, database_url: str
) -> None:
    """Nothing was sent to commit, so nothing was written: a plain UNAVAILABLE, no outcome."""
    title = f"never-{uuid4().hex[:8]}"
    proxy.refuse(True)
    proxy.drop_all()

    with pytest.raises(Unavailable) as refused:
        through_proxy.create_card(
            m.CreateCard(project_id=proxied_board.project_id, title=title), proxied_board.owner
        )

    assert refused.value.outcome is None
    assert card_titles_in_log(database_url)[title] == 0
    proxy.refuse(False)


@pytest.mark.parametrize("cut", ["after", "before"])
def test_refresh_whose_commit_answer_was_lost_answers_the_truth_instead_of_spending_the_token(
    through_proxy: AgentWorks, proxy: FaultProxy, cut: str
) -> None:
    """A refresh is a write too: its answer must be the truth. Answered UNAVAILABLE with the
    outcome unknown, the client can only present the same refresh token again, which the first
    refresh (if it committed) spent: that revokes the whole session (API.md /auth/refresh) and
    the user is signed out by a network fault. The store can tell: committed, the new session
    token is the answer; not committed, the refresh is decided again."""
    identity = cheap_identity(through_proxy)
    identity.signup(email="ada@example.com", password="correct horse battery", name="Ada")
    signed_in = identity.login(email="ada@example.com", password="correct horse battery")
    proxy.cut_after_commit() if cut == "after" else proxy.cut_before_commit()

    refreshed = identity.refresh(signed_in.refresh_token)

    assert proxy.cuts == 1
    assert refreshed.refresh_token != signed_in.refresh_token
    assert identity.refresh(refreshed.refresh_token).user.id == signed_in.user.id


def test_sign_up_whose_commit_landed_before_the_connection_broke_answers_the_account(
    through_proxy: AgentWorks, proxy: FaultProxy
) -> None:
    """Told UNAVAILABLE, the client would sign up again and be told the address has an
    account (DUPLICATE) already: its own, made by the first request."""
    identity = cheap_identity(through_proxy)
    proxy.cut_after_commit()

    user_id = identity.signup(email="bo@example.com", password="correct horse battery", name="Bo")

    assert proxy.cuts == 1
    assert identity.login(email="bo@example.com", password="correct horse battery").user.id == (
        user_id
    )


def test_a_transaction_this_server_never_had_was_not_committed_here(
    write_side: AgentWorks, database_url: str
) -> None:
    """After a failover to a standby that had not received the write, the transaction id the
    write side asks about is beyond any the new primary has handed out: PostgreSQL refuses the
    question ("transaction ID ... is in the future"). That write is not on this server (it was
    lost with the old primary), which is the answer; not an unexpected error out of the settle
    step (a 500 where the API answers UNAVAILABLE or the truth)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
    assert row is not None
    assert write_side.command_log is not None

    assert write_side.command_log.committed(str(row[0] + 1_000_000)) is False


def test_a_committed_transaction_id_that_is_not_the_writes_own_does_not_settle_it(
    write_side: AgentWorks, database_url: str
) -> None:
    """After a failover the new primary hands out again the transaction ids it never received:
    the id an interrupted write asks about may by then be another transaction's, committed. A
    write without a command record (identity) counts as committed only when its own events
    carry that transaction id."""
    import psycopg

    from domain.card import Card

    board = bootstrap_board(write_side, lanes=LANES)
    created = write_side.create_card(
        m.CreateCard(project_id=board.project_id, title="mine"), board.owner
    )
    card = write_side.aggregate(Card, created.id)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
    assert row is not None
    someone_elses = Unavailable("cut", outcome="unknown", transaction_id=row[0])

    assert write_side.commit_settled(someone_elses, [card]) is False


def _billing(app: AgentWorks) -> Billing:
    return Billing(app, clock=lambda: datetime(2026, 3, 10, tzinfo=UTC))


def _stored_of(database_url: str, aggregate_id: UUID) -> int:
    """How many events the store holds of one aggregate."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM agentworks_events WHERE originator_id = %s", (aggregate_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("cut", ["after", "before"])
def test_billing_save_whose_commit_answer_was_lost_is_settled_not_raised(
    through_proxy: AgentWorks, proxied_board: Board, proxy: FaultProxy, database_url: str, cut: str
) -> None:
    """Billing saved without settling: a month closed (or not) while the connection broke at
    its COMMIT raised UNAVAILABLE with the outcome unknown, and the operator could not tell
    whether the month was closed. Settled as the write side settles: committed, it is done;
    not committed, it is decided again and written once."""
    billing = _billing(through_proxy)
    proxy.cut_after_commit() if cut == "after" else proxy.cut_before_commit()

    billing.close_month(proxied_board.workspace_id, "2026-02")

    assert proxy.cuts == 1
    spend_id = spend_id_for(proxied_board.workspace_id, "2026-02")
    assert through_proxy.aggregate(MonthlySpend, spend_id).closed
    assert _stored_of(database_url, spend_id) == 2  # opened, closed: once each


@pytest.mark.parametrize("cut", ["after", "before"])
def test_an_invoice_draft_whose_commit_answer_was_lost_is_settled_and_drafted_once(
    through_proxy: AgentWorks, proxied_board: Board, proxy: FaultProxy, database_url: str, cut: str
) -> None:
    """The invoice's draft, cut at its COMMIT: landed, it is the draft; lost, it is drafted
    again (a reload of a draft that was never written found nothing)."""
    billing = _billing(through_proxy)
    billing.close_month(proxied_board.workspace_id, "2026-02")
    proxy.cut_after_commit() if cut == "after" else proxy.cut_before_commit()

    result = billing.invoice(None, proxied_board.workspace_id, "2026-02")  # type: ignore[arg-type]

    assert proxy.cuts == 1
    assert result.outcome is Outcome.NOTHING_TO_BILL
    assert _stored_of(database_url, invoice_id_for(proxied_board.workspace_id, "2026-02")) == 1
