"""A small settled marketplace for the earnings, API and query CLI tests: two providers,
two consumers, three checkers; usage recorded through the usage store; a failed window
on p1's node (slash and refund); epochs settled by the settle worker; a late report
left pending; a claim by p2; every view projected."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from uuid import UUID, uuid4

from domain.lease import DEMO_LEASE_RULES
from domain.orderbook import lease_cost
from domain.settlement import SettlementRules
from domain.usage import UsageRecorded
from domain.verdicts import FailureKind
from ledger.market import service as m
from ledger.money import units
from ledger.settlement import SettlementApplication, SettlementLog
from ledger.store import LedgerApplication
from ledger.usage import OffsetAdvance, UsageApplication
from tests.market import START, Market, build_market, uid
from workers.settle import Settler

PRICE = units(2)
EPOCH_S = 600
RULES = m.MarketRules(lease=replace(DEMO_LEASE_RULES, release_escrow_at_close=False))


def cost(seconds: int) -> int:
    return lease_cost(1, PRICE, seconds)


class Reports:
    """Usage records of one lease, written through the usage store like ingest does."""

    offset = 0
    """Shared by every lease: one partition of one group."""

    def __init__(self, usage: UsageApplication, lease_id: UUID, node: str) -> None:
        self.usage = usage
        self.lease_id = lease_id
        self.node = node
        self.sequence = 0

    def add(self, start_s: int, end_s: int, received_s: float) -> UsageRecorded:
        self.sequence += 1
        start = START + timedelta(seconds=start_s)
        record = UsageRecorded(
            uuid4(), self.lease_id, uid(self.node), self.sequence, start,
            START + timedelta(seconds=end_s), 1, (end_s - start_s) * 10**6,
            (end_s - start_s) * 9 * 10**5, 10**12, 10, 100, 5, 1_000, "train", "cpu",
            START + timedelta(seconds=received_s),
        )  # fmt: skip
        before = Reports.offset or None
        Reports.offset += 1
        self.usage.record(
            [record], "earnings-test", [OffsetAdvance("usage", 0, before, Reports.offset)]
        )
        return record


@dataclass
class Scenario:
    market: Market
    usage: UsageApplication
    settlements: SettlementLog
    settler: Settler
    leases: dict[str, UUID]
    reports: dict[str, list[UsageRecorded]]
    settled_epochs: list[int]
    claimed: int
    """What p2 claimed."""


def build_scenario(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Scenario:
    Reports.offset = 0
    market = build_market(ledger_app, ledger_env, rules=RULES)
    datastore = ledger_app.app_recorder.datastore
    usage = UsageApplication(datastore, env=ledger_env)
    settlements = SettlementLog(SettlementApplication(datastore, env=ledger_env))
    rules = SettlementRules(epoch_s=EPOCH_S, posting=market.service.rules.postings)
    settler = Settler(
        market.service, usage, settlements, rules=rules, release_delay_s=30, clock=market.clock
    )
    market.provider("p1", market.node("n1", gpu_count=1), bond=units(1_000))
    market.provider("p2", market.node("n2", gpu_count=1), bond=units(1_000))
    market.deposit("c1", units(100))
    market.deposit("c2", units(100))
    for name in ("k1", "k2", "k3"):
        market.checker(name)
    market.ask("a1", "p1", "n1", PRICE, ttl_s=86_400)
    (l1,) = market.bid("b1", "c1", PRICE, duration_s=7_200).lease_ids
    market.ask("a2", "p2", "n2", PRICE, ttl_s=86_400)
    (l2,) = market.bid("b2", "c2", PRICE, duration_s=7_200).lease_ids
    r1, r2 = Reports(usage, l1, "n1"), Reports(usage, l2, "n2")
    recorded: dict[str, list[UsageRecorded]] = {"l1": [], "l2": []}

    window_s = market.service.rules.verdicts.verdict_window_s
    window = market.window()
    recorded["l1"].append(r1.add(0, window_s, window_s + 1))
    recorded["l2"].append(r2.add(0, 300, 301))
    market.clock.advance(window_s)
    for name, passed in (("k1", False), ("k2", False), ("k3", True)):
        market.verdict(name, "n1", "p1", window, passed, FailureKind.downtime)
    market.clock.advance(window_s + market.service.rules.verdicts.verdict_grace_s)
    market.tick()
    decided_s = int((market.clock.now - START).total_seconds())
    recorded["l1"].append(r1.add(window_s, 2 * window_s, decided_s))
    recorded["l2"].append(r2.add(300, 600, decided_s))

    market.clock.now = START + timedelta(seconds=decided_s + EPOCH_S * 2)
    done = settler.settle_due()
    settled_epochs = [r.record.plan.epoch for r in done]
    last = done[-1].record.settled
    assert last is not None
    p2 = next(p for p in last.payouts if p.provider_id == uid("p2"))
    market.send(
        m.RecordPayoutClaim(
            uuid4(), uid("p2"), last.epoch, p2.cumulative, p2.cumulative, f"0x{uuid4().hex}:0"
        )
    )
    now_s = int((market.clock.now - START).total_seconds())
    recorded["l2"].append(r2.add(600, 900, now_s))
    """Recorded after the last settlement: pending."""
    return Scenario(
        market,
        usage,
        settlements,
        settler,
        {"l1": l1, "l2": l2},
        recorded,
        settled_epochs,
        p2.cumulative,
    )
