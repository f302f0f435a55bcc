"""Reconciliation of a settled epoch against real PostgreSQL, the real marketplace and the
in-process EVM: everything ties out after deposits, bonds, usage, settlement, a posted root
and a claim; tampering with one side flags exactly that line."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from uuid import uuid4

import pytest

pytest.importorskip("eth_tester", reason="needs the `chain` extra: pip install -e '.[chain]'")

from psycopg import sql

from domain.lease import DEMO_LEASE_RULES
from domain.settlement import SettlementRules
from domain.usage import UsageRecorded
from ledger.market import service as m
from ledger.money import units
from ledger.settlement import SettlementApplication, SettlementLog, ledger_at_settlement
from ledger.store import LedgerApplication
from ledger.usage import OffsetAdvance, UsageApplication
from tests.market import START, Market, build_market, uid
from workers.chain import Chain, ChainSide, connect, embedded_chain, mine_blocks
from workers.reconcile import MISMATCH, Report, reconcile
from workers.settle import Settler, epoch_of

CONFIRMATIONS = 2
EPOCH_S = 600
PRICE = units(2)
RULES = m.MarketRules(lease=replace(DEMO_LEASE_RULES, release_escrow_at_close=False))


class World:
    def __init__(self, ledger_app: LedgerApplication, env: dict[str, str]) -> None:
        self.ledger_app = ledger_app
        self.market: Market = build_market(ledger_app, env, rules=RULES)
        self.chain: Chain = embedded_chain()
        self.side: ChainSide = connect(
            self.chain, self.market.service, self.market.app, confirmations=CONFIRMATIONS
        )
        datastore = ledger_app.app_recorder.datastore
        self.usage = UsageApplication(datastore, env=env)
        self.log = SettlementLog(SettlementApplication(datastore, env=env))
        rules = SettlementRules(epoch_s=EPOCH_S, posting=RULES.postings)
        self.settler = Settler(
            self.market.service,
            self.usage,
            self.log,
            rules=rules,
            gateway=self.side.gateway,
            clock=self.market.clock,
        )
        free = [str(a) for a in list(self.chain.w3.eth.accounts)[5:8]]
        self.payer, self.operator, self.other = free

    def confirm(self) -> None:
        mine_blocks(self.chain, CONFIRMATIONS)
        self.side.watcher.poll()
        self.side.mirror.mirror()

    def report(self, epoch: int) -> Report:
        settled = self.log.epochs[epoch].settled
        assert settled is not None
        at_settlement = ledger_at_settlement(self.ledger_app, 0, settled)
        return reconcile(
            epoch,
            self.market.service,
            self.log,
            at_settlement,
            self.market.writer.state,
            self.side.reader,
        )


@pytest.fixture
def world(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> World:
    return World(ledger_app, ledger_env)


def settle_one_epoch(world: World) -> int:
    """A consumer deposits on chain, a provider bonds on chain, a lease serves 5 minutes,
    the epoch is settled and its root posted; the provider claims with the log's proof."""
    d, market = world.chain.deployment, world.market
    d.mint(world.payer, units(1_000))
    d.deposit(world.payer, uid("c1"), units(500))
    node = market.node("n1", gpu_count=1)
    market.send(m.RegisterProvider(uuid4(), uid("p1"), world.operator, (node,)))
    d.mint(world.operator, units(500))
    d.bond(world.operator, units(500))
    world.confirm()
    market.ask("a1", "p1", "n1", PRICE, ttl_s=86_400)
    (lease_id,) = market.bid("b1", "c1", PRICE, duration_s=3_600).lease_ids
    start = START + timedelta(seconds=10)
    record = UsageRecorded(
        uuid4(), lease_id, uid("n1"), 1, start, start + timedelta(seconds=300), 1,
        300 * 10**6, 290 * 10**6, 10**12, 1, 1, 1, 1, "train", "cpu",
        start + timedelta(seconds=301),
    )  # fmt: skip
    world.usage.record([record], "reconcile", [OffsetAdvance("u", 0, None, 1)])
    market.clock.now = START + timedelta(seconds=EPOCH_S * 2)
    (report,) = world.settler.settle_due()
    assert report.record.posted is not None
    epoch = report.record.plan.epoch
    proof = world.log.proof(epoch, world.operator)
    d.claim(epoch, proof.address, proof.cumulative, [bytes.fromhex(p[2:]) for p in proof.proof])
    world.confirm()
    assert epoch == epoch_of(START, world.settler.rules)
    return epoch


def flagged(report: Report) -> list[tuple[str, str]]:
    return [(line.section, line.item) for line in report.flagged]


def test_a_settled_epoch_ties_out_on_every_line(world: World) -> None:
    epoch = settle_one_epoch(world)
    report = world.report(epoch)
    assert flagged(report) == [], report.table()

    sections = {line.section for line in report.lines}
    assert {"payout", "earned", "claimed", "stake", "deposits", "epoch", "ledger"} <= sections
    text = report.table()
    assert "all tie out" in text
    csv_text = report.csv()
    assert csv_text.splitlines()[0].startswith("epoch,section,item,ledger,log,chain,status")
    assert len(csv_text.splitlines()) == len(report.lines) + 1


def test_an_extra_deposit_on_chain_flags_exactly_that_consumer(world: World) -> None:
    epoch = settle_one_epoch(world)
    world.chain.deployment.deposit(world.payer, uid("c1"), units(7))
    """Paid into the vault, but the ledger has not credited it (the watcher did not run)."""
    report = world.report(epoch)
    assert flagged(report) == [("deposits", str(uid("c1")))], report.table()
    [line] = report.flagged
    assert (line.ledger, line.chain, line.status) == (units(500), units(507), MISMATCH)


def test_a_claim_missing_in_the_ledger_flags_exactly_that_provider(world: World) -> None:
    epoch = settle_one_epoch(world)
    # Remove the ledger's record of the claim (the payout transfer) behind the append-only
    # guard, as a tampering superuser would; the chain still shows the claim.
    datastore = world.market.app.app_recorder.datastore
    schema = sql.Identifier(datastore.schema)
    with datastore.transaction(commit=True) as curs:
        curs.execute("SET LOCAL session_replication_role = replica")
        curs.execute(
            sql.SQL(
                "DELETE FROM {}.marketplace_events WHERE topic = 'domain.funds:PayoutClaimed'"
            ).format(schema)
        )
    fresh = build_market(world.ledger_app, world.market.app.env, rules=RULES)
    """A service rebuilt from the tampered log."""
    settled = world.log.epochs[epoch].settled
    assert settled is not None
    report = reconcile(
        epoch,
        fresh.service,
        world.log,
        ledger_at_settlement(world.ledger_app, 0, settled),
        world.market.writer.state,
        world.side.reader,
    )
    assert flagged(report) == [("claimed", world.operator)], report.table()


def test_an_unsettled_epoch_is_a_clear_error(world: World) -> None:
    with pytest.raises(LookupError, match="not settled"):
        reconcile(
            1, world.market.service, world.log, world.market.writer.state,
            world.market.writer.state, None,
        )  # fmt: skip


def test_the_cli_prints_the_table_or_csv_and_refuses_an_unsettled_epoch(
    world: World,
    database_url: str,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.cli import main

    epoch = settle_one_epoch(world)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("POSTGRES_SCHEMA", schema)
    monkeypatch.delenv("ETH_RPC_URL", raising=False)
    assert main(["reconcile", "--epoch", str(epoch)]) == 0
    out = capsys.readouterr()
    assert "all tie out" in out.out and "chain column is left out" in out.err
    assert main(["reconcile", "--epoch", str(epoch), "--csv"]) == 0
    assert capsys.readouterr().out.startswith("epoch,section,item")
    assert main(["reconcile", "--epoch", "7"]) == 2
    assert f"epoch 7 is not settled (settled: {epoch})" in capsys.readouterr().err
