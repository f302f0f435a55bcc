"""The settle worker on real PostgreSQL: usage priced at the lease price, escrow drawn,
fees, withheld failed windows refunded out of the slash, checker rewards, escrow released
after a close, late usage in the next epoch, re-runs that change nothing, payout roots and
proofs from the log."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from uuid import UUID, uuid4

import pytest
from psycopg import sql

from domain.codes import AccountCode
from domain.lease import DEMO_LEASE_RULES, CloseReason
from domain.orderbook import lease_cost
from domain.postings import account_id, protocol_account_id
from domain.settlement import SettlementRules
from domain.usage import UsageRecorded
from domain.verdicts import FailureKind
from ledger.market import service as m
from ledger.merkle import verify
from ledger.money import units
from ledger.settlement import SettlementApplication, SettlementLog
from ledger.store import LedgerApplication
from ledger.usage import OffsetAdvance, UsageApplication
from tests.market import START, Market, address, build_market, uid
from workers.settle import SettlementError, Settler, epoch_of

PRICE = units(2)
EPOCH_S = 600
RULES = m.MarketRules(lease=replace(DEMO_LEASE_RULES, release_escrow_at_close=False))


@pytest.fixture
def market(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Market:
    return build_market(ledger_app, ledger_env, rules=RULES)


@pytest.fixture
def usage(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> UsageApplication:
    return UsageApplication(ledger_app.app_recorder.datastore, env=ledger_env)


@pytest.fixture
def settlements(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> SettlementLog:
    return SettlementLog(SettlementApplication(ledger_app.app_recorder.datastore, env=ledger_env))


def settler(market: Market, usage: UsageApplication, log: SettlementLog) -> Settler:
    rules = SettlementRules(epoch_s=EPOCH_S, posting=market.service.rules.postings)
    return Settler(market.service, usage, log, rules=rules, release_delay_s=30, clock=market.clock)


def balance(market: Market, code: AccountCode, owner: UUID | None = None) -> int:
    aid = protocol_account_id(code) if owner is None else account_id(code, owner)
    account = market.writer.account(aid)
    assert account is not None, code
    return account.balance


def open_lease(market: Market) -> UUID:
    node = market.node("n1", gpu_count=1)
    market.provider("p1", node, bond=units(1_000))
    market.deposit("c1", units(100))
    market.ask("a1", "p1", "n1", PRICE, ttl_s=86_400)
    handled = market.bid("b1", "c1", PRICE, duration_s=7_200)
    (lease_id,) = handled.lease_ids
    return lease_id


class Reports:
    """Usage records of one lease, written through the usage store like ingest does."""

    def __init__(self, usage: UsageApplication, lease_id: UUID) -> None:
        self.usage = usage
        self.lease_id = lease_id
        self.sequence = 0
        self.offset = 0

    def add(self, start_s: int, end_s: int, received_s: float) -> UsageRecorded:
        self.sequence += 1
        start = START + timedelta(seconds=start_s)
        record = UsageRecorded(
            uuid4(), self.lease_id, uid("n1"), self.sequence, start,
            START + timedelta(seconds=end_s), 1, (end_s - start_s) * 10**6,
            (end_s - start_s) * 9 * 10**5, 10**12, 10, 100, 5, 1_000, "train", "cpu",
            START + timedelta(seconds=received_s),
        )  # fmt: skip
        before = self.offset or None
        self.offset += 1
        self.usage.record([record], "settle-test", [OffsetAdvance("usage", 0, before, self.offset)])
        return record


def cost(seconds: int) -> int:
    return lease_cost(1, PRICE, seconds)


def ledger_rows(market: Market) -> int:
    datastore = market.app.app_recorder.datastore
    with datastore.transaction(commit=False) as curs:
        curs.execute(
            sql.SQL("SELECT count(*) AS n FROM {}.ledger_events").format(
                sql.Identifier(datastore.schema)
            )
        )
        row = curs.fetchone()
        assert row is not None
        return int(row["n"])


def test_an_epoch_prices_usage_at_the_lease_price_and_a_rerun_changes_nothing(
    market: Market, usage: UsageApplication, settlements: SettlementLog
) -> None:
    lease_id = open_lease(market)
    reports = Reports(usage, lease_id)
    reports.add(0, 300, 300.5)
    reports.add(300, 600, 601)
    """Received after the epoch's end: settled in the next epoch."""
    worker = settler(market, usage, settlements)
    epoch = epoch_of(START, worker.rules)
    market.clock.advance(900)
    assert worker.due() == [epoch]
    escrow_before = balance(market, AccountCode.lease_escrow, lease_id)

    report = worker.settle(epoch)
    plan, settled = report.record.plan, report.record.settled
    assert settled is not None
    assert [c.sequences for c in plan.charges] == [(1,)]
    assert plan.charged == cost(300) == settled.drawn
    fee = market.service.rules.postings.fee_of(cost(300))
    assert plan.fee == fee and plan.provider_share == cost(300) - fee
    assert balance(market, AccountCode.lease_escrow, lease_id) == escrow_before - cost(300)
    assert balance(market, AccountCode.provider_earnings, uid("p1")) == cost(300) - fee
    assert balance(market, AccountCode.protocol_treasury) == fee

    rows = ledger_rows(market)
    again = worker.settle(epoch)
    assert again.retried == again.commands == 1
    assert ledger_rows(market) == rows
    assert again.record.settled == settled

    # The late record lands in the next epoch, once.
    market.clock.advance(EPOCH_S)
    (report,) = worker.settle_due()
    assert report.record.plan.epoch == epoch + 1
    assert [c.sequences for c in report.record.plan.charges] == [(2,)]
    assert balance(market, AccountCode.lease_escrow, lease_id) == escrow_before - cost(600)
    with pytest.raises(SettlementError, match="planned already"):
        worker.settle(epoch - 1)


def test_a_failed_window_is_withheld_from_the_provider_and_refunded_once(
    market: Market, usage: UsageApplication, settlements: SettlementLog
) -> None:
    lease_id = open_lease(market)
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    reports = Reports(usage, lease_id)
    window_s = market.service.rules.verdicts.verdict_window_s
    window = market.window()
    reports.add(0, window_s, window_s + 1)
    market.clock.advance(window_s)
    for name, passed in (("k1", False), ("k2", False), ("k3", True)):
        market.verdict(name, "n1", "p1", window, passed, FailureKind.downtime)
    market.clock.advance(window_s + market.service.rules.verdicts.verdict_grace_s)
    market.tick()
    decided_s = int((market.clock.now - START).total_seconds())
    reports.add(window_s, 2 * window_s, decided_s)
    """Served after the window, received in the epoch the quorum was decided in: its fee
    pays the checkers that agreed with the quorum."""
    refunded = sum(r.amount for r in market.service.state.refunds)
    assert refunded == cost(window_s)
    consumer_before = balance(market, AccountCode.consumer_available, uid("c1"))

    worker = settler(market, usage, settlements)
    market.clock.now = START + timedelta(seconds=decided_s + EPOCH_S * 2)
    done = worker.settle_due()
    plans = [r.record.plan for r in done]
    first = next(p for p in plans if p.charges and p.charges[0].sequences == (1,))
    assert first.charged == first.withheld == cost(window_s)
    """All of the first record's interval lies in the failed window: none of it is paid."""
    later = next(p for p in plans if p.charges and p.charges[0].sequences == (2,))
    assert later.withheld == 0 and later.fee > 0
    assert balance(market, AccountCode.provider_earnings, uid("p1")) == later.provider_share
    rewards = {r.checker_id: r.amount for r in later.rewards}
    assert set(rewards) == {uid("k1"), uid("k2")}
    """k3 was contradicted: nothing."""
    assert sum(rewards.values()) == later.checker_rewards_total > 0
    for checker, amount in rewards.items():
        assert balance(market, AccountCode.checker_rewards, checker) == amount
    assert balance(market, AccountCode.protocol_treasury) == later.treasury_net
    # The consumer paid the window from escrow and got exactly that back out of the slash:
    # compensated once, not twice (not "not charged" and refunded on top).
    assert first.withheld == refunded
    slashed = market.service.stake_of(uid("p1")).slashed
    penalty = units(10) - market.service.state.checker_stake_left[uid("k3")]
    """The contradicted checker's penalty goes to the pool too."""
    assert balance(market, AccountCode.insurance_pool) == (
        slashed + penalty + first.withheld - refunded
    )
    assert balance(market, AccountCode.consumer_available, uid("c1")) == consumer_before


def test_a_closed_lease_keeps_its_escrow_until_its_last_usage_is_charged(
    market: Market, usage: UsageApplication, settlements: SettlementLog
) -> None:
    lease_id = open_lease(market)
    reports = Reports(usage, lease_id)
    reports.add(0, 120, 121)
    market.clock.advance(120)
    market.send(m.CloseLease(uuid4(), lease_id, CloseReason.consumer, uid("c1")))
    lease = market.service.lease(lease_id)
    assert lease is not None and not lease.escrow_final
    held = lease.escrow_held
    consumer_before = balance(market, AccountCode.consumer_available, uid("c1"))
    reports.add(120, 125, 130)
    """The last interval's report arrives after the close: still charged."""

    worker = settler(market, usage, settlements)
    market.clock.now = START + timedelta(seconds=EPOCH_S * 2)
    (report,) = worker.settle_due()
    assert report.record.plan.releases == (lease_id,)
    assert report.record.plan.charged == cost(125)
    lease = market.service.lease(lease_id)
    assert lease is not None and lease.escrow_final
    assert lease.escrow_released == held - cost(125)
    assert balance(market, AccountCode.lease_escrow, lease_id) == 0
    assert balance(market, AccountCode.consumer_available, uid("c1")) == (
        consumer_before + held - cost(125)
    )
    with pytest.raises(m.LeaseClosedError):
        market.send(m.ChargeUsage(uuid4(), lease_id, 1, "after the release"))


def test_the_payout_root_and_every_proof_come_from_the_log(
    market: Market,
    usage: UsageApplication,
    settlements: SettlementLog,
    ledger_app: LedgerApplication,
    ledger_env: dict[str, str],
) -> None:
    lease_id = open_lease(market)
    reports = Reports(usage, lease_id)
    reports.add(0, 300, 301)
    worker = settler(market, usage, settlements)
    market.clock.now = START + timedelta(seconds=EPOCH_S * 2)
    (report,) = worker.settle_due()
    settled = report.record.settled
    assert settled is not None
    earned = balance(market, AccountCode.provider_earnings, uid("p1"))
    assert [(p.address.lower(), p.cumulative) for p in settled.payouts] == [
        (address("p1").lower(), earned)
    ]
    assert settled.payout_new == settled.payout_total == earned

    # A fresh reader of the log alone rebuilds the tree and the proof.
    fresh = SettlementLog(SettlementApplication(ledger_app.app_recorder.datastore, env=ledger_env))
    fresh.refresh()
    proof = fresh.proof(settled.epoch, address("p1"))
    assert proof.root == settled.payout_root and proof.cumulative == earned
    root = bytes.fromhex(proof.root[2:])
    path = [bytes.fromhex(p[2:]) for p in proof.proof]
    assert verify(root, proof.address, proof.cumulative, path)
    assert not verify(root, proof.address, proof.cumulative + 1, path)
    with pytest.raises(LookupError):
        fresh.proof(settled.epoch, address("nobody"))


def test_due_lists_nothing_without_usage_and_waits_for_the_settle_delay(
    market: Market, usage: UsageApplication, settlements: SettlementLog
) -> None:
    worker = settler(market, usage, settlements)
    assert worker.due() == []
    lease_id = open_lease(market)
    Reports(usage, lease_id).add(0, 10, 11)
    market.clock.now = START + timedelta(seconds=EPOCH_S + 60)
    assert worker.due() == []
    """The epoch ended 60 s ago, less than the settle delay."""
    market.clock.now = START + timedelta(seconds=EPOCH_S + 600)
    assert worker.due() == [epoch_of(START, worker.rules)]


def test_the_worker_ticks_the_market_before_planning_so_failed_windows_are_decided(
    market: Market, usage: UsageApplication, settlements: SettlementLog
) -> None:
    from workers.settle import run

    lease_id = open_lease(market)
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    window_s = market.service.rules.verdicts.verdict_window_s
    window = market.window()
    Reports(usage, lease_id).add(0, window_s, window_s + 1)
    market.clock.advance(window_s)
    for name in ("k1", "k2", "k3"):
        market.verdict(name, "n1", "p1", window, False, FailureKind.downtime)
    market.clock.now = START + timedelta(seconds=EPOCH_S * 3)
    """Nobody ticked: the window is not decided yet."""
    assert market.service.state.undecided_windows()
    worker = settler(market, usage, settlements)
    assert run(worker, follow=False, poll_s=0, tick=True) == 0
    assert not market.service.state.undecided_windows()
    (record,) = list(settlements)
    assert record.plan.withheld == record.plan.charged == cost(window_s)


def test_every_settlement_transfer_names_the_usage_the_epoch_and_the_failed_window(
    market: Market, usage: UsageApplication, settlements: SettlementLog
) -> None:
    from workers.settle import run

    lease_id = open_lease(market)
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    window_s = market.service.rules.verdicts.verdict_window_s
    window = market.window()
    reports = Reports(usage, lease_id)
    reports.add(0, window_s, window_s + 1)
    market.clock.advance(window_s)
    for name in ("k1", "k2", "k3"):
        market.verdict(name, "n1", "p1", window, False, FailureKind.downtime)
    market.clock.now = START + timedelta(seconds=EPOCH_S * 3)
    run(settler(market, usage, settlements), follow=False, poll_s=0, tick=True)
    (record,) = list(settlements)
    n = record.plan.epoch
    refs = [
        dict(t.references)
        for t in market.writer.state.transfers.values()
        if dict(t.references).get("fact") == "usage_charged"
    ]
    assert refs and all(r["usage"].startswith(f"epoch {n}: usage 1..1 (1 reports)") for r in refs)
    assert all(
        f"withheld: 1 failed window(s) from {window:%Y-%m-%dT%H:%M:%SZ}" in r["usage"] for r in refs
    )
    assert {r["lease"] for r in refs} == {str(lease_id)}
