"""Settlement against the real marketplace, ledger and usage store, over random usage
streams: late arrivals, settlement re-runs (also of settled epochs), exhausted escrows and a
failed window. Total charged equals the total priced usage exactly once; no escrow goes
negative; what escrow gave up is exactly provider earnings + protocol fee + withheld."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from uuid import UUID, uuid4

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.codes import AccountCode
from domain.lease import DEMO_LEASE_RULES
from domain.orderbook import lease_cost
from domain.postings import account_id, protocol_account_id
from domain.settlement import SettlementRules
from domain.usage import UsageRecorded
from domain.verdicts import FailureKind
from ledger.config import eventsourcing_env
from ledger.market import service as m
from ledger.money import units
from ledger.settlement import SettlementApplication, SettlementLog
from ledger.store import LedgerApplication
from ledger.usage import OffsetAdvance, UsageApplication
from tests.market import START, Market, build_market, uid
from tests.schemas import fresh_schema
from workers.settle import Settler, epoch_of

PRICE = units(2)
EPOCH_S = 600
RULES = m.MarketRules(lease=replace(DEMO_LEASE_RULES, release_escrow_at_close=False))

Record = tuple[int, int, int]
"""(lease index, interval length in s, arrival lag in s)."""


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[Record], bool, list[int]]:
    escrows = draw(st.lists(st.integers(100, 5_000), min_size=1, max_size=3))
    """Each lease's escrow in GPU-seconds at the lease price (small ones run out)."""
    records = draw(
        st.lists(
            st.tuples(st.integers(0, len(escrows) - 1), st.integers(1, 400), st.integers(0, 1_500)),
            max_size=14,
        )
    )
    fail_window = draw(st.booleans())
    reruns = draw(st.lists(st.integers(0, 6), max_size=4))
    return escrows, records, fail_window, reruns


def balance(market: Market, code: AccountCode, owner: UUID | None = None) -> tuple[int, int]:
    aid = protocol_account_id(code) if owner is None else account_id(code, owner)
    account = market.writer.account(aid)
    return (0, 0) if account is None else (account.credits_posted, account.debits_posted)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(scenarios())
def test_settlement_charges_every_record_once_and_splits_exactly(
    database_url: str, scenario: tuple[list[int], list[Record], bool, list[int]]
) -> None:
    escrows, records, fail_window, reruns = scenario
    with fresh_schema(database_url) as schema:
        env = eventsourcing_env(database_url, schema, pool_size=2)
        app = LedgerApplication(env=env)
        try:
            run_scenario(app, env, escrows, records, fail_window, reruns)
        finally:
            app.close()


def run_scenario(
    app: LedgerApplication,
    env: dict[str, str],
    escrows: list[int],
    records: list[Record],
    fail_window: bool,
    reruns: list[int],
) -> None:
    market = build_market(app, env, rules=RULES)
    usage = UsageApplication(app.app_recorder.datastore, env=env)
    log = SettlementLog(SettlementApplication(app.app_recorder.datastore, env=env))
    market.provider("p", market.node("n", gpu_count=len(escrows)), bond=units(10_000))
    market.deposit("c", units(1_000))
    market.ask("a", "p", "n", PRICE, gpu_count=len(escrows), ttl_s=86_400)
    leases: list[UUID] = []
    for i, gpu_s in enumerate(escrows):
        escrow = lease_cost(1, PRICE, gpu_s)
        (lease_id,) = market.bid(f"b{i}", "c", PRICE, duration_s=gpu_s, escrow=escrow).lease_ids
        leases.append(lease_id)
    window_s = RULES.verdicts.verdict_window_s
    if fail_window:
        for name in ("k1", "k2", "k3"):
            market.checker(name)
        window = market.window()
        market.clock.advance(window_s)
        for name in ("k1", "k2", "k3"):
            market.verdict(name, "n", "p", window, False, FailureKind.downtime)
        market.clock.advance(window_s + RULES.verdicts.verdict_grace_s)
        market.tick()

    # The usage streams: contiguous intervals per lease, each received after a random lag.
    at = [0] * len(leases)
    sequences = [0] * len(leases)
    priced = 0
    for offset, (i, length, lag) in enumerate(records):
        sequences[i] += 1
        start = START + timedelta(seconds=at[i])
        at[i] += length
        record = UsageRecorded(
            uuid4(), leases[i], uid("n"), sequences[i], start, start + timedelta(seconds=length),
            1, length * 10**6, length * 10**6, 1, 1, 1, 1, 1, "train", "cpu",
            start + timedelta(seconds=length + lag),
        )  # fmt: skip
        usage.record([record], "prop", [OffsetAdvance("u", 0, offset or None, offset + 1)])
        priced += lease_cost(1, PRICE, length)

    rules = SettlementRules(epoch_s=EPOCH_S, posting=RULES.postings)
    worker = Settler(market.service, usage, log, rules=rules, release_delay_s=0, clock=market.clock)
    market.clock.now = START + timedelta(seconds=6 * 3_600)
    due = worker.due()
    first = epoch_of(START, rules)
    for n in due:
        worker.settle(n)
        for back in reruns:
            if first + back <= n and first + back in log.epochs:
                worker.settle(first + back)
                """A re-run of a settled epoch: every command a retry."""
    assert worker.due() == []

    plans = [r.plan for r in log]
    outcomes = [r.settled for r in log]
    assert all(o is not None for o in outcomes)
    keys = [(c.lease_id, s) for p in plans for c in p.charges for s in c.sequences]
    assert len(keys) == len(set(keys)) == len(records)
    """Every record settled, none twice."""
    assert sum(p.charged for p in plans) == priced
    drawn = sum(o.drawn for o in outcomes if o is not None)
    uncovered = sum(o.uncovered for o in outcomes if o is not None)
    assert drawn + uncovered == priced
    for lease_id in leases:
        lease = market.service.lease(lease_id)
        assert lease is not None
        held_credits, held_debits = balance(market, AccountCode.lease_escrow, lease_id)
        assert held_credits - held_debits >= 0
        assert lease.escrow_charged <= lease.escrow_held
    earned = balance(market, AccountCode.provider_earnings, uid("p"))[0]
    treasury = balance(market, AccountCode.protocol_treasury)[0]
    insurance = balance(market, AccountCode.insurance_pool)[0]
    slashed = market.service.stake_of(uid("p")).slashed
    penalties = sum(units(10) - left for left in market.service.state.checker_stake_left.values())
    withheld_in_pool = insurance - slashed - penalties
    assert earned + treasury + withheld_in_pool == drawn
    assert sum(p.withheld for p in plans) >= withheld_in_pool
    assert sum(p.fee for p in plans) >= treasury
