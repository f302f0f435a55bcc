"""The marketplace service against real PostgreSQL: commands, typed errors, idempotency,
atomic saves of marketplace events with their ledger transfers, restarts."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from uuid import uuid4

import pytest
from eventsourcing.persistence import ProgrammingError
from psycopg import sql

from domain.codes import AccountCode
from domain.lease import CloseReason, LeaseStatus
from domain.orderbook import Bid
from domain.postings import account_id, protocol_account_id
from domain.stake import SlashKind
from domain.verdicts import FailureKind
from ledger.market import service as m
from ledger.market.store import MarketEvent
from ledger.money import units
from ledger.store import LedgerApplication
from tests.market import Market, build_market, uid

PRICE = units(2)
"""2 AETH per GPU-hour."""


@pytest.fixture
def market(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Market:
    return build_market(ledger_app, ledger_env)


def counts(market: Market) -> tuple[int, int]:
    """Rows in marketplace_events and ledger_events."""
    datastore = market.app.app_recorder.datastore
    with datastore.transaction(commit=False) as curs:
        found = []
        for table in ("marketplace_events", "ledger_events"):
            curs.execute(
                sql.SQL("SELECT count(*) AS n FROM {}.{}").format(
                    sql.Identifier(datastore.schema), sql.Identifier(table)
                )
            )
            row = curs.fetchone()
            assert row is not None
            found.append(int(row["n"]))
    return found[0], found[1]


def balance(market: Market, code: AccountCode, owner_name: str | None = None) -> int:
    aid = protocol_account_id(code) if owner_name is None else account_id(code, uid(owner_name))
    account = market.writer.account(aid)
    assert account is not None, (code, owner_name)
    return account.balance


def books_balance(market: Market) -> None:
    accounts = market.writer.state.accounts.values()
    assert sum(a.debits_posted for a in accounts) == sum(a.credits_posted for a in accounts)
    assert sum(a.debits_pending for a in accounts) == sum(a.credits_pending for a in accounts)


def open_lease(market: Market, gpu_count: int = 1) -> m.Handled:
    """p1 (node n1: 2 x H100, bonded) asks; c1 (1,000 AETH) bids and gets a lease."""
    market.provider("p1", market.node("n1"), bond=units(200))
    market.deposit("c1", units(1_000))
    market.ask("a1", "p1", "n1", PRICE, gpu_count=2)
    return market.bid("b1", "c1", units(3), gpu_count=gpu_count)


# -- the happy path ---------------------------------------------------------------------------


def test_a_bid_that_meets_an_ask_opens_a_lease_at_the_ask_price_with_its_escrow_held(market):
    handled = open_lease(market)
    (lease_id,) = handled.lease_ids
    lease = market.service.lease(lease_id)
    assert lease is not None and lease.status is LeaseStatus.open
    assert lease.price_per_gpu_hour == PRICE
    cost = PRICE  # one GPU for an hour at the ask price
    assert lease.escrow_held == cost
    assert [type(f).__name__ for f in handled.facts] == [
        "BidPlaced",
        "OrderMatched",
        "LeaseOpened",
        "BidRemainderRefunded",
    ]
    # The bid's escrow (at its max price) left the consumer; the remainder came back.
    assert balance(market, AccountCode.consumer_available, "c1") == units(1_000) - cost
    escrow = market.writer.account(account_id(AccountCode.lease_escrow, lease_id))
    assert escrow is not None and escrow.balance == cost
    assert balance(market, AccountCode.bid_escrow, "b1") == 0
    books_balance(market)


def test_usage_charges_split_between_provider_and_treasury_and_a_close_releases_the_rest(market):
    (lease_id,) = open_lease(market).lease_ids
    market.send(m.ChargeUsage(uuid4(), lease_id, units(1), "usage-1"))
    fee = units(1) * 500 // 10_000
    assert balance(market, AccountCode.provider_earnings, "p1") == units(1) - fee
    assert balance(market, AccountCode.protocol_treasury) == fee
    market.send(m.CloseLease(uuid4(), lease_id, CloseReason.consumer, uid("c1")))
    escrow = market.writer.account(account_id(AccountCode.lease_escrow, lease_id))
    assert escrow is not None and escrow.balance == 0
    assert balance(market, AccountCode.consumer_available, "c1") == units(1_000) - units(1)
    books_balance(market)


def test_a_failed_quorum_slashes_the_provider_refunds_the_consumer_and_penalises_a_liar(market):
    (lease_id,) = open_lease(market).lease_ids
    for name in ("k1", "k2", "k3", "k4"):
        market.checker(name)
    window = market.window()
    market.clock.advance(900)
    for name in ("k1", "k2", "k3"):
        market.verdict(name, "n1", "p1", window, passed=False)
    market.verdict("k4", "n1", "p1", window, passed=True)  # contradicted by the quorum
    market.clock.advance(60)
    handled = market.tick()
    kinds = [type(f).__name__ for f in handled.facts]
    assert "QuorumFailed" in kinds and "StakeSlashed" in kinds
    assert "ConsumerRefunded" in kinds and "CheckerPenalized" in kinds
    slashed = next(f for f in handled.facts if type(f).__name__ == "StakeSlashed")
    assert slashed.kind is SlashKind.downtime
    k = market.service.rules.stake.stake_per_gpu["H100"]
    assert slashed.amount == k * 2 // 3  # a third of K for each of the node's 2 GPUs
    refund = next(f for f in handled.facts if type(f).__name__ == "ConsumerRefunded")
    assert refund.lease_id == lease_id
    assert refund.amount == PRICE * 900 // 3_600  # the failed window at the lease price
    assert balance(market, AccountCode.insurance_pool) == (
        slashed.amount - refund.amount + units(1)  # + the liar's penalty (10% of 10 AETH)
    )
    assert balance(market, AccountCode.checker_stake, "k4") == units(9)
    assert market.service.lease(lease_id).status is LeaseStatus.open  # downtime: no SLA close
    books_balance(market)


def test_fraud_closes_the_nodes_leases_for_sla_breach(market):
    (lease_id,) = open_lease(market).lease_ids
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    window = market.window()
    market.clock.advance(900)
    for name in ("k1", "k2", "k3"):
        market.verdict(name, "n1", "p1", window, passed=False, kind=FailureKind.fraud)
    market.clock.advance(60)
    market.tick()
    lease = market.service.lease(lease_id)
    assert lease.status is LeaseStatus.closed and lease.close_reason is CloseReason.sla_breach
    assert market.service.stake_of(uid("p1")).slashed == 2 * units(100)  # all of K per GPU
    books_balance(market)


def test_missing_heartbeats_become_downtime_on_a_tick(market):
    (lease_id,) = open_lease(market).lease_ids
    market.heartbeat(lease_id)
    market.clock.advance(30)  # demo rules: silence beyond 15 s is downtime
    handled = market.tick()
    assert [type(f).__name__ for f in handled.facts] == ["DowntimeDetected"]


# -- typed errors, and nothing half-written -----------------------------------------------------


def test_an_ask_of_an_unknown_provider_is_refused(market):
    with pytest.raises(m.UnknownProviderError):
        market.ask("a1", "nobody", "n1", PRICE)


def test_an_ask_without_enough_stake_is_refused_and_records_nothing(market):
    market.provider("p1", market.node("n1"), bond=units(100))  # needs 2 x 100 AETH
    before = counts(market)
    with pytest.raises(m.InsufficientStakeError, match="bond more"):
        market.ask("a1", "p1", "n1", PRICE)
    assert counts(market) == before


def test_an_ask_for_more_gpus_than_its_node_has_is_refused(market):
    market.provider("p1", market.node("n1", gpu_count=2), bond=units(200))
    with pytest.raises(m.NotPermittedError) as error:
        market.ask("a1", "p1", "n1", PRICE, gpu_count=3)
    assert error.value.code == "ask_exceeds_node"


def test_a_bid_under_the_minimum_is_refused(market):
    market.deposit("c1", units(10))
    with pytest.raises(m.BidBelowMinimumError):
        market.bid("b1", "c1", units(3), escrow=units(1))


def test_a_bid_beyond_the_consumers_funds_is_refused_and_nothing_is_written(market):
    market.provider("p1", market.node("n1"), bond=units(200))
    market.ask("a1", "p1", "n1", PRICE)
    market.deposit("c1", units(1))
    before = counts(market)
    with pytest.raises(m.InsufficientFundsError, match="available"):
        market.bid("b1", "c1", units(3))
    assert counts(market) == before  # neither the bid, nor the match, nor a rejection
    assert market.service.book("H100").resting_asks()[0].gpu_count_remaining == 1
    # The same bid, once funded, goes through: the refusal left nothing behind.
    market.deposit("c1", units(10))
    assert market.bid("b1", "c1", units(3)).lease_ids


def test_a_bid_of_a_consumer_without_any_account_is_refused_as_insufficient_funds(market):
    with pytest.raises(m.InsufficientFundsError):
        market.bid("b1", "stranger", units(3))


def test_commands_on_a_closed_lease_are_refused(market):
    (lease_id,) = open_lease(market).lease_ids
    market.send(m.CloseLease(uuid4(), lease_id, CloseReason.consumer, uid("c1")))
    with pytest.raises(m.LeaseClosedError):
        market.send(m.CloseLease(uuid4(), lease_id, CloseReason.consumer, uid("c1")))
    with pytest.raises(m.LeaseClosedError):
        market.send(m.TopUpEscrow(uuid4(), lease_id, uid("c1"), units(1)))


def test_only_the_leases_consumer_may_top_it_up(market):
    (lease_id,) = open_lease(market).lease_ids
    market.deposit("c2", units(10))
    with pytest.raises(m.NotPermittedError):
        market.send(m.TopUpEscrow(uuid4(), lease_id, uid("c2"), units(1)))


def test_a_top_up_beyond_the_consumers_funds_is_refused(market):
    (lease_id,) = open_lease(market).lease_ids
    with pytest.raises(m.InsufficientFundsError):
        market.send(m.TopUpEscrow(uuid4(), lease_id, uid("c1"), units(5_000)))


def test_an_unknown_lease_is_refused(market):
    with pytest.raises(m.UnknownLeaseError):
        market.send(m.ChargeUsage(uuid4(), uuid4(), 1, "u"))


def test_a_verdict_from_an_unregistered_checker_is_refused(market):
    market.provider("p1", market.node("n1"), bond=units(200))
    window = market.window()
    market.clock.advance(900)
    with pytest.raises(m.UnknownCheckerError):
        market.verdict("ghost", "n1", "p1", window, passed=False)


def test_a_verdict_naming_the_wrong_provider_of_a_node_is_refused(market):
    market.provider("p1", market.node("n1"), bond=units(200))
    market.checker("k1")
    window = market.window()
    market.clock.advance(900)
    with pytest.raises(m.UnknownNodeError):
        market.verdict("k1", "n1", "p2", window, passed=False)


def test_cancelling_someone_elses_bid_is_refused(market):
    market.deposit("c1", units(10))
    market.bid("b1", "c1", units(3))
    with pytest.raises(m.NotPermittedError):
        market.send(m.CancelBid(uuid4(), uid("b1"), uid("c2")))


def test_a_cancelled_bid_returns_its_escrow(market):
    market.deposit("c1", units(10))
    market.bid("b1", "c1", units(3))
    assert balance(market, AccountCode.consumer_available, "c1") == units(7)
    market.send(m.CancelBid(uuid4(), uid("b1"), uid("c1")))
    assert balance(market, AccountCode.consumer_available, "c1") == units(10)
    assert balance(market, AccountCode.bid_escrow, "b1") == 0


def test_a_node_key_used_by_another_provider_is_refused(market):
    market.provider("p1", market.node("n1"))
    stolen = replace(market.node("n2"), public_key=market.node("n1").public_key)
    with pytest.raises(m.RuleRefusedError):
        market.provider("p2", stolen)


# -- stake -----------------------------------------------------------------------------------


def test_unbonding_waits_and_cannot_escape_a_slash_for_an_earlier_offence(market):
    market.provider("p1", market.node("n1", gpu_count=1), bond=units(300))
    market.send(m.RequestUnbond(uuid4(), uid("p1"), units(200)))
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    window = market.window()
    market.clock.advance(900)
    for name in ("k1", "k2", "k3"):
        market.verdict(name, "n1", "p1", window, passed=False, kind=FailureKind.fraud)
    market.clock.advance(market.service.rules.stake.unbond_delay_s)
    with pytest.raises(m.UnbondBlockedError):
        market.send(m.CompleteUnbond(uuid4(), uid("p1")))
    market.tick()  # decides the window: fraud takes all of K (100) from bonded (100) first
    stake = market.service.stake_of(uid("p1"))
    assert stake.slashed == units(100) and stake.bonded == 0
    market.send(m.CompleteUnbond(uuid4(), uid("p1")))
    assert market.service.stake_of(uid("p1")).released == units(200)
    books_balance(market)


def test_unbonding_below_the_required_stake_is_refused(market):
    market.provider("p1", market.node("n1"), bond=units(200))
    with pytest.raises(m.InsufficientStakeError):
        market.send(m.RequestUnbond(uuid4(), uid("p1"), units(1)))


# -- idempotency -------------------------------------------------------------------------------


def test_a_retried_command_returns_the_first_answer_and_records_nothing(market):
    market.provider("p1", market.node("n1"), bond=units(200))
    market.deposit("c1", units(100))
    market.ask("a1", "p1", "n1", PRICE)
    command = m.PlaceBid(uuid4(), Bid(uid("b1"), uid("c1"), "H100", 1, units(3), 3_600, units(3)))
    first = market.send(command)
    before = counts(market)
    again = market.send(command)
    assert again.retried and again.lease_ids == first.lease_ids
    assert again.facts_count == first.facts_count
    assert counts(market) == before


def test_the_same_command_id_with_other_content_is_refused(market):
    market.deposit("c1", units(100))
    command_id = uuid4()
    market.send(
        m.PlaceBid(command_id, Bid(uid("b1"), uid("c1"), "H100", 1, units(3), 60, units(3)))
    )
    with pytest.raises(m.IdempotencyConflictError):
        market.send(
            m.PlaceBid(command_id, Bid(uid("b2"), uid("c1"), "H100", 1, units(3), 60, units(3)))
        )


def test_a_retry_is_recognised_by_a_restarted_service(market, ledger_app, ledger_env):
    market.deposit("c1", units(100))
    command = m.ConfirmDeposit(uuid4(), uuid4(), uid("c1"), units(5), "0xabc:1")
    market.send(command)
    restarted = build_market(ledger_app, ledger_env)
    assert restarted.send(command).retried
    assert restarted.service.available(uid("c1")) == units(105)


# -- restarts, concurrency, storage ---------------------------------------------------------------


def test_a_restarted_service_rebuilds_the_same_state_from_the_log(market, ledger_app, ledger_env):
    (lease_id,) = open_lease(market).lease_ids
    market.heartbeat(lease_id)
    market.send(m.ChargeUsage(uuid4(), lease_id, units(1), "u1"))
    market.ask("a2", "p1", "n1", units(5), ttl_s=60)
    market.clock.advance(120)
    market.tick()
    live = market.service.state
    rebuilt = build_market(ledger_app, ledger_env).service.state
    assert rebuilt.providers == live.providers
    assert rebuilt.stakes == live.stakes
    assert rebuilt.leases == live.leases
    assert rebuilt.verdicts == live.verdicts
    assert rebuilt.books == live.books
    assert rebuilt.versions == live.versions


def test_a_service_sees_what_another_process_appended(market, ledger_app, ledger_env):
    other = build_market(ledger_app, ledger_env)
    other.provider("p1", other.node("n1"), bond=units(200))
    # The first service reads the log before its next command.
    market.deposit("c1", units(10))
    assert market.service.provider(uid("p1")) is not None


def test_a_conflicting_append_fails_the_command_with_nothing_written(market):
    market.provider("p1", market.node("n1"), bond=units(200))
    version = market.service.state.versions[uid("p1")]
    # Another writer took the provider stream's next version behind our back.
    intruder = market.app.market_mapper.to_stored_event(
        MarketEvent(
            uid("p1"),
            version + 1,
            market.clock.now,
            m.providers.NodeDelisted(uid("p1"), uid("n1"), market.clock.now),
        )
    )
    market.app.app_recorder.insert_events([intruder])
    before = counts(market)
    market.service.state.position = 10**9  # pretend we had not seen it
    with pytest.raises(m.ConcurrentUpdateError, match="retry the command"):
        market.send(m.ListNode(uuid4(), uid("p1"), market.node("n2")))
    assert counts(market) == before
    # The service reloaded the log: it now knows the node was delisted.
    assert uid("n1") in market.service.provider(uid("p1")).delisted


def test_marketplace_events_are_append_only(market):
    market.deposit("c1", units(10))
    datastore = market.app.app_recorder.datastore
    table = sql.Identifier(datastore.schema, "marketplace_events")
    for statement in (
        sql.SQL("UPDATE {} SET topic = 'x'").format(table),
        sql.SQL("DELETE FROM {}").format(table),
        sql.SQL("TRUNCATE {}").format(table),
    ):
        with (
            pytest.raises(ProgrammingError, match="append-only"),
            datastore.transaction(commit=True) as curs,
        ):
            curs.execute(statement)


def test_stored_marketplace_events_are_plain_json(market):
    market.deposit("c1", units(10))
    datastore = market.app.app_recorder.datastore
    with datastore.transaction(commit=False) as curs:
        curs.execute(
            sql.SQL(
                "SELECT topic, convert_from(state, 'UTF8')::jsonb AS state FROM {} "
                "ORDER BY notification_id LIMIT 1"
            ).format(sql.Identifier(datastore.schema, "marketplace_events"))
        )
        row = curs.fetchone()
    assert row["topic"] == "domain.funds:DepositConfirmed"
    assert row["state"]["fact"]["amount"] == str(units(10))
    assert row["state"]["fact"]["consumer_id"] == str(uid("c1"))


def test_heartbeats_and_expiries_keep_time_moving_forward(market):
    (lease_id,) = open_lease(market).lease_ids
    for _ in range(3):
        market.clock.advance(5)
        market.heartbeat(lease_id)
    assert market.service.lease(lease_id).heartbeat_sequence == 3
    lease = market.service.lease(lease_id)
    market.clock.now = lease.ends_at + timedelta(seconds=1)
    market.tick()
    assert market.service.lease(lease_id).close_reason is CloseReason.expiry
    books_balance(market)


def test_staging_a_command_leaves_the_live_state_as_it_was(market):
    """A command's decisions are staged over the live state; nothing of them reaches it
    before commit (the staged deposits once were the live dict itself)."""
    (lease_id,) = open_lease(market).lease_ids
    state = market.service.state
    before = (
        dict(state.deposits),
        dict(state.leases),
        dict(state.leases_by_node),
        dict(state.versions),
        dict(state.node_keys),
    )
    work = m._Work(state, uuid4(), market.clock.now, market.service.rules)
    work.record(uuid4(), m.funds.DepositConfirmed(uuid4(), uid("c9"), 5, "0xab:1", work.now))
    closed = m.lease.close(
        state.leases[lease_id],
        CloseReason.consumer,
        uid("c1"),
        work.now,
        market.service.rules.lease,
    )[1]
    for fact in closed:
        work.record(lease_id, fact)
    node = market.node("n7")
    work.record(
        uid("p7"), m.providers.ProviderRegistered(uid("p7"), "0x" + "7" * 40, (node,), work.now)
    )
    assert work.staged.leases[lease_id].status is LeaseStatus.closed
    assert uid("p7") in work.staged.providers
    assert before == (
        dict(state.deposits),
        dict(state.leases),
        dict(state.leases_by_node),
        dict(state.versions),
        dict(state.node_keys),
    )
    assert uid("p7") not in state.providers
