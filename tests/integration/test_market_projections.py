"""The marketplace's read models (order book, providers, leases, reputation) in real
PostgreSQL: each equals the domain's replay of the log, is exactly-once and resumable, and
rebuilds from zero to the same state hash.

The log is written as the service writes it (facts of `domain` as `MarketEvent`s in
`marketplace_events`, each command followed by its `CommandHandled`), with facts decided by
the domain's own functions, so the sequences are realistic: matches follow placements,
leases open from matches, slashes follow failed quorums.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

import pytest
from eventsourcing.persistence import IntegrityError, Tracking
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import lease as lease_rules
from domain import orderbook, verdicts
from domain import providers as provider_rules
from domain import stake as stake_rules
from domain.lease import PROTOCOL_ID, CloseReason, Lease, LeaseRules, LeaseStatus
from domain.orderbook import (
    Ask,
    Bid,
    BidRemainderRefunded,
    CancelAsk,
    CancelBid,
    OrderBook,
    OrderMatched,
    escrow_required,
)
from domain.providers import Node, Provider
from domain.stake import ProviderStake, SlashKind, StakeRules, StakeSlashed
from domain.verdicts import (
    Decision,
    FailureKind,
    ProviderHistory,
    QuorumFailed,
    QuorumPassed,
    RegisterChecker,
    Verdict,
    VerdictRules,
    VerdictState,
)
from ledger.market.store import CommandHandled, MarketEvent, MarketplaceApplication
from ledger.money import units
from ledger.store import LedgerApplication
from projections.leases import LeasesProjection
from projections.orderbook import BookDepth, OrderBookProjection, Side
from projections.providers import ProvidersProjection
from projections.reputation import ReputationProjection
from projections.view import MarketProjection, PageAlreadyTrackedError, construct_view
from tests.schemas import fresh_schema

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
"""Aligned on a verdict window (15 minutes)."""
NAMESPACE = UUID("6f1c3f4e-2b7a-4c55-9a43-0d5e8f1b2c3d")
H100, A100, RTX = "H100", "A100", "RTX4090"

AnyProjection = MarketProjection[Any]


def uid(name: str) -> UUID:
    return uuid5(NAMESPACE, name)


@dataclass(frozen=True, slots=True)
class DepositSeen:
    """A fact type no view reads (as later issues add them): skipped, its position tracked."""

    consumer_id: UUID
    amount: int
    seen_at: datetime


@pytest.fixture
def market(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Iterator[Any]:
    app = MarketplaceApplication(ledger_app.app_recorder.datastore, env=ledger_env)
    yield app
    app.close()


@pytest.fixture
def other_schema(database_url: str) -> Iterator[str]:
    """A second fresh schema, for views built from zero."""
    with fresh_schema(database_url) as name:
        yield name


class Log:
    """Appends facts to the marketplace log as the service does: a command's facts, then its
    `CommandHandled`, in one transaction."""

    def __init__(self, app: MarketplaceApplication) -> None:
        self.app = app
        self.versions: dict[UUID, int] = defaultdict(int)

    def record(self, stream_id: UUID, facts: Sequence[Any], at: datetime, kind: str) -> None:
        if not facts:
            return
        events = []
        for fact in facts:
            self.versions[stream_id] += 1
            events.append(MarketEvent(stream_id, self.versions[stream_id], at, fact))
        command_id = uuid.uuid4()
        handled = CommandHandled(command_id, kind, "0" * 64, len(facts), (), at)
        events.append(MarketEvent(command_id, 1, at, handled))
        mapper = self.app.market_mapper
        self.app.app_recorder.insert_events([mapper.to_stored_event(e) for e in events])


def _node(name: str, gpu_model: str, gpu_count: int) -> Node:
    return Node(uid(name), gpu_model, gpu_count, 81_920, "eu-west", uid(name).hex * 2)


class Story:
    """A realistic marketplace history, decided by the domain, written to the log, with the
    facts of each aggregate kept for the replays the views are compared with."""

    def __init__(self, app: MarketplaceApplication) -> None:
        self.log = Log(app)
        self.now = T0
        self.stake_rules = StakeRules()
        self.lease_rules = LeaseRules()
        self.verdict_rules = VerdictRules()
        self.books: dict[str, OrderBook] = {}
        self.book_facts: dict[str, list[Any]] = defaultdict(list)
        self.providers: dict[UUID, Provider | None] = {}
        self.provider_facts: dict[UUID, list[Any]] = defaultdict(list)
        self.stakes: dict[UUID, ProviderStake] = {}
        self.stake_facts: dict[UUID, list[Any]] = defaultdict(list)
        self.leases: dict[UUID, Lease] = {}
        self.lease_facts: dict[UUID, list[Any]] = defaultdict(list)
        self.closed_by: dict[UUID, UUID] = {}
        self.verdict_state = VerdictState()
        self.decisions: list[Decision] = []
        self.slashes: list[StakeSlashed] = []
        self.p1, self.p2 = uid("provider-1"), uid("provider-2")
        self.c1, self.c2 = uid("consumer-1"), uid("consumer-2")
        self.n1, self.n2, self.n3 = _node("n1", H100, 8), _node("n2", A100, 4), _node("n3", H100, 4)
        self.n4 = _node("n4", RTX, 2)
        self.checkers = [uid(f"checker-{i}") for i in range(3)]

    def tick(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    # -- providers and stake -----------------------------------------------------------

    def _provider(self, provider_id: UUID, outcome: tuple[Any, tuple[Any, ...]]) -> None:
        result, facts = outcome
        assert result == 0, result
        for fact in facts:
            self.providers[provider_id] = provider_rules.apply(
                self.providers.get(provider_id), fact
            )
        self.provider_facts[provider_id].extend(facts)
        self.log.record(provider_id, facts, self.now, "Provider")

    def register(self, provider_id: UUID, *nodes: Node) -> None:
        address = "0x" + provider_id.hex[:20] * 2
        outcome = provider_rules.register(None, provider_id, address, nodes, self.now)
        self._provider(provider_id, outcome)

    def _stake(self, provider_id: UUID, outcome: tuple[Any, tuple[Any, ...]]) -> None:
        result, facts = outcome
        assert result == 0, result
        state = self.stakes.get(provider_id, ProviderStake(provider_id))
        for fact in facts:
            state = stake_rules.apply(state, fact)
            if isinstance(fact, StakeSlashed):
                self.slashes.append(fact)
        self.stakes[provider_id] = state
        self.stake_facts[provider_id].extend(facts)
        self.log.record(uid(f"stake:{provider_id}"), facts, self.now, "Stake")

    def stake(self, provider_id: UUID) -> ProviderStake:
        return self.stakes.get(provider_id, ProviderStake(provider_id))

    def bond(self, provider_id: UUID, amount: int) -> None:
        self._stake(provider_id, stake_rules.bond(self.stake(provider_id), amount, self.now))

    def unbond(self, provider_id: UUID, amount: int) -> None:
        provider = self.providers[provider_id]
        assert provider is not None
        outcome = stake_rules.request_unbond(
            self.stake(provider_id), amount, provider.listed_nodes(), self.stake_rules, self.now
        )
        self._stake(provider_id, outcome)

    def complete_unbond(self, provider_id: UUID) -> None:
        self._stake(provider_id, stake_rules.complete_unbond(self.stake(provider_id), self.now))

    def slash(self, provider_id: UUID, kind: SlashKind, node: Node, offence_at: datetime) -> None:
        outcome = stake_rules.slash(
            self.stake(provider_id),
            self.stake_rules,
            kind=kind,
            gpu_model=node.gpu_model,
            gpu_count=node.gpu_count,
            offence_at=offence_at,
            now=self.now,
        )
        self._stake(provider_id, outcome)

    # -- order books and leases ----------------------------------------------------------

    def book(self, gpu_model: str) -> OrderBook:
        return self.books.setdefault(gpu_model, OrderBook(gpu_model))

    def _book(self, gpu_model: str, facts: Sequence[Any], kind: str) -> None:
        self.book_facts[gpu_model].extend(facts)
        self.log.record(uid(f"book:{gpu_model}"), facts, self.now, kind)
        for fact in facts:
            if isinstance(fact, OrderMatched):
                self._lease_facts(lease_rules.open_lease(fact, self.now))

    def ask(
        self, name: str, provider_id: UUID, node: Node, count: int, price: int, ttl_s: int
    ) -> None:
        ask = Ask(
            uid(name),
            provider_id,
            node.node_id,
            node.gpu_model,
            count,
            price,
            self.now + timedelta(seconds=ttl_s),
        )
        result, facts = self.book(node.gpu_model).place_ask(ask, self.now)
        assert result == 0, result
        self._book(node.gpu_model, facts, "PlaceAsk")

    def bid(
        self,
        name: str,
        consumer_id: UUID,
        gpu_model: str,
        count: int,
        price: int,
        duration_s: int,
        extra: int = 0,
    ) -> None:
        escrow = escrow_required(count, price, duration_s) + extra
        bid = Bid(uid(name), consumer_id, gpu_model, count, price, duration_s, escrow)
        result, facts = self.book(gpu_model).place_bid(bid, self.now)
        assert result == 0, result
        self._book(gpu_model, facts, "PlaceBid")

    def cancel_ask(self, name: str, provider_id: UUID, gpu_model: str) -> None:
        result, facts = self.book(gpu_model).cancel_ask(CancelAsk(uid(name), provider_id), self.now)
        assert result == 0, result
        self._book(gpu_model, facts, "CancelAsk")

    def cancel_bid(self, name: str, consumer_id: UUID, gpu_model: str) -> None:
        result, facts = self.book(gpu_model).cancel_bid(CancelBid(uid(name), consumer_id), self.now)
        assert result == 0, result
        self._book(gpu_model, facts, "CancelBid")

    def expire(self, gpu_model: str) -> None:
        self._book(gpu_model, self.book(gpu_model).expire(self.now), "Tick")

    def lease_of(self, ask: str, bid: str) -> Lease:
        return self.leases[lease_rules.lease_id_for(uid(ask), uid(bid))]

    def _lease_facts(
        self, outcome: tuple[Any, tuple[Any, ...]], *, ok: Sequence[int] = (0,)
    ) -> None:
        result, facts = outcome
        assert result in ok, result
        for fact in facts:
            self.leases[fact.lease_id] = lease_rules.apply(self.leases.get(fact.lease_id), fact)
            self.lease_facts[fact.lease_id].append(fact)
            if isinstance(fact, lease_rules.LeaseClosed):
                self.closed_by[fact.lease_id] = fact.closed_by
        if facts:
            self.log.record(facts[0].lease_id, facts, self.now, "Lease")

    def heartbeat(self, lease: Lease) -> None:
        self._lease_facts(
            lease_rules.record_heartbeat(
                lease,
                lease.node_id,
                lease.heartbeat_sequence + 1,
                self.now,
                self.now,
                self.lease_rules,
            )
        )

    def charge(self, lease: Lease, amount: int, ref: str) -> None:
        outcome = lease_rules.charge_usage(lease, amount, ref, self.now, self.lease_rules)
        self._lease_facts(outcome, ok=(0, lease_rules.ChargeUsageResult.escrow_exhausted))

    # -- checkers --------------------------------------------------------------------------

    def _verdicts(self, outcome: tuple[Any, tuple[Any, ...]]) -> None:
        result, facts = outcome
        assert result == 0, result
        self.verdict_state = verdicts.apply_all(self.verdict_state, facts)
        self.decisions.extend(f for f in facts if isinstance(f, QuorumPassed | QuorumFailed))
        self.log.record(uid("verdicts"), facts, self.now, "Verdict")

    def verdict(
        self,
        checker: UUID,
        node: Node,
        provider_id: UUID,
        window_start: datetime,
        failure: FailureKind,
    ) -> None:
        window_end = verdicts.window_end_of(window_start, self.verdict_rules)
        passed = failure is FailureKind.none
        command = Verdict(
            uuid.uuid4(),
            checker,
            node.node_id,
            provider_id,
            window_start,
            window_end,
            latency_ms_p99=180 if passed else 900,
            throughput_milli_per_s=12_000,
            uptime_ppm=999_000 if passed else 640_000,
            passed=passed,
            failure_kind=failure,
            evidence_hash=checker.hex * 2,
        )
        self._verdicts(
            verdicts.submit_verdict(self.verdict_state, command, self.verdict_rules, self.now)
        )

    def decide(self, node: Node, window_start: datetime) -> tuple[Any, ...]:
        outcome = verdicts.decide_window(
            self.verdict_state, node.node_id, window_start, self.verdict_rules, self.now
        )
        self._verdicts(outcome)
        return outcome[1]

    # -- the history -------------------------------------------------------------------------

    def phase_one(self) -> None:
        """Providers register and bond, asks and bids meet, three leases open and beat."""
        self.register(self.p1, self.n1, self.n2)
        self.register(self.p2, self.n3)
        self.bond(self.p1, units(1_500))
        self.bond(self.p2, units(500))
        self.tick(1)
        self.ask("a1", self.p1, self.n1, 4, units(2), 7_200)
        self.ask("a2", self.p2, self.n3, 4, units(5) // 2, 7_200)
        self.ask("a3", self.p1, self.n2, 4, units(1), 7_200)
        self.ask("a4", self.p1, self.n1, 2, units(4), 600)
        self.tick(2)
        self.bid("b1", self.c1, H100, 6, units(3), 3_600, extra=7)
        self.bid("b2", self.c2, H100, 2, units(1) + 123, 3_600)
        self.bid("b3", self.c2, A100, 2, units(1), 1_800, extra=5)
        self.tick(1)
        for lease in list(self.leases.values()):
            self.heartbeat(lease)
        self.charge(self.lease_of("a1", "b1"), units(3), "usage-1")
        self.log.record(
            uid("deposits"), [DepositSeen(self.c1, units(9), self.now)], self.now, "Deposit"
        )

    def phase_two(self) -> None:
        """Usage exhausts and tops up, downtime, expiry, cancels, unbonds, a failed quorum and
        its slash, a fraud slash reaching into unbonding stake, deregistration, closes."""
        l1, l2, l3 = ("a1", "b1"), ("a2", "b1"), ("a3", "b3")
        self.tick(300)
        self.heartbeat(self.lease_of(*l1))
        self.heartbeat(self.lease_of(*l3))
        self.charge(self.lease_of(*l1), units(3), "usage-2")
        self.charge(self.lease_of(*l1), units(5), "usage-3")
        assert self.lease_of(*l1).status is LeaseStatus.paused
        self._lease_facts(lease_rules.top_up(self.lease_of(*l1), units(4), self.now))
        self._lease_facts(
            lease_rules.detect_downtime(self.lease_of(*l2), self.now, self.lease_rules)
        )
        self.tick(400)
        self.expire(H100)
        self.cancel_bid("b2", self.c2, H100)
        self.cancel_ask("a2", self.p2, H100)
        self.heartbeat(self.lease_of(*l2))
        lease = self.lease_of(*l1)
        self._lease_facts(
            lease_rules.close(lease, CloseReason.consumer, self.c1, self.now, self.lease_rules)
        )
        self.unbond(self.p1, units(200))
        self._provider(
            self.p1, provider_rules.list_node(self.providers[self.p1], self.n4, self.now)
        )
        self._provider(
            self.p1, provider_rules.delist_node(self.providers[self.p1], self.n2.node_id, self.now)
        )
        self._provider(
            self.p2, provider_rules.delist_node(self.providers[self.p2], self.n3.node_id, self.now)
        )
        self.unbond(self.p2, units(450))
        # The window of T0 ended at 12:15; verdicts within its grace, then the decision.
        window = verdicts.window_containing(T0, self.verdict_rules)
        self.now = verdicts.window_end_of(window, self.verdict_rules) + timedelta(seconds=10)
        for checker in self.checkers:
            command = RegisterChecker(checker, "0x" + checker.hex[:20] * 2, units(10))
            self._verdicts(
                verdicts.register_checker(self.verdict_state, command, self.verdict_rules, self.now)
            )
        failures = (FailureKind.downtime, FailureKind.downtime, FailureKind.none)
        for checker, failure in zip(self.checkers, failures, strict=True):
            self.verdict(checker, self.n1, self.p1, window, failure)
            self.verdict(checker, self.n3, self.p2, window, FailureKind.none)
        self.tick(61)
        (failed, *_) = self.decide(self.n1, window)
        assert isinstance(failed, QuorumFailed)
        assert isinstance(self.decide(self.n3, window)[0], QuorumPassed)
        self.slash(self.p1, failed.slash_kind, self.n1, failed.window_start)
        self.slash(self.p2, SlashKind.fraud, self.n3, window)
        assert self.slashes[-1].from_unbonding
        self._provider(self.p2, provider_rules.deregister(self.providers[self.p2], self.now))
        self.tick(self.stake_rules.unbond_delay_s)
        self.complete_unbond(self.p1)
        self.complete_unbond(self.p2)
        self.tick(3_600)
        lease = self.lease_of(*l2)
        self._lease_facts(
            lease_rules.close(lease, CloseReason.expiry, PROTOCOL_ID, self.now, self.lease_rules)
        )
        self.log.record(
            uid("deposits"), [DepositSeen(self.c2, units(1), self.now)], self.now, "Deposit"
        )

    def everything(self) -> Story:
        self.phase_one()
        self.phase_two()
        return self


# -- each view against the domain --------------------------------------------------------


def check_book(p: OrderBookProjection, model: str, book: OrderBook, facts: Sequence[Any]) -> None:
    assert orderbook.replay(model, facts) == book
    assert p.depth(model) == BookDepth(model, tuple(book.ask_depth()), tuple(book.bid_depth()))
    assert p.best_ask(model) == book.best_ask()
    assert p.best_bid(model) == book.best_bid()
    row = p.view.book(model)
    if not facts:
        assert row is None
        return
    assert row is not None
    assert (row.sequence, row.latest_at) == (book.sequence, book.now)
    orders = p.orders(model)
    assert len(orders) == book.sequence
    for o in orders:
        if o.side is Side.ask:
            ask = book.ask(o.order_id)
            assert ask is not None
            assert (o.sequence, o.status, o.gpu_count_remaining) == (
                ask.sequence,
                ask.status,
                ask.gpu_count_remaining,
            )
            assert (o.owner_id, o.node_id, o.price_per_gpu_hour, o.expires_at) == (
                ask.ask.provider_id,
                ask.ask.node_id,
                ask.ask.price_per_gpu_hour,
                ask.ask.expires_at,
            )
        else:
            bid = book.bid(o.order_id)
            assert bid is not None
            assert (o.sequence, o.status, o.gpu_count_remaining, o.escrow_remaining) == (
                bid.sequence,
                bid.status,
                bid.gpu_count_remaining,
                bid.escrow_remaining,
            )
            assert (o.owner_id, o.price_per_gpu_hour, o.duration_s, o.escrow) == (
                bid.bid.consumer_id,
                bid.bid.max_price_per_gpu_hour,
                bid.bid.duration_s,
                bid.bid.escrow,
            )
    refunds = {f.bid_id: f.escrow_amount for f in facts if isinstance(f, BidRemainderRefunded)}
    for o in orders:
        if o.side is Side.bid:
            assert o.escrow_refunded == refunds.get(o.order_id, 0)
    assert [o.order_id for o in p.orders(model, resting_only=True)] == [
        s.ask.id for s in sorted(book.resting_asks(), key=lambda s: s.sequence)
    ] + [s.bid.id for s in sorted(book.resting_bids(), key=lambda s: s.sequence)]


def check_orderbook(p: OrderBookProjection, story: Story) -> None:
    assert p.models() == sorted(story.books)
    for model, book in story.books.items():
        check_book(p, model, book, story.book_facts[model])


def check_providers(p: ProvidersProjection, story: Story) -> None:
    assert [r.provider_id for r in p.providers()] == sorted(story.provider_facts)
    for provider_id, facts in story.provider_facts.items():
        provider = provider_rules.replay(facts)
        assert provider is not None
        assert provider == story.providers[provider_id]
        assert p.provider_state(provider_id) == provider
        stake = stake_rules.replay(provider_id, story.stake_facts[provider_id])
        assert stake == story.stakes[provider_id]
        assert p.stake_state(provider_id) == stake
        row = p.provider(provider_id)
        assert row is not None
        assert (row.operator_address, row.registered_at, row.deregistered_at) == (
            provider.operator_address,
            provider.registered_at,
            provider.deregistered_at,
        )
        assert (row.stake_bonded, row.stake_unbonding, row.stake_released, row.stake_slashed) == (
            stake.bonded,
            stake.unbonding_total,
            stake.released,
            stake.slashed,
        )
        nodes = p.nodes(provider_id)
        assert [
            (n.node_id, n.gpu_model, n.gpu_count, n.gpu_memory_mib, n.region) for n in nodes
        ] == [
            (n.node_id, n.gpu_model, n.gpu_count, n.gpu_memory_mib, n.region)
            for n in provider.nodes
        ]
        assert [n.node_id for n in p.nodes(provider_id, listed_only=True)] == [
            n.node_id for n in provider.listed_nodes()
        ]


def check_leases(p: LeasesProjection, story: Story) -> None:
    assert [r.lease.id for r in p.leases()] == [
        lease.id for lease in sorted(story.leases.values(), key=lambda x: (x.opened_at, x.id))
    ]
    for lease_id, facts in story.lease_facts.items():
        row = p.lease(lease_id)
        assert row is not None
        assert row.lease == lease_rules.replay(facts) == story.leases[lease_id]
        assert row.closed_by == story.closed_by.get(lease_id)
    for status in LeaseStatus:
        assert {r.lease.id for r in p.leases(status=status)} == {
            i for i, lease in story.leases.items() if lease.status is status
        }
    assert {r.lease.id for r in p.leases(consumer_id=story.c2)} == {
        i for i, lease in story.leases.items() if lease.consumer_id == story.c2
    }


def expected_history(story: Story, provider_id: UUID) -> ProviderHistory:
    provider = story.providers[provider_id]
    assert provider is not None
    decisions = sorted(
        (d for d in story.decisions if d.provider_id == provider_id),
        key=lambda d: (d.window_start, d.node_id),
    )
    slashes = tuple(s for s in story.slashes if s.provider_id == provider_id)
    return ProviderHistory(provider_id, provider.registered_at, tuple(decisions), slashes)


def check_reputation(p: ReputationProjection, story: Story) -> None:
    histories = [expected_history(story, i) for i in sorted(story.providers)]
    assert p.histories() == histories
    rules = story.verdict_rules
    for history in histories:
        assert p.history(history.provider_id) == history
        for later_s in (0, 86_400, 40 * 86_400):
            now = story.now + timedelta(seconds=later_s)
            assert p.reputation(history.provider_id, now) == verdicts.reputation(
                history, now, rules
            )
    assert p.reputations(story.now) == verdicts.reputations(histories, story.now, rules)
    assert p.history(uid("nobody")) is None
    assert p.reputation(uid("nobody"), story.now) is None


CHECKS: dict[type[AnyProjection], Callable[[Any, Story], None]] = {
    OrderBookProjection: check_orderbook,
    ProvidersProjection: check_providers,
    LeasesProjection: check_leases,
    ReputationProjection: check_reputation,
}


def view_facts_count(app: MarketplaceApplication, cls: type[AnyProjection]) -> int:
    types = cls.recorder_class().fact_types
    return sum(1 for _, e in app.read() if isinstance(e.fact, types))


# -- the tests -------------------------------------------------------------------------------


def test_each_view_equals_the_domains_replay_of_the_log(market: MarketplaceApplication) -> None:
    story = Story(market).everything()
    assert story.slashes and story.decisions and len(story.leases) == 3
    for cls, check in CHECKS.items():
        projection = cls(market, page_size=7)
        applied = projection.catch_up()
        assert applied == view_facts_count(market, cls) > 0, cls
        # Unread fact types and CommandHandled are skipped, their positions tracked.
        assert projection.position() == market.recorder.max_notification_id()
        check(projection, story)


def test_catching_up_twice_applies_nothing_the_second_time(market: MarketplaceApplication) -> None:
    story = Story(market).everything()
    for cls, check in CHECKS.items():
        projection = cls(market, page_size=5)
        assert projection.catch_up() > 0
        before = projection.state_hash()
        position = projection.position()
        assert projection.catch_up() == 0
        assert (projection.state_hash(), projection.position()) == (before, position)
        check(projection, story)


def test_a_restarted_projection_resumes_from_its_tracked_position_and_ends_equal(
    market: MarketplaceApplication,
) -> None:
    story = Story(market)
    story.phase_one()
    positions = {}
    for cls in CHECKS:
        first = cls(market, page_size=4)
        first.catch_up(pages_max=2)
        positions[cls] = first.position()
        assert 0 < positions[cls] < (market.recorder.max_notification_id() or 0)
    story.phase_two()
    for cls, check in CHECKS.items():
        restarted = cls(market, page_size=4)
        assert restarted.position() == positions[cls]
        assert restarted.catch_up() > 0
        assert restarted.position() == market.recorder.max_notification_id()
        check(restarted, story)


def test_a_rebuild_into_a_fresh_schema_has_the_live_views_state_hash(
    market: MarketplaceApplication, other_schema: str
) -> None:
    story = Story(market)
    story.phase_one()
    lives = {cls: cls(market, page_size=6) for cls in CHECKS}
    empty = {cls: live.state_hash() for cls, live in lives.items()}
    for live in lives.values():
        live.catch_up()
    story.phase_two()
    for cls, check in CHECKS.items():
        live = lives[cls]
        live.catch_up()
        rebuilt = live.rebuild_into(other_schema)
        try:
            assert rebuilt.view.datastore.schema == other_schema
            assert rebuilt.position() == live.position()
            assert rebuilt.state_hash() == live.state_hash() != empty[cls]
            check(rebuilt, story)
        finally:
            rebuilt.close()


def test_one_event_at_a_time_through_process_event_gives_the_same_hash(
    market: MarketplaceApplication, other_schema: str
) -> None:
    """The library's per-event entry point (what a ProjectionRunner calls)."""
    Story(market).everything()
    notifications = market.recorder.select_notifications(start=None, limit=10_000)
    events = [
        (market.mapper.to_domain_event(n), Tracking(market.name, n.id)) for n in notifications
    ]
    for cls in CHECKS:
        live = cls(market)
        live.catch_up()
        one_by_one = cls(
            market, construct_view(cls.recorder_class(), market.env, schema=other_schema)
        )
        try:
            for event, tracking in events:
                one_by_one.process_event(event, tracking)
            assert one_by_one.state_hash() == live.state_hash()
            assert one_by_one.position() == live.position()
        finally:
            one_by_one.close()


def test_a_page_already_tracked_is_refused_and_changes_nothing(
    market: MarketplaceApplication,
) -> None:
    story = Story(market).everything()
    notifications = market.recorder.select_notifications(start=None, limit=60)
    page = [(n.id, market.market_mapper.to_domain_event(n)) for n in notifications]
    for cls, check in CHECKS.items():
        projection = cls(market, page_size=20)
        projection.catch_up(pages_max=2)
        position = projection.position()
        before = projection.state_hash()
        assert position == notifications[39].id
        # The library's refusal: the page's tracking is not after the stored position.
        with pytest.raises(IntegrityError):
            projection.view.apply_page(page[:40], Tracking(market.name, position))
        # A page read after 0 but tracked beyond the stored position: the library's upsert
        # alone would take it and apply its first 40 events twice; the view refuses it.
        with pytest.raises(PageAlreadyTrackedError):
            projection.view.apply_page(page, Tracking(market.name, page[-1][0]), after=0)
        assert (projection.state_hash(), projection.position()) == (before, position)
        projection.catch_up()
        check(projection, story)


def race_catch_up(racers: Sequence[AnyProjection]) -> tuple[list[int], list[BaseException]]:
    """Every racer catches up at once, each in its own thread; what each applied, and errors."""
    start = threading.Barrier(len(racers))
    applied: list[int] = []
    errors: list[BaseException] = []

    def race(projection: AnyProjection) -> None:
        try:
            start.wait()
            applied.append(projection.catch_up())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=race, args=(r,)) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return applied, errors


def test_projections_of_one_view_racing_apply_every_event_exactly_once(
    market: MarketplaceApplication, schema: str
) -> None:
    """Pages of different sizes overlap: a page whose first events the other racer applied
    is refused (the tracking alone would accept a longer page and apply them twice)."""
    story = Story(market).everything()
    for cls, check in CHECKS.items():
        racers = [
            cls(
                market, construct_view(cls.recorder_class(), market.env, schema=schema), page_size=n
            )
            for n in (3, 5, 8)
        ]
        applied, errors = race_catch_up(racers)
        try:
            assert not errors, errors
            assert sum(applied) == view_facts_count(market, cls), (cls, applied)
            assert racers[0].position() == market.recorder.max_notification_id()
            check(racers[0], story)
        finally:
            for r in racers:
                r.close()


ORDER_COMMANDS = st.lists(
    st.tuples(
        st.sampled_from(["ask", "ask", "bid", "bid", "cancel_ask", "cancel_bid", "tick"]),
        st.integers(1, 6),
        st.integers(1, 8),
        st.integers(1, 4),
    ),
    max_size=24,
)


def test_random_order_sequences_give_the_domain_books_depth(
    market: MarketplaceApplication,
) -> None:
    projection = OrderBookProjection(market, page_size=16)
    log = Log(market)
    examples = iter(range(10_000))
    provider, node, consumer = uid("hyp-provider"), uid("hyp-node"), uid("hyp-consumer")

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(commands=ORDER_COMMANDS, scale=st.sampled_from([1, 10**18 + 1]))
    def run(commands: list[tuple[str, int, int, int]], scale: int) -> None:
        model = f"HYP-{next(examples)}"
        book = OrderBook(model)
        facts: list[Any] = []
        now = T0
        asks: list[UUID] = []
        bids: list[UUID] = []
        for kind, count, price, extra in commands:
            if kind == "tick":
                now += timedelta(seconds=150 * count)
                outcome: tuple[Any, list[Any]] = (0, book.expire(now))
            elif kind == "ask":
                asks.append(uuid.uuid4())
                expires_at = now + timedelta(seconds=300 * extra)
                ask = Ask(asks[-1], provider, node, model, count, price * scale, expires_at)
                outcome = book.place_ask(ask, now)
            elif kind == "bid":
                bids.append(uuid.uuid4())
                duration_s = 900 * extra
                escrow = escrow_required(count, price * scale, duration_s) + extra - 1
                bid = Bid(bids[-1], consumer, model, count, price * scale, duration_s, escrow)
                outcome = book.place_bid(bid, now)
            elif kind == "cancel_ask" and asks:
                outcome = book.cancel_ask(CancelAsk(asks[count % len(asks)], provider), now)
            elif kind == "cancel_bid" and bids:
                outcome = book.cancel_bid(CancelBid(bids[count % len(bids)], consumer), now)
            else:
                continue
            facts.extend(outcome[1])
            log.record(uid(f"book:{model}"), outcome[1], now, kind)
        projection.catch_up()
        check_book(projection, model, book, facts)

    run()
    assert projection.position() == market.recorder.max_notification_id()
