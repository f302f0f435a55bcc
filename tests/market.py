"""A marketplace on real PostgreSQL for tests: the service, a settable clock, and helpers
that build well-formed commands (ids from names, so a test reads like the market it runs)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4, uuid5

from domain.lease import DEMO_LEASE_RULES
from domain.orderbook import Ask, Bid, escrow_required
from domain.providers import Node
from domain.verdicts import FailureKind, Verdict, window_containing, window_end_of
from ledger.market import service as m
from ledger.market.store import MarketplaceApplication
from ledger.money import units
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter

NAMES = UUID("0c6f1d0e-1111-4a4a-9c9c-000000000001")
START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RULES = m.MarketRules(lease=DEMO_LEASE_RULES)


def uid(name: str) -> UUID:
    return uuid5(NAMES, name)


def address(name: str) -> str:
    return "0x" + hashlib.sha256(name.encode()).hexdigest()[:40]


def key(name: str) -> str:
    return hashlib.sha256(b"key:" + name.encode()).hexdigest()


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@dataclass
class Market:
    """The service plus helpers. Every helper sends one command with a fresh id."""

    service: m.Marketplace
    clock: Clock
    writer: LedgerWriter
    app: MarketplaceApplication
    heartbeat_sequences: dict[UUID, int] = field(default_factory=dict)

    def send(self, command: m.Command) -> m.Handled:
        return self.service.handle(command)

    def node(self, name: str, gpu_model: str = "H100", gpu_count: int = 2) -> Node:
        return Node(uid(name), gpu_model, gpu_count, 81_920, "eu-west", key(name))

    def provider(self, name: str, *nodes: Node, bond: int | None = None) -> UUID:
        pid = uid(name)
        self.send(m.RegisterProvider(uuid4(), pid, address(name), tuple(nodes)))
        if bond:
            self.send(m.BondStake(uuid4(), pid, bond))
        return pid

    def deposit(self, consumer: str, amount: int) -> UUID:
        cid = uid(consumer)
        self.send(m.ConfirmDeposit(uuid4(), uuid4(), cid, amount, f"0x{uuid4().hex}:0"))
        return cid

    def ask(
        self,
        name: str,
        provider: str,
        node: str,
        price: int,
        gpu_count: int = 1,
        gpu_model: str = "H100",
        ttl_s: int = 3_600,
    ) -> m.Handled:
        ask = Ask(
            uid(name),
            uid(provider),
            uid(node),
            gpu_model,
            gpu_count,
            price,
            self.clock.now + timedelta(seconds=ttl_s),
        )
        return self.send(m.PlaceAsk(uuid4(), ask))

    def bid(
        self,
        name: str,
        consumer: str,
        max_price: int,
        gpu_count: int = 1,
        duration_s: int = 3_600,
        gpu_model: str = "H100",
        escrow: int | None = None,
    ) -> m.Handled:
        if escrow is None:
            escrow = escrow_required(gpu_count, max_price, duration_s)
        bid = Bid(uid(name), uid(consumer), gpu_model, gpu_count, max_price, duration_s, escrow)
        return self.send(m.PlaceBid(uuid4(), bid))

    def checker(self, name: str, stake: int = units(10)) -> UUID:
        cid = uid(name)
        self.send(m.RegisterChecker(uuid4(), cid, address(name), stake))
        return cid

    def heartbeat(self, lease_id: UUID) -> m.Handled:
        lease = self.service.lease(lease_id)
        assert lease is not None
        seq = self.heartbeat_sequences.get(lease_id, 0) + 1
        self.heartbeat_sequences[lease_id] = seq
        return self.send(m.RecordHeartbeat(uuid4(), lease_id, lease.node_id, seq, self.clock.now))

    def verdict(
        self,
        checker: str,
        node: str,
        provider: str,
        window_start: datetime,
        passed: bool,
        kind: FailureKind = FailureKind.downtime,
    ) -> m.Handled:
        v = Verdict(
            uuid4(),
            uid(checker),
            uid(node),
            uid(provider),
            window_start,
            window_end_of(window_start, self.service.rules.verdicts),
            120 if passed else 5_000,
            1_000_000,
            1_000_000 if passed else 100_000,
            passed,
            FailureKind.none if passed else kind,
            "ab" * 32,
        )
        return self.send(m.SubmitVerdict(uuid4(), v))

    def window(self) -> datetime:
        return window_containing(self.clock.now, self.service.rules.verdicts)

    def tick(self) -> m.Handled:
        return self.send(m.Tick(uuid4()))


def build_market(
    ledger_app: LedgerApplication, env: dict[str, str], rules: m.MarketRules = RULES
) -> Market:
    clock = Clock()
    writer = LedgerWriter(ledger_app)
    app = MarketplaceApplication(ledger_app.app_recorder.datastore, env=env)
    service = m.Marketplace(app, writer, rules=rules, clock=clock)
    return Market(service, clock, writer, app)
