"""`aether demo`: a small GPU marketplace, from stake to slash, on the embedded default.

Two providers bond stake and ask; two consumers deposit and bid; leases open at the ask
price with their escrow held; nodes send heartbeats and usage is charged; one node goes
down; three checkers judge the window and reach a quorum; the provider is slashed, the
affected consumer refunded out of the slash and the checker who vouched for the dead node
penalised. Then it prints the order book, the leases, reputation and every balance.

Market time is simulated (the rules take time as an argument), starting at
`DEMO_START`, so a 15-minute verdict window passes in a second. Every id, command ids
included, is derived from a name: running the demo again on the same database retries
every command, and the service answers each as a retry; nothing is recorded twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.codes import AccountCode
from domain.lease import DEMO_LEASE_RULES, CloseReason, Lease, lease_id_for
from domain.orderbook import Ask, Bid, escrow_required
from domain.postings import account_id, protocol_account_id
from domain.providers import Node
from domain.verdicts import FailureKind, Verdict, window_containing, window_end_of
from ledger.config import Settings
from ledger.market import service as m
from ledger.money import format_amount, units
from ledger.usage import UsageApplication
from workers.bootstrap import Market, open_market
from workers.broker import kafka_from
from workers.live import describe, node_key, run_live
from workers.projector import Views, open_views
from workers.report import lines_of_view, print_accounts

DEMO_START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
"""Market time of the demo's first command (a verdict window starts here). The simulated
story lies in the past, so the live part that follows runs at the real time."""
HEARTBEAT_STEP_S = 5
USAGE_STEP_S = 60
ASSET = "AETH"


def _id(name: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"aether-demo:{name}")


def _key(name: str) -> str:
    return node_key(name).public_key_hex


def _address(name: str) -> str:
    return "0x" + (uuid5(NAMESPACE_URL, f"aether-demo-address:{name}").hex * 2)[:40]


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
    retried: int = 0
    sent: int = 0
    sequences: dict[UUID, int] = field(default_factory=dict)
    names: dict[UUID, str] = field(default_factory=dict)

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

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"  [{self.clock.now:%H:%M:%S}] {text}")

    def heading(self, text: str) -> None:
        if not self.quiet:
            print(text)

    def advance(self, seconds: int, beating: list[UUID], charging: list[UUID]) -> None:
        """Let market time pass: heartbeats of the `beating` leases every 5 s, usage of the
        `charging` leases every minute, a tick every step."""
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
                    lease = self._lease(lease_id)
                    amount = lease.gpu_count * lease.price_per_gpu_hour * USAGE_STEP_S // 3_600
                    usage_ref = f"usage:{lease.id}:{stamp}"
                    self.send(usage_ref, m.ChargeUsage, lease.id, amount, usage_ref)
            self.send(f"tick:{stamp}", m.Tick)

    def _lease(self, lease_id: UUID) -> Lease:
        lease = self.service.lease(lease_id)
        assert lease is not None
        return lease


def run_demo(settings: Settings) -> int:
    clock = _Clock()
    rules = m.MarketRules(lease=DEMO_LEASE_RULES)
    with open_market(settings, rules=rules, clock=clock) as market:
        where = "embedded PostgreSQL" if market.ledger.embedded else "DATABASE_URL"
        print(
            f"aether demo: a GPU marketplace on {where}, ledger shard {market.ledger.writer.shard}"
        )
        print(f"market time starts at {DEMO_START.isoformat()} (simulated)\n")
        demo = _Demo(market.service, clock)
        _run(demo)
        if demo.quiet:
            print("(the live part ran the first time: its workers are not started again)")
            _name_live_part(demo)
        else:
            _live(demo, market, settings)
        with open_views(market.ledger.app, market.app) as views:
            balanced = _print_views(views, demo.names, clock.now, rules)
        if demo.quiet:
            print(
                f"\n{demo.retried} of {demo.sent} commands were answered as retries; "
                "nothing was recorded twice"
            )
        return 0 if balanced else 3


def _run(demo: _Demo) -> None:
    service = demo.service
    rules = service.rules
    k = rules.stake.stake_per_gpu["H100"]
    names = demo.names

    demo.heading("providers register nodes and bond stake (K = " + _aeth(k) + " per H100)")
    fleet = {
        "atlas": Node(_id("node:atlas-1"), "H100", 4, 81_920, "eu-west", _key("atlas-1")),
        "borealis": Node(_id("node:borealis-1"), "H100", 2, 81_920, "us-east", _key("borealis-1")),
    }
    for name, node in fleet.items():
        pid = _id(f"provider:{name}")
        names[pid] = name
        demo.send(f"register:{name}", m.RegisterProvider, pid, _address(name), (node,))
        stake = node.gpu_count * k
        demo.send(f"bond:{name}", m.BondStake, pid, stake)
        demo.say(
            f"{name}: node {node.gpu_count} x {node.gpu_model} in {node.region}, bonded {_aeth(stake)}"
        )
    try:
        stranger = _ask("ask:nobody", "nobody", fleet["atlas"], 4, units(1), demo.clock.now)
        demo.send("ask:unbonded", m.PlaceAsk, stranger)
    except m.MarketError as e:
        demo.say(f"an ask by an unregistered provider is refused: {e.code}")

    demo.heading("\nconsumers deposit (confirmed on chain) and the book fills")
    for name, amount in (("alice", units(100)), ("bob", units(60))):
        cid = _id(f"consumer:{name}")
        names[cid] = name
        chain_ref = f"0x{_id(name).hex}{_id(name).hex}:0"
        demo.send(
            f"deposit:{name}", m.ConfirmDeposit, _id(f"deposit:{name}"), cid, amount, chain_ref
        )
        demo.say(f"{name} deposits {_aeth(amount)}")
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

    demo.heading("\nthe leases run: heartbeats every 5 s, usage charged every minute")
    alice, bob = leases["alice"], leases["bob"]
    demo.advance(300, beating=[alice, bob], charging=[alice, bob])
    demo.say(
        f"charged so far: alice {_aeth(demo._lease(alice).escrow_charged)}, "
        f"bob {_aeth(demo._lease(bob).escrow_charged)}"
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

    demo.heading("\nalice ends her lease; the unused escrow returns to her")
    demo.send("close:alice", m.CloseLease, alice, CloseReason.consumer, _id("consumer:alice"))
    demo.say(f"alice's lease closed, {_aeth(demo._lease(alice).escrow_released)} released")


def _name_live_part(demo: _Demo) -> None:
    """Names of what the live part created (for the tables of a rerun that skips it)."""
    demo.names[_id("provider:cirrus")] = "cirrus"
    lease_id = lease_id_for(_id("ask:cirrus"), _id("bid:bob-cheap"))
    demo.names[lease_id] = "lease bob/cirrus"


def _live(demo: _Demo, market: Market, settings: Settings) -> None:
    """Real workers through the broker, at the real time (see workers/live.py)."""
    demo.clock.live = True
    names = demo.names
    demo.heading(
        "\nlive: a GPU worker, ingest and a checker through the Kafka-protocol broker, "
        "at the real time"
    )
    node = Node(_id("node:cirrus-1"), "H100", 2, 81_920, "eu-north", _key("cirrus-1"))
    pid = _id("provider:cirrus")
    names[pid] = "cirrus"
    demo.send("register:cirrus", m.RegisterProvider, pid, _address("cirrus"), (node,))
    demo.send("bond:cirrus", m.BondStake, pid, 2 * demo.service.rules.stake.stake_per_gpu["H100"])
    ask = _ask("ask:cirrus", "cirrus", node, 2, units(22, 17), demo.clock())
    handled = demo.send("ask:cirrus", m.PlaceAsk, ask)
    (lease_id,) = handled.lease_ids
    lease = demo._lease(lease_id)
    names[lease_id] = f"lease {names[lease.consumer_id]}/cirrus"
    demo.say(
        f"cirrus lists 2 x H100 in eu-north and asks {_aeth(ask.price_per_gpu_hour)}/GPU-hour: "
        f"it fills {names[lease.consumer_id]}'s resting bid, a lease opens now"
    )
    with kafka_from(settings.kafka_bootstrap_servers) as kafka:
        usage = UsageApplication(
            market.ledger.app.app_recorder.datastore, env=market.ledger.app.env
        )
        result = asyncio.run(
            run_live(
                demo.service,
                usage,
                kafka,
                lease_id=lease_id,
                node=node,
                key=node_key("cirrus-1"),
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
