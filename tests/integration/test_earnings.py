"""The earnings views on real PostgreSQL: what they say each provider earned, was withheld,
paid in fees, settled, claimed and has pending equals the ledger and the settlement log;
usage per lease equals the recorded reports; refunds and slashes equal the marketplace's;
a second catch-up applies nothing; a rebuild from zero (and a replay) equals the live views."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from domain.codes import AccountCode
from domain.postings import account_id
from ledger.store import LedgerApplication
from projections import queries as q
from projections.earnings import epoch_of_ref
from projections.replay import live_points, replay
from tests.earnings_scenario import Scenario, build_scenario, cost
from tests.market import uid
from tests.schemas import fresh_schema
from workers.projector import Views, open_views


@pytest.fixture
def scenario(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Scenario:
    return build_scenario(ledger_app, ledger_env)


@pytest.fixture
def views(ledger_app: LedgerApplication, scenario: Scenario) -> Iterator[Views]:
    with open_views(ledger_app, scenario.market.app) as views:
        views.catch_up()
        yield views


def run(database_url: str, schema: str, query: Any, *args: Any, **kwargs: Any) -> Any:
    async def go() -> Any:
        conn = await q.connect(database_url, schema)
        try:
            return await query(conn, *args, **kwargs)
        finally:
            await conn.close()

    return asyncio.run(go())


def balance(scenario: Scenario, code: AccountCode, owner: Any) -> int:
    account = scenario.market.writer.account(account_id(code, owner))
    assert account is not None
    return account.balance


def test_a_charge_names_its_epoch_in_its_usage_ref() -> None:
    assert epoch_of_ref("epoch 2941: usage 1..3 (3 reports)") == 2941
    assert epoch_of_ref("manual charge") == -1


def test_provider_earnings_equal_the_ledger_and_the_settlement_log(
    scenario: Scenario, views: Views, database_url: str, schema: str
) -> None:
    service = scenario.market.service
    plans = [scenario.settlements.epochs[n].plan for n in scenario.settled_epochs]
    for name in ("p1", "p2"):
        found: q.ProviderEarnings = run(database_url, schema, q.provider_earnings, uid(name))
        left = balance(scenario, AccountCode.provider_earnings, uid(name))
        assert found.earned - found.claimed == left
        shares = [c for p in plans for c in p.charges if c.provider_id == uid(name)]
        assert found.earned == sum(c.provider_share for c in shares)
        assert found.fee == sum(c.fee for c in shares)
        assert found.withheld == sum(c.withheld for c in shares)
        assert found.settled == found.earned and found.unsettled == 0
        stake = service.stake_of(uid(name))
        assert found.stake.bonded == stake.bonded
        assert found.stake.slashed == stake.slashed
        assert found.stake.unbonding == stake.unbonding_total
        assert {e.epoch for e in found.epochs} <= set(scenario.settled_epochs)
        assert all(e.status == "settled" for e in found.epochs)
        assert sum(e.earned for e in found.epochs) == found.earned
    p1: q.ProviderEarnings = run(database_url, schema, q.provider_earnings, uid("p1"))
    assert p1.stake.slashes_count == 1 and p1.stake.slashed > 0
    assert p1.withheld == cost(service.rules.verdicts.verdict_window_s)
    assert p1.pending.reports == 0
    p2: q.ProviderEarnings = run(database_url, schema, q.provider_earnings, uid("p2"))
    assert p2.claimed == scenario.claimed == p2.payout_cumulative and p2.claimable == 0
    assert p2.claims_count == 1
    assert p2.pending.reports == 1 and p2.pending.billable_s == 300
    assert p2.pending.amount_estimate == cost(300)


def test_one_epoch_of_a_provider_and_an_unknown_one(
    scenario: Scenario, views: Views, database_url: str, schema: str
) -> None:
    everything: q.ProviderEarnings = run(database_url, schema, q.provider_earnings, uid("p2"))
    epoch = everything.epochs[0].epoch
    one: q.ProviderEarnings = run(database_url, schema, q.provider_earnings, uid("p2"), epoch=epoch)
    assert one.epochs == [everything.epochs[0]]
    with pytest.raises(q.QueryError) as info:
        run(database_url, schema, q.provider_earnings, uid("p2"), epoch=1)
    assert info.value.code == "unknown_epoch"
    with pytest.raises(q.QueryError) as info:
        run(database_url, schema, q.provider_earnings, uid("nobody"))
    assert info.value.code == "unknown_provider"


def test_consumer_usage_charges_and_refunds_per_lease(
    scenario: Scenario, views: Views, database_url: str, schema: str
) -> None:
    refunds = scenario.market.service.state.refunds
    for lease, consumer in (("l1", "c1"), ("l2", "c2")):
        (found,) = run(database_url, schema, q.consumer_leases, uid(consumer))
        assert found.lease_id == scenario.leases[lease]
        reports = scenario.reports[lease]
        assert found.usage.reports == len(reports)
        assert found.usage.flops == sum(r.flops for r in reports)
        assert found.usage.device_time_us == sum(r.device_time_us for r in reports)
        assert found.usage.last_sequence == len(reports)
        charged = [
            c.amount
            for n in scenario.settled_epochs
            for c in scenario.settlements.epochs[n].plan.charges
            if c.lease_id == found.lease_id
        ]
        assert found.charged == sum(charged)
        assert found.refunded == sum(r.amount for r in refunds if r.lease_id == found.lease_id)
    (l1,) = run(database_url, schema, q.consumer_leases, uid("c1"))
    assert l1.refunded == l1.withheld > 0 and len(l1.refunds) == 1
    assert run(database_url, schema, q.consumer_leases, uid("nobody")) == []


def test_a_second_catch_up_applies_nothing_and_a_rebuild_equals_the_live_views(
    scenario: Scenario, views: Views, database_url: str
) -> None:
    earnings = {name: p for name, p in views.all().items() if name.startswith("earnings")}
    hashes = {name: p.state_hash() for name, p in earnings.items()}
    assert {name: p.catch_up() for name, p in earnings.items()} == dict.fromkeys(earnings, 0)
    assert {name: p.state_hash() for name, p in earnings.items()} == hashes
    for name, p in earnings.items():
        with fresh_schema(database_url) as other:
            rebuilt = p.rebuild_into(other)
            try:
                assert rebuilt.state_hash() == hashes[name], name
                assert rebuilt.position() == p.position()
            finally:
                rebuilt.close()
    points = live_points(earnings)
    with fresh_schema(database_url) as other:
        result = replay(earnings, other, stops={n: x.position for n, x in points.items()})
    assert {v.name: v.state_hash for v in result.views} == hashes
