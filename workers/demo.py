"""`aether demo`: a small GPU marketplace, from stake to slash to payout, on the embedded
default.

Two providers bond stake on chain and ask; two consumers deposit into the chain's vault and
bid (the chain watcher credits both in the ledger); leases open at the ask price with their
escrow held; nodes send heartbeats and their usage is recorded in the usage store (as
ingest records it); one node goes down; three checkers judge the window and reach a
quorum; the provider is slashed (mirrored on chain), the affected consumer refunded out of
the slash and the checker who vouched for the dead node penalised. Two 10-minute epochs
are settled (usage priced at the lease price, drawn from escrow, fee, checker rewards),
their payout roots posted on chain, and a provider claims its cumulative payout with its
proof from the settlement log. Then it prints the order book, the leases, reputation,
every balance, the settlement log and the reconciliation of the last epoch.

Market time is simulated (the rules take time as an argument), starting at
`DEMO_START`, so a 15-minute verdict window passes in a second. Every id, command ids
included, is derived from a name: running the demo again on the same database retries
every command, and the service answers each as a retry; nothing is recorded twice.

The chain is the in-process EVM (`workers.chain.embedded_chain`), fresh in every run. The
demo sends the same transactions from the same accounts in the same order every run, so
each has the same transaction hash and log index as the first time: the watcher's
commands, keyed by them, are retries on a rerun. The payout roots a rerun finds in the
settlement log (posted on the first run's chain) are posted again on the new chain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.codes import AccountCode
from domain.lease import DEMO_LEASE_RULES, CloseReason, Lease, lease_id_for
from domain.orderbook import Ask, Bid, escrow_required
from domain.postings import account_id, protocol_account_id
from domain.providers import Node
from domain.settlement import SettlementRules
from domain.usage import UsageRecorded
from domain.verdicts import FailureKind, Verdict, window_containing, window_end_of
from ledger.config import Settings
from ledger.market import service as m
from ledger.money import format_amount, units
from ledger.settlement import (
    EpochRecord,
    SettlementApplication,
    SettlementLog,
    ledger_at_settlement,
)
from ledger.usage import OffsetAdvance, UsageApplication
from workers.bootstrap import Market, open_market
from workers.broker import kafka_from
from workers.chain import ChainSide, PollResult, connect, embedded_chain, mine_blocks
from workers.live import LiveLease, describe, node_key, run_live
from workers.projector import Views, open_views
from workers.reconcile import Report, reconcile
from workers.report import lines_of_view, print_accounts
from workers.settle import Settler, SettleReport, epoch_of, epoch_start_of
from workers.workloads import WorkloadKind

DEMO_START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
"""Market time of the demo's first command (a verdict window starts here). The simulated
story lies in the past, so the live part that follows runs at the real time."""
HEARTBEAT_STEP_S = 5
USAGE_STEP_S = 60
ASSET = "AETH"
EPOCH_S = 600
AUDIT_CHECKPOINT_SIZE = 256
"""Events per audit checkpoint in the demo (a few checkpoints over its log)."""
"""Settlement epochs of 10 minutes: the story spans two."""
SETTLE_DELAY_S = 120
RELEASE_DELAY_S = 60
CONFIRMATIONS = 2
"""The chain watcher's confirmation depth (the demo mines the blocks)."""
METER_GROUP = "aether-demo-meter"
METER_TOPIC = "aether-demo-meter"
"""Where the simulated leases' usage records are "consumed" from (one partition): the
usage store keeps its offset with the records, as for ingest, so a rerun resumes there."""
CHAIN_ACCOUNT = {"atlas": 5, "borealis": 6, "alice": 7, "bob": 8, "cirrus": 9}
"""Index in the in-process chain's unlocked accounts (0..4 act for the protocol)."""


def _id(name: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"aether-demo:{name}")


def _key(name: str) -> str:
    return node_key(name).public_key_hex


def _address(name: str) -> str:
    return "0x" + (uuid5(NAMESPACE_URL, f"aether-demo-address:{name}").hex * 2)[:40]


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _aeth(amount: int) -> str:
    return f"{format_amount(amount)} {ASSET}"


@dataclass
class _Clock:
    now: datetime = DEMO_START
    live: bool = False
    """From the live part on: the real time."""

    def __call__(self) -> datetime:
        if self.live:
            self.now = datetime.now(UTC)
        return self.now


@dataclass
class _Demo:
    service: m.Marketplace
    clock: _Clock
    usage: UsageApplication
    side: ChainSide
    settler: Settler
    retried: int = 0
    sent: int = 0
    sequences: dict[UUID, int] = field(default_factory=dict)
    names: dict[UUID, str] = field(default_factory=dict)
    usage_sequences: dict[UUID, int] = field(default_factory=dict)
    meter_offset: int = 0
    meter_stored: int = 0
    """The usage store's offset of METER_GROUP at the start: records below it are stored."""
    usage_stored_before: int = 0
    """Usage records of this run found stored already (a rerun)."""
    epochs: list[int] = field(default_factory=list)

    quiet: bool = False
    """Set when the first command was a retry: the demo ran on this database before, so the
    story's intermediate figures would show the final state; only the tables are printed."""

    def send(self, name: str, kind: Callable[..., m.Command], *fields: Any) -> m.Handled:
        """Send the command `kind(command_id, *fields)`, its id derived from `name`."""
        handled = self.service.handle(kind(_id(f"command:{name}"), *fields))
        if self.sent == 0 and handled.retried:
            self.quiet = True
            print("this database has seen the demo before: every command is sent again, as a retry")
        self.sent += 1
        self.retried += handled.retried
        return handled

    def count(self, commands: int, retried: int) -> None:
        """Count the commands a worker sent (the chain watcher, the settler)."""
        self.sent += commands
        self.retried += retried

    def account(self, name: str) -> str:
        """`name`'s account on the in-process chain."""
        return str(self.side.chain.w3.eth.accounts[CHAIN_ACCOUNT[name]])

    def poll(self) -> PollResult:
        """Mine the confirmation depth and let the chain watcher take what is deep enough."""
        mine_blocks(self.side.chain, CONFIRMATIONS)
        polled = self.side.watcher.poll()
        if polled.skipped:
            raise RuntimeError(f"the chain watcher skipped logs: {polled.skipped}")
        self.count(polled.handled + polled.retried, polled.retried)
        return polled

    def meter(self, lease: Lease) -> None:
        """Record the lease's usage of the last USAGE_STEP_S in the usage store, as ingest
        records a node's signed report (settlement prices it)."""
        sequence = self.usage_sequences.get(lease.id, 0) + 1
        self.usage_sequences[lease.id] = sequence
        offset = self.meter_offset
        self.meter_offset += 1
        if offset < self.meter_stored:
            self.usage_stored_before += 1
            return
        end = self.clock.now
        busy_us = lease.gpu_count * USAGE_STEP_S * 900_000
        record = UsageRecorded(
            _id(f"usage:{lease.id}:{sequence}"), lease.id, lease.node_id, sequence,
            end - timedelta(seconds=USAGE_STEP_S), end, lease.gpu_count,
            USAGE_STEP_S * 10**6, busy_us, busy_us * 10**8, 12_000, 0, 3_000, 60 << 30,
            "train", "cuda", end,
        )  # fmt: skip
        advance = OffsetAdvance(METER_TOPIC, 0, offset or None, offset + 1)
        self.usage.record([record], METER_GROUP, [advance])

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"  [{self.clock.now:%H:%M:%S}] {text}")

    def heading(self, text: str) -> None:
        if not self.quiet:
            print(text)

    def advance(self, seconds: int, beating: list[UUID], charging: list[UUID]) -> None:
        """Let market time pass: heartbeats of the `beating` leases every 5 s, usage records
        of the `charging` leases every minute, a tick every step."""
        end = self.clock.now + timedelta(seconds=seconds)
        while self.clock.now < end:
            self.clock.now += timedelta(seconds=HEARTBEAT_STEP_S)
            stamp = self.clock.now.isoformat()
            for lease_id in beating:
                lease = self._lease(lease_id)
                sequence = self.sequences.get(lease_id, 0) + 1
                self.sequences[lease_id] = sequence
                self.send(
                    f"heartbeat:{lease_id}:{sequence}",
                    m.RecordHeartbeat,
                    lease.id,
                    lease.node_id,
                    sequence,
                    self.clock.now,
                )
            elapsed_s = int((self.clock.now - DEMO_START).total_seconds())
            if elapsed_s % USAGE_STEP_S == 0:
                for lease_id in charging:
                    self.meter(self._lease(lease_id))
            self.send(f"tick:{stamp}", m.Tick)

    def _lease(self, lease_id: UUID) -> Lease:
        lease = self.service.lease(lease_id)
        assert lease is not None
        return lease


DEMO_RULES = m.MarketRules(lease=replace(DEMO_LEASE_RULES, release_escrow_at_close=False))
"""The demo's rules, settling: a close keeps the lease's escrow until settlement has
charged its last usage (`workers.bootstrap.DEPLOYED_MARKET_RULES`)."""


def run_demo(settings: Settings) -> int:
    clock = _Clock()
    rules = DEMO_RULES
    with open_market(settings, rules=rules, clock=clock) as market:
        where = "embedded PostgreSQL" if market.ledger.embedded else "DATABASE_URL"
        print(
            f"aether demo: a GPU marketplace on {where}, ledger shard {market.ledger.writer.shard}"
        )
        print(f"market time starts at {DEMO_START.isoformat()} (simulated)")
        print(
            "chain: a fresh in-process EVM (eth-tester) with the token, staking, payout "
            "distributor and deposit vault contracts\n"
        )
        datastore, env = market.ledger.app.app_recorder.datastore, market.ledger.app.env
        usage = UsageApplication(datastore, env=env)
        settlements = SettlementLog(SettlementApplication(datastore, env=env))
        side = connect(embedded_chain(), market.service, market.app, confirmations=CONFIRMATIONS)
        settler = Settler(
            market.service,
            usage,
            settlements,
            rules=SettlementRules(epoch_s=EPOCH_S, posting=rules.postings),
            gateway=side.gateway,
            release_delay_s=RELEASE_DELAY_S,
            settle_delay_s=SETTLE_DELAY_S,
            clock=m.utc_now,
            # the ledger's records carry the real time: settled_at must too (the
            # reconciliation reads the ledger as of it)
        )
        demo = _Demo(market.service, clock, usage, side, settler)
        demo.meter_stored = usage.stored_offsets(METER_GROUP, [(METER_TOPIC, 0)]).get(
            (METER_TOPIC, 0), 0
        )
        _run(demo)
        if demo.quiet:
            print("(the live part ran the first time: its workers are not started again)")
            _name_live_part(demo)
        else:
            _live(demo, market, settings)
        demo.poll()
        demo.side.mirror.mirror()
        with open_views(market.ledger.app, market.app) as views:
            balanced = _print_views(views, demo.names, _log_time(market), rules)
        report = _print_settlement(demo, market)
        _print_earnings(demo, market, settings)
        audited = _audit(demo, market, settings)
        if demo.quiet:
            print(
                f"\n{demo.retried} of {demo.sent} commands were answered as retries; "
                f"{demo.usage_stored_before} usage records were stored already; "
                "nothing was recorded twice"
            )
        return 0 if balanced and not report.flagged and audited else 3


def _run(demo: _Demo) -> None:
    service = demo.service
    rules = service.rules
    k = rules.stake.stake_per_gpu["H100"]
    names = demo.names

    demo.heading(
        "providers register nodes and bond stake on chain (K = " + _aeth(k) + " per H100); "
        f"the chain watcher credits each bond after {CONFIRMATIONS} confirmations"
    )
    fleet = {
        "atlas": Node(_id("node:atlas-1"), "H100", 4, 81_920, "eu-west", _key("atlas-1")),
        "borealis": Node(_id("node:borealis-1"), "H100", 2, 81_920, "us-east", _key("borealis-1")),
    }
    for name, node in fleet.items():
        pid = _id(f"provider:{name}")
        names[pid] = name
        demo.send(f"register:{name}", m.RegisterProvider, pid, demo.account(name), (node,))
    for name, node in fleet.items():
        stake = node.gpu_count * k
        _bond_on_chain(demo, name, stake)
        demo.say(
            f"{name}: node {node.gpu_count} x {node.gpu_model} in {node.region}, operator "
            f"{demo.account(name)[:10]}..., bonded {_aeth(stake)} in Staking"
        )
    demo.poll()
    for name in fleet:
        demo.say(
            f"{name}'s bond credited: {_aeth(service.stake_of(_id(f'provider:{name}')).bonded)}"
        )
    try:
        stranger = _ask("ask:nobody", "nobody", fleet["atlas"], 4, units(1), demo.clock.now)
        demo.send("ask:unbonded", m.PlaceAsk, stranger)
    except m.MarketError as e:
        demo.say(f"an ask by an unregistered provider is refused: {e.code}")

    demo.heading(
        "\nconsumers deposit into the chain's vault (confirmed on chain) and the book fills"
    )
    d = demo.side.chain.deployment
    for name, amount in (("alice", units(100)), ("bob", units(60))):
        cid = _id(f"consumer:{name}")
        names[cid] = name
        d.mint(demo.account(name), amount)
        d.deposit(demo.account(name), cid, amount)
    demo.poll()
    for name in ("alice", "bob"):
        credited = service.available(_id(f"consumer:{name}"))
        demo.say(f"{name} deposits {_aeth(credited)} into the vault, credited by the watcher")
    asks = {
        "atlas": _ask("ask:atlas", "atlas", fleet["atlas"], 4, units(25, 17), demo.clock.now),
        "borealis": _ask(
            "ask:borealis", "borealis", fleet["borealis"], 2, units(2), demo.clock.now
        ),
    }
    for name, ask in asks.items():
        demo.send(f"ask:{name}", m.PlaceAsk, ask)
        demo.say(f"{name} asks {ask.gpu_count} x H100 at {_aeth(ask.price_per_gpu_hour)}/GPU-hour")
    bids = [
        ("bid:alice", "alice", 2, units(3), 2 * 3_600),
        ("bid:bob-cheap", "bob", 3, units(24, 17), 3_600),
        ("bid:bob", "bob", 1, units(3), 3_600),
    ]
    leases: dict[str, UUID] = {}
    for bid_name, consumer, gpus, max_price, duration_s in bids:
        bid = Bid(
            _id(bid_name),
            _id(f"consumer:{consumer}"),
            "H100",
            gpus,
            max_price,
            duration_s,
            escrow_required(gpus, max_price, duration_s),
        )
        names[bid.id] = bid_name.replace(":", " ")
        handled = demo.send(bid_name, m.PlaceBid, bid)
        text = (
            f"{consumer} bids {gpus} x H100 for {duration_s // 3_600} h at most "
            f"{_aeth(max_price)}/GPU-hour, escrow {_aeth(bid.escrow)}"
        )
        if handled.lease_ids:
            for lease_id in handled.lease_ids:
                lease = demo._lease(lease_id)
                provider = names[lease.provider_id]
                leases[consumer] = lease_id
                names[lease_id] = f"lease {consumer}/{provider}"
                text += (
                    f"\n{'':13}-> lease with {provider} at {_aeth(lease.price_per_gpu_hour)}, "
                    f"{_aeth(lease.escrow_held)} in lease escrow"
                )
        else:
            text += "\n" + " " * 13 + "-> rests in the book (no ask at or below its price)"
        demo.say(text)
    try:
        demo.send(
            "bid:bob-broke",
            m.PlaceBid,
            Bid(
                _id("bid:bob-broke"),
                _id("consumer:bob"),
                "H100",
                4,
                units(3),
                3_600 * 10,
                units(120),
            ),
        )
    except m.MarketError as e:
        demo.say(f"bob bids beyond his funds: refused ({e.code}), nothing recorded")

    demo.heading(
        "\nthe leases run: heartbeats every 5 s, a usage record every minute (in the usage "
        "store, as ingest records them)"
    )
    alice, bob = leases["alice"], leases["bob"]
    demo.advance(300, beating=[alice, bob], charging=[alice, bob])
    demo.say(
        f"usage recorded so far: alice {demo.usage_sequences[alice]} records, "
        f"bob {demo.usage_sequences[bob]}; settlement prices them when their epoch ends"
    )
    demo.heading("\nborealis-1 goes dark: no heartbeats, no usage")
    demo.advance(30, beating=[bob], charging=[bob])
    down = demo._lease(alice)
    demo.say(
        f"downtime detected on alice's lease (no heartbeat for over {rules.lease.heartbeat_timeout_s} s): {down.downtime_open}"
    )

    demo.heading("\ncheckers register with stake and judge the 15-minute window")
    checkers = ["kestrel", "lynx", "marten"]
    for name in checkers:
        cid = _id(f"checker:{name}")
        names[cid] = f"checker {name}"
        stake_min = rules.verdicts.checker_stake_min
        demo.send(f"checker:{name}", m.RegisterChecker, cid, _address(name), stake_min)
    window = window_containing(DEMO_START, rules.verdicts)
    window_end = window_end_of(window, rules.verdicts)
    demo.advance(int((window_end - demo.clock.now).total_seconds()), beating=[bob], charging=[bob])
    verdicts = [
        ("kestrel", "borealis", False),
        ("lynx", "borealis", False),
        ("marten", "borealis", True),  # vouches for a dead node
        ("kestrel", "atlas", True),
        ("lynx", "atlas", True),
        ("marten", "atlas", True),
    ]
    for checker, provider, passed in verdicts:
        node = fleet[provider]
        verdict = Verdict(
            _id(f"verdict:{checker}:{provider}"),
            _id(f"checker:{checker}"),
            node.node_id,
            _id(f"provider:{provider}"),
            window,
            window_end,
            140 if passed else 30_000,
            2_000_000 if passed else 0,
            1_000_000 if passed else 330_000,
            passed,
            FailureKind.none if passed else FailureKind.downtime,
            (_id(f"evidence:{checker}:{provider}").hex * 2),
        )
        demo.send(f"verdict:{checker}:{provider}", m.SubmitVerdict, verdict)
        demo.say(f"{checker} on {provider}-1: {'pass' if passed else 'FAIL (downtime)'}")
    demo.advance(rules.verdicts.verdict_grace_s, beating=[bob], charging=[bob])
    borealis = service.stake_of(_id("provider:borealis"))
    demo.say(
        f"quorum failed for borealis-1 (2 of 3 checkers): slashed {_aeth(borealis.slashed)} "
        f"(a third of K for each of its 2 GPUs) into the insurance pool"
    )
    for refund in service.state.refunds:
        demo.say(
            f"{names[refund.consumer_id]} refunded {_aeth(refund.amount)} out of the slash "
            f"(the failed window at the lease price)"
        )
    penalized = (
        rules.verdicts.checker_stake_min - service.state.checker_stake_left[_id("checker:marten")]
    )
    demo.say(f"marten, contradicted by the quorum, loses {_aeth(penalized)} of its stake")
    mirrored = demo.side.mirror.mirror()
    borealis_chain = demo.side.reader.stake_of(demo.account("borealis"))
    demo.say(
        f"the slash mirror sends the slash to Staking ({mirrored.sent} transaction): "
        f"borealis's stake on chain is {_aeth(borealis_chain)}, as in the ledger"
    )

    demo.heading("\nalice ends her lease; its escrow stays held until settlement charges its usage")
    demo.send("close:alice", m.CloseLease, alice, CloseReason.consumer, _id("consumer:alice"))
    demo.say(f"alice's lease closed, {_aeth(demo._lease(alice).escrow_held)} still in escrow")
    _settle(demo, alice, bob)


def _name_live_part(demo: _Demo) -> None:
    """Names of what the live part created (for the tables of a rerun that skips it)."""
    demo.names[_id("provider:cirrus")] = "cirrus"
    lease_id = lease_id_for(_id("ask:cirrus"), _id("bid:bob-cheap"))
    demo.names[lease_id] = "lease bob/cirrus"
    second = lease_id_for(_id("ask:cirrus-2"), _id("bid:bob-cheap"))
    demo.names[second] = "lease bob/cirrus-2"
    _cirrus_bonds(demo)


def _cirrus_bonds(demo: _Demo) -> None:
    """cirrus bonds on chain (also on a rerun: the chain is new, the watcher's command a
    retry)."""
    _bond_on_chain(demo, "cirrus", 3 * demo.service.rules.stake.stake_per_gpu["H100"])
    demo.poll()


def _live(demo: _Demo, market: Market, settings: Settings) -> None:
    """Real workers through the broker, at the real time (see workers/live.py)."""
    demo.clock.live = True
    names = demo.names
    demo.heading(
        "\nlive: two GPU workers (training and inference), ingest and a checker through "
        "the Kafka-protocol broker, at the real time"
    )
    node = Node(_id("node:cirrus-1"), "H100", 2, 81_920, "eu-north", _key("cirrus-1"))
    node2 = Node(_id("node:cirrus-2"), "H100", 1, 81_920, "eu-north", _key("cirrus-2"))
    pid = _id("provider:cirrus")
    names[pid] = "cirrus"
    demo.send("register:cirrus", m.RegisterProvider, pid, demo.account("cirrus"), (node, node2))
    _cirrus_bonds(demo)
    live: list[LiveLease] = []
    for ask_name, on, gpus, workload in (
        ("ask:cirrus", node, 2, WorkloadKind.train),
        ("ask:cirrus-2", node2, 1, WorkloadKind.infer),
    ):
        ask = _ask(ask_name, "cirrus", on, gpus, units(22, 17), demo.clock())
        handled = demo.send(ask_name, m.PlaceAsk, ask)
        (lease_id,) = handled.lease_ids
        lease = demo._lease(lease_id)
        label = "cirrus" if on is node else "cirrus-2"
        names[lease_id] = f"lease {names[lease.consumer_id]}/{label}"
        demo.say(
            f"cirrus lists {gpus} x H100 on node {label} in eu-north and asks "
            f"{_aeth(ask.price_per_gpu_hour)}/GPU-hour: it fills {names[lease.consumer_id]}'s "
            "resting bid, a lease opens now"
        )
        key_name = "cirrus-1" if on is node else "cirrus-2"
        live.append(LiveLease(lease_id, on, node_key(key_name), workload))
    with kafka_from(settings.kafka_bootstrap_servers) as kafka:
        result = asyncio.run(
            run_live(
                demo.service,
                demo.usage,
                kafka,
                leases=live,
                checker_id=_id("checker:kestrel"),
                say=demo.say,
            )
        )
    describe(result, demo.say)


def _ask(name: str, provider: str, node: Node, gpus: int, price: int, now: datetime) -> Ask:
    return Ask(
        _id(name),
        _id(f"provider:{provider}"),
        node.node_id,
        node.gpu_model,
        gpus,
        price,
        now + timedelta(hours=6),
    )


def _print_views(views: Views, names: dict[UUID, str], now: datetime, rules: m.MarketRules) -> bool:
    """Print the read models (projections of the logs, each exactly-once and tracked)."""
    applied = views.catch_up()
    positions = views.positions()
    print(
        "\nread models, projected from the logs: "
        + ", ".join(f"{name} at {positions[name]}" for name in applied)
    )
    for model in views.orderbook.models():
        depth = views.orderbook.depth(model)
        print(f"\norder book {model} (price per GPU-hour: GPUs resting)")
        for level in depth.asks:
            print(f"  ask {_aeth(level.price_per_gpu_hour):>14}: {level.gpu_count}")
        for level in depth.bids:
            print(f"  bid {_aeth(level.price_per_gpu_hour):>14}: {level.gpu_count}")
        best_bid, best_ask = views.orderbook.best_bid(model), views.orderbook.best_ask(model)
        if best_bid is not None and best_ask is not None:
            print(f"  spread {_aeth(best_ask - best_bid)}: the book does not cross")

    print("\nleases")
    print(
        f"  {'lease':<24} {'status':<8} {'GPUs':>4} {'held':>10} {'charged':>22} "
        f"{'released':>22} {'downtime':>9}"
    )
    for row in sorted(views.leases.leases(), key=lambda r: (r.lease.opened_at, str(r.lease.id))):
        lease = row.lease
        print(
            f"  {names.get(lease.id, str(lease.id)[:8]):<24} {lease.status.name:<8} "
            f"{lease.gpu_count:>4} {format_amount(lease.escrow_held):>10} "
            f"{format_amount(lease.escrow_charged):>22} {format_amount(lease.escrow_released):>22} "
            f"{lease.downtime_s:>7} s"
        )

    print("\nproviders")
    for provider in views.providers.providers():
        stake = views.providers.stake_state(provider.provider_id)
        assert stake is not None
        print(
            f"  {names.get(provider.provider_id, str(provider.provider_id)[:8]):<10} bonded "
            f"{_aeth(stake.bonded):>26}, slashed {_aeth(stake.slashed)}"
        )

    print(
        "\nreputation in basis points (40% uptime, 30% windows passed, 20% latency, 10% age, "
        "minus 25% per slash)"
    )
    for score in views.reputation.reputations(now, rules.verdicts).values():
        print(
            f"  {names.get(score.provider_id, str(score.provider_id)[:8]):<10} "
            f"{score.score_bps:>6}  (windows {score.windows_passed_count}/"
            f"{score.windows_decided_count} passed, uptime {score.uptime_ppm_mean / 10_000:.1f}%, "
            f"p99 {score.latency_ms_p99_mean} ms, slashes {score.slashes_count})"
        )
    print()
    return print_accounts(lines_of_view(views.balances.rows()), _account_names(names))


def _account_names(names: dict[UUID, str]) -> dict[UUID, str]:
    out: dict[UUID, str] = {
        protocol_account_id(AccountCode.chain_custody): "chain custody",
        protocol_account_id(AccountCode.protocol_treasury): "protocol treasury",
        protocol_account_id(AccountCode.insurance_pool): "insurance pool",
    }
    for owner, name in names.items():
        for code in AccountCode:
            out[account_id(code, owner)] = name
    return out


# -- settlement and the chain -----------------------------------------------------------------


def _bond_on_chain(demo: _Demo, name: str, amount: int) -> None:
    """`name` gets `amount` of the token and bonds it in Staking (the watcher credits it)."""
    d = demo.side.chain.deployment
    d.mint(demo.account(name), amount)
    d.bond(demo.account(name), amount)


def _settle(demo: _Demo, alice: UUID, bob: UUID) -> None:
    """Settle the story's two epochs (and one again), post the roots, let atlas claim."""
    settler = demo.settler
    first = epoch_of(DEMO_START, settler.rules)
    demo.epochs = [first, first + 1]
    settle_at = epoch_start_of(first + 2, settler.rules) + settler.settle_delay
    demo.heading(
        f"\nbob's lease runs on past the end of the second {EPOCH_S // 60}-minute epoch "
        "(and the settle delay)"
    )
    demo.advance(int((settle_at - demo.clock.now).total_seconds()), beating=[bob], charging=[bob])
    demo.say(f"usage records of bob's lease: {demo.usage_sequences[bob]}")
    demo.heading(
        "\nsettlement, one run per epoch: usage priced at the lease price and drawn from "
        "escrow, the fee to the treasury (a share to the checkers that agreed with the "
        "quorum), the rest to the provider; the payout root posted on chain"
    )
    for epoch in demo.epochs:
        report = settler.settle(epoch)
        demo.count(report.commands, report.retried)
        posted = _post_on_this_chain(demo, report.record)
        _say_epoch(demo, report, posted)
    again = settler.settle(first)
    demo.count(again.commands, again.retried)
    demo.say(
        f"epoch {first} settled again (a re-run): {again.commands} commands, "
        f"{again.retried} answered as retries; the log and the balances are unchanged"
    )
    demo.say(
        f"alice's lease: its usage charged, {_aeth(demo._lease(alice).escrow_released)} "
        "of escrow released to her"
    )
    _claim(demo)


def _post_on_this_chain(demo: _Demo, record: EpochRecord) -> str:
    """Where the epoch's root is on this run's chain. A rerun's chain is new: the root the
    log holds (posted on the first run's chain, `PayoutRootPosted`) is posted again."""
    settled = record.settled
    assert settled is not None
    if not settled.payout_root:
        return "no provider has earned yet: no root"
    epoch = record.plan.epoch
    root = bytes.fromhex(settled.payout_root.removeprefix("0x"))
    if demo.side.reader.posted_root(epoch) == root:
        tx = record.posted.transaction if record.posted is not None else "?"
        return f"posted (tx {tx[:12]}...)"
    demo.side.gateway.post_payout_root(epoch, root, settled.payout_new)
    return "posted again on this run's fresh chain"


def _say_epoch(demo: _Demo, report: SettleReport, posted: str) -> None:
    plan, settled = report.record.plan, report.record.settled
    assert settled is not None
    rewards = sum(r.amount for r in settled.rewards)
    demo.say(
        f"epoch {plan.epoch} ({plan.epoch_start:%H:%M}-{plan.epoch_end:%H:%M}): "
        f"{sum(len(c.sequences) for c in plan.charges)} usage records of "
        f"{_count(len(plan.charges), 'lease')}, charged {_aeth(plan.charged)} (withheld "
        f"{_aeth(plan.withheld)}), fee {_aeth(plan.fee)}, checker rewards {_aeth(rewards)}, "
        f"provider share {_aeth(plan.provider_share)}, drawn {_aeth(settled.drawn)}; "
        f"{report.commands} commands"
    )
    demo.say(
        f"  payout root {settled.payout_root[:18]}... over the cumulative earnings of "
        f"{_count(len(settled.payouts), 'provider')} ({_aeth(settled.payout_total)}, "
        f"{_aeth(settled.payout_new)} new): {posted}"
    )


def _claim(demo: _Demo) -> None:
    """atlas claims its cumulative payout of the last epoch, with its proof from the log."""
    epoch = demo.epochs[-1]
    d = demo.side.chain.deployment
    proof = demo.settler.log.proof(epoch, demo.account("atlas"))
    path = [bytes.fromhex(h.removeprefix("0x")) for h in proof.proof]
    d.claim(epoch, proof.address, proof.cumulative, path)
    demo.poll()
    account = demo.service.writer.account(
        account_id(AccountCode.provider_earnings, _id("provider:atlas"))
    )
    assert account is not None
    demo.say(
        f"atlas claims epoch {epoch} on chain: cumulative {_aeth(proof.cumulative)} with its "
        f"proof rebuilt from the settlement log ({len(path)} sibling hashes); the distributor "
        f"pays it {_aeth(d.claimed(proof.address))}"
    )
    demo.say(
        f"the watcher records the claim (RecordPayoutClaim): atlas's earnings in the ledger "
        f"now {_aeth(account.balance)}"
    )


def _print_settlement(demo: _Demo, market: Market) -> Report:
    """The settlement log's epochs, the claims on chain and the last epoch's reconciliation."""
    log = demo.settler.log
    log.refresh()
    print("\nsettlement log (AETH)")
    header = ("epoch", "charged", "withheld", "fee", "rewards", "provider", "drawn", "root")
    rows = [header]
    for record in log:
        plan, settled = record.plan, record.settled
        if settled is None:
            continue
        rows.append(
            (
                f"{plan.epoch} {plan.epoch_start:%H:%M}-{plan.epoch_end:%H:%M}",
                format_amount(plan.charged),
                format_amount(plan.withheld),
                format_amount(plan.fee),
                format_amount(sum(r.amount for r in settled.rewards)),
                format_amount(plan.provider_share),
                format_amount(settled.drawn),
                (settled.payout_root[:18] + "...") if settled.payout_root else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        cells = [
            c.ljust(w) if i in (0, 7) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  " + "  ".join(cells).rstrip())
    alias = {demo.account(n): n for n in CHAIN_ACCOUNT}
    alias |= {str(i): n for i, n in demo.names.items()}
    for claim in demo.side.reader.claims():
        who = alias.get(claim.account, claim.account)
        print(
            f"  claim on chain: {who}, epoch {claim.epoch}, cumulative "
            f"{_aeth(claim.cumulative)}, paid {_aeth(claim.amount)}"
        )
    epoch = demo.epochs[-1]
    settled = log.epochs[epoch].settled
    assert settled is not None
    ledger = market.ledger
    at_settlement = ledger_at_settlement(ledger.app, ledger.writer.shard, settled)
    report = reconcile(
        epoch, demo.service, log, at_settlement, ledger.writer.state, demo.side.reader
    )
    named = Report(
        report.epoch, [replace(line, item=alias.get(line.item, line.item)) for line in report.lines]
    )
    print(f"\nreconciliation of epoch {epoch}: the ledger vs the settlement log vs the chain")
    print(named.table())
    return report


def _audit(demo: _Demo, market: Market, settings: Settings) -> bool:
    """Hash-chain every log into Merkle checkpoints, anchor their roots on chain, verify
    the whole log against them and prove one event's inclusion against its anchored root."""
    from contracts.chain import ROLE_ANCHOR
    from ledger.audit import Chainer, Web3Anchor, prove, verify, verify_proof

    url, schema = market.ledger.database_url, settings.postgres_schema
    chain = demo.side.chain
    d = chain.deployment
    anchorer = str(chain.w3.eth.accounts[0])
    d.grant(d.anchor, ROLE_ANCHOR, anchorer)
    client = Web3Anchor.of(chain.w3, d.anchor, sender=anchorer)
    chainer = Chainer(url, schema, checkpoint_size=AUDIT_CHECKPOINT_SIZE)
    chainer.run(final_checkpoint=True)
    chainer.anchor(client)
    _anchor_on_fresh_chain(url, schema, client)
    print("\naudit: the logs hash-chained, cut into Merkle checkpoints, roots anchored on chain")
    report = verify(url, schema, anchor=client)
    if report.finding is not None:
        print(f"  verify: TAMPERED: {report.finding.describe()}")
        return False
    print(
        f"  verify: clean: {report.events_checked} events recomputed against the hash chain, "
        f"{report.checkpoints_checked} checkpoints, {report.anchors_checked} roots anchored "
        "in CheckpointAnchor"
    )
    proof = prove(url, schema, "ledger", 1)
    root = client.root_at(proof.checkpoint.index)
    check = verify_proof(proof, root)
    print(
        f"  prove ledger event 1: in checkpoint {proof.checkpoint.index}, "
        f"{len(proof.checkpoint.merkle_path)} sibling hashes; checked against the anchored root "
        f"0x{root.hex()[:16]}...: {'accepted' if check.ok else 'REJECTED'}"
    )
    return check.ok


def _anchor_on_fresh_chain(url: str, schema: str, client: Any) -> None:
    """A rerun's in-process chain is new: it holds none of the roots the log recorded as
    anchored before. Anchor them again, in index order (the log keeps the first run's
    transactions)."""
    import psycopg
    from psycopg import sql

    from ledger.audit import AUDIT_CHECKPOINTS_TABLE_NAME

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT checkpoint_index, merkle_root FROM {}.{} ORDER BY 1").format(
                sql.Identifier(schema), sql.Identifier(AUDIT_CHECKPOINTS_TABLE_NAME)
            )
        ).fetchall()
    count = client.count()
    for index, root in rows:
        if int(index) >= count:
            client.anchor(int(index), bytes(root))


def _print_earnings(demo: _Demo, market: Market, settings: Settings) -> None:
    """What each provider would see (`aether earnings`, GET /v1/providers/{id}/earnings):
    from the earnings read models, caught up with the logs above."""
    from projections import queries as q

    async def read() -> list[q.ProviderEarnings]:
        conn = await q.connect(market.ledger.database_url, settings.postgres_schema)
        try:
            found = []
            for provider_id in sorted(
                demo.service.state.providers, key=lambda p: demo.names.get(p, str(p))
            ):
                found.append(await q.provider_earnings(conn, provider_id))
            return found
        finally:
            await conn.close()

    rows = [("provider", "earned", "withheld", "settled", "in root", "claimed", "pending")]
    for e in asyncio.run(read()):
        pending = (
            f"{e.pending.reports} reports ~{format_amount(e.pending.amount_estimate)}"
            if e.pending.reports
            else "-"
        )
        rows.append(
            (
                demo.names.get(e.provider_id, str(e.provider_id)[:8]),
                format_amount(e.earned),
                format_amount(e.withheld),
                format_amount(e.settled),
                format_amount(e.payout_cumulative),
                format_amount(e.claimed),
                pending,
            )
        )
    print("\nprovider earnings (AETH), from the earnings read model (aether earnings, the API)")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            c.ljust(w) if i in (0, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  " + "  ".join(cells).rstrip())


def _log_time(market: Market) -> datetime:
    """When the marketplace log's last event was recorded: the "now" of the printed views
    (reputation's age), the same on a rerun (which records nothing) as the first time."""
    recorder = market.app.recorder
    last = recorder.max_notification_id() or 0
    for _, event in market.app.read(after=max(0, last - 1)):
        return event.timestamp
    return DEMO_START
