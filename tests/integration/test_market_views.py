"""The read models kept from a market run by the real service: each equals the service's
own state, and a rebuild from zero in a fresh schema equals the live view (state hashes)."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import pytest

from domain.lease import CloseReason
from domain.verdicts import FailureKind, ProviderHistory, reputation
from ledger.market import service as m
from ledger.money import units
from ledger.store import LedgerApplication
from tests.market import Market, build_market, uid
from tests.schemas import fresh_schema
from workers.projector import Views, open_views


@pytest.fixture
def other_schema(database_url: str) -> Iterator[str]:
    with fresh_schema(database_url) as name:
        yield name


def run_market(market: Market) -> None:
    """Two providers, two consumers, leases, usage, a downtime quorum with a slash."""
    market.provider("p1", market.node("n1", gpu_count=2), bond=units(200))
    market.provider("p2", market.node("n2", gpu_count=4), bond=units(400))
    market.deposit("c1", units(100))
    market.deposit("c2", units(50))
    market.ask("a1", "p1", "n1", units(2), gpu_count=2)
    market.ask("a2", "p2", "n2", units(3), gpu_count=4)
    (l1,) = market.bid("b1", "c1", units(3), gpu_count=2).lease_ids
    market.bid("b2", "c2", units(2), gpu_count=3)  # rests: no ask at 2 left
    (l2,) = market.bid("b3", "c2", units(4), gpu_count=1).lease_ids
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    window = market.window()
    for _ in range(3):
        market.clock.advance(5)
        market.heartbeat(l1)
        market.heartbeat(l2)
    market.send(m.ChargeUsage(uuid4(), l1, units(1), "u1"))
    market.clock.advance(900)
    for name in ("k1", "k2"):
        market.verdict(name, "n1", "p1", window, passed=False, kind=FailureKind.downtime)
    market.verdict("k3", "n1", "p1", window, passed=True)
    for name in ("k1", "k2", "k3"):
        market.verdict(name, "n2", "p2", window, passed=True)
    market.clock.advance(60)
    market.tick()
    market.send(m.CloseLease(uuid4(), l1, CloseReason.consumer, uid("c1")))
    market.send(m.CancelBid(uuid4(), uid("b2"), uid("c2")))


def assert_views_equal_service(views: Views, market: Market) -> None:
    state = market.service.state
    for model, book in state.books.items():
        depth = views.orderbook.depth(model)
        assert list(depth.asks) == book.ask_depth()
        assert list(depth.bids) == book.bid_depth()
    assert {r.lease.id: r.lease for r in views.leases.leases()} == state.leases
    for pid, provider in state.providers.items():
        assert views.providers.provider_state(pid) == provider
        assert views.providers.stake_state(pid) == state.stake_of(pid)
    now = market.clock.now
    scores = views.reputation.reputations(now, market.service.rules.verdicts)
    for pid, provider in state.providers.items():
        history = views.reputation.history(pid)
        assert history is not None
        expected = ProviderHistory(
            pid,
            provider.registered_at,
            state.verdicts.provider_decisions(pid),
            history.slashes,
        )
        assert scores[pid] == reputation(expected, now, market.service.rules.verdicts)
        assert len(history.slashes) == (1 if pid == uid("p1") else 0)
    rows = {r.account_id: r.balances() for r in views.balances.rows()}
    assert rows == {a.id: a.balances() for a in market.writer.state.accounts.values()}


def test_every_view_equals_the_services_state_and_a_rebuild_equals_the_live_view(
    ledger_app: LedgerApplication, ledger_env: dict[str, str], other_schema: str
) -> None:
    market = build_market(ledger_app, ledger_env)
    with open_views(ledger_app, market.app) as views:
        views.catch_up()  # part of the story applied live ...
        run_market(market)
        applied = views.catch_up()  # ... the rest caught up later
        # The story writes the marketplace's and the ledger's logs (not usage, settlement).
        logs = {name: p.app.name for name, p in views.all().items()}
        filled = (market.app.name, ledger_app.name)
        assert all(count > 0 for name, count in applied.items() if logs[name] in filled)
        assert views.catch_up() == dict.fromkeys(applied, 0)
        assert_views_equal_service(views, market)
        live = views.state_hashes()
        for name, view in views.all().items():
            rebuilt = view.rebuild_into(other_schema)
            try:
                assert rebuilt.position() == view.position()
                assert rebuilt.state_hash() == live[name], name
            finally:
                rebuilt.close()


def test_views_restarted_midway_end_equal_to_views_built_in_one_go(
    ledger_app: LedgerApplication, ledger_env: dict[str, str], other_schema: str
) -> None:
    market = build_market(ledger_app, ledger_env)
    run_market(market)
    with open_views(ledger_app, market.app) as views:
        for view in views.all().values():
            view.page_size = 7
            view.catch_up(pages_max=3)
    market.send(m.ConfirmDeposit(uuid4(), uuid4(), uid("c3"), units(5), "0xfeed:7"))
    with open_views(ledger_app, market.app) as restarted:
        restarted.catch_up()
        assert_views_equal_service(restarted, market)
        hashes = restarted.state_hashes()
        for name, view in restarted.all().items():
            rebuilt = view.rebuild_into(other_schema)
            try:
                assert rebuilt.state_hash() == hashes[name], name
            finally:
                rebuilt.close()
