"""Marketplace facts -> ledger transfers (domain.postings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from uuid import UUID, uuid5

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import funds as fu
from domain import lease as ls
from domain import orderbook as ob
from domain import slashing as sl
from domain import stake as sk
from domain import verdicts as vd
from domain.codes import AccountCode, TransferCode
from domain.postings import (
    ACCOUNT_ID_NAMESPACE,
    PROTOCOL_OWNER,
    PostingRules,
    account_id,
    accounts_for,
    escrow_hold_id,
    postings_for,
    protocol_account_id,
    transfer_id,
)
from ledger.model import (
    NIL_ID,
    AccountFlags,
    LedgerState,
    NewTransfer,
    TransferFlags,
)

T0 = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
"""Also a verdict-window start: a multiple of 900 s after the Unix epoch."""
PROVIDER = UUID("00000000-0000-0000-0000-0000000000a1")
CONSUMER = UUID("00000000-0000-0000-0000-0000000000c1")
NODE = UUID("00000000-0000-0000-0000-0000000000d1")
ASK = UUID("00000000-0000-0000-0000-0000000000e1")
BID = UUID("00000000-0000-0000-0000-0000000000f1")
CHECKER = UUID("00000000-0000-0000-0000-0000000000b1")
DEPOSIT_ID = UUID("00000000-0000-0000-0000-0000000000de")
LEASE = ls.lease_id_for(ASK, BID)
ADDRESS = "0x" + "ab" * 20
CHAIN_REF = "0x" + "12" * 32 + ":3"

CUSTODY = protocol_account_id(AccountCode.chain_custody)
TREASURY = protocol_account_id(AccountCode.protocol_treasury)
POOL = protocol_account_id(AccountCode.insurance_pool)
BONDED = account_id(AccountCode.provider_stake_bonded, PROVIDER)
UNBONDING = account_id(AccountCode.provider_stake_unbonding, PROVIDER)
EARNINGS = account_id(AccountCode.provider_earnings, PROVIDER)
AVAILABLE = account_id(AccountCode.consumer_available, CONSUMER)
ESCROW = account_id(AccountCode.lease_escrow, LEASE)
BID_ESCROW = account_id(AccountCode.bid_escrow, BID)
CHECKER_STAKE = account_id(AccountCode.checker_stake, CHECKER)
CHECKER_REWARDS = account_id(AccountCode.checker_rewards, CHECKER)


def _book_facts() -> list[ob.OrderBookFact]:
    """A 2-GPU ask at 900 and a 2-GPU bid (max 1000, 1 h) that fills it at once."""
    book = ob.OrderBook("H100")
    ask = ob.Ask(ASK, PROVIDER, NODE, "H100", 2, 900, T0 + timedelta(days=1))
    assert book.place_ask(ask, T0)[0] is ob.PlaceOrderResult.ok
    bid = ob.Bid(BID, CONSUMER, "H100", 2, 1_000, 3_600, ob.escrow_required(2, 1_000, 3_600))
    result, facts = book.place_bid(bid, T0)
    assert result is ob.PlaceOrderResult.ok
    return facts


BID_PLACED, MATCH, REMAINDER = _book_facts()
assert isinstance(BID_PLACED, ob.BidPlaced)
assert isinstance(MATCH, ob.OrderMatched)
assert isinstance(REMAINDER, ob.BidRemainderRefunded)
_, (OPENED,) = ls.open_lease(MATCH, T0)
assert isinstance(OPENED, ls.LeaseOpened)
LEASE_STATE = ls.apply(None, OPENED)

_, (DEPOSITED,) = fu.confirm_deposit({}, DEPOSIT_ID, CONSUMER, 10_000, CHAIN_REF, T0)
_, (CHECKER_REGISTERED,) = vd.register_checker(
    vd.VerdictState(),
    vd.RegisterChecker(CHECKER, ADDRESS, 1_000),
    vd.VerdictRules(checker_stake_min=100),
    T0,
)
assert isinstance(CHECKER_REGISTERED, vd.CheckerRegistered)
WINDOW_END = T0 + timedelta(seconds=900)
DECIDED = WINDOW_END + timedelta(seconds=60)
FAILED = vd.QuorumFailed(
    node_id=NODE,
    provider_id=PROVIDER,
    window_start=T0,
    window_end=WINDOW_END,
    verdicts_count=3,
    kind=vd.FailureKind.fraud,
    slash_kind=sk.SlashKind.fraud,
    failing_checker_ids=(UUID(int=0xB2), UUID(int=0xB3)),
    agreeing_checker_ids=(UUID(int=0xB2), UUID(int=0xB3)),
    contradicting_checker_ids=(CHECKER,),
    uptime_ppm_median=0,
    latency_ms_p99_median=100,
    decided_at=DECIDED,
)
SLASHING_RULES = sl.SlashingRules()
(REFUNDED,) = sl.refunds_for(FAILED, 10_000, [LEASE_STATE], SLASHING_RULES, DECIDED)
PENALIZED = sl.CheckerPenalized(
    CHECKER, NODE, T0, sl.checker_penalty(1_000, 1_000, SLASHING_RULES), DECIDED
)


def only(transfers: tuple[NewTransfer, ...]) -> NewTransfer:
    assert len(transfers) == 1
    return transfers[0]


def legs(transfers: tuple[NewTransfer, ...]) -> list[tuple[UUID, UUID, int]]:
    return [(t.debit_account_id, t.credit_account_id, t.amount) for t in transfers]


# -- accounts -----------------------------------------------------------------------------


def test_an_account_id_is_uuid5_of_the_code_name_and_the_owner():
    assert account_id(AccountCode.consumer_available, CONSUMER) == uuid5(
        ACCOUNT_ID_NAMESPACE, f"consumer_available:{CONSUMER}"
    )
    assert uuid5(ACCOUNT_ID_NAMESPACE, f"bid_escrow:{BID}") == BID_ESCROW


def test_each_code_and_owner_names_its_own_account():
    ids = {account_id(code, owner) for code in AccountCode for owner in (PROVIDER, CONSUMER)}
    assert len(ids) == 2 * len(AccountCode)


def test_protocol_wide_accounts_belong_to_the_fixed_protocol_owner():
    assert PROTOCOL_OWNER == ls.PROTOCOL_ID
    assert account_id(AccountCode.protocol_treasury, PROTOCOL_OWNER) == TREASURY


def test_accounts_for_opens_each_partys_accounts_with_their_flags():
    rules = PostingRules(asset="TEST", shard=3)
    commands = accounts_for(
        protocol=True, consumers=[CONSUMER], providers=[PROVIDER], leases=[LEASE], rules=rules
    )
    by_code = {AccountCode(c.code): c for c in commands}
    assert len(commands) == len(by_code) == 8
    assert by_code[AccountCode.chain_custody].id == CUSTODY
    assert by_code[AccountCode.chain_custody].flags == AccountFlags.none
    for code, command in by_code.items():
        assert command.asset == "TEST" and command.shard == 3
        if code is not AccountCode.chain_custody:
            assert command.flags == AccountFlags.debits_must_not_exceed_credits
    assert by_code[AccountCode.lease_escrow].id == ESCROW
    assert by_code[AccountCode.provider_stake_unbonding].id == UNBONDING


def test_accounts_for_bids_and_checkers_opens_their_constrained_accounts_in_order():
    other_bid = UUID(int=0xF2)
    commands = accounts_for(consumers=[CONSUMER], bids=[BID, other_bid], checkers=[CHECKER])
    assert [(AccountCode(c.code), c.id) for c in commands] == [
        (AccountCode.consumer_available, AVAILABLE),
        (AccountCode.bid_escrow, BID_ESCROW),
        (AccountCode.bid_escrow, account_id(AccountCode.bid_escrow, other_bid)),
        (AccountCode.checker_stake, CHECKER_STAKE),
        (AccountCode.checker_rewards, CHECKER_REWARDS),
    ]
    for command in commands:
        assert command.flags == AccountFlags.debits_must_not_exceed_credits
        assert (command.asset, command.shard) == ("AETH", 0)


def test_accounts_for_nobody_is_nothing():
    assert accounts_for() == ()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"protocol_fee_bps": -1}, ValueError),
        ({"protocol_fee_bps": 10_001}, ValueError),
        ({"protocol_fee_bps": 5.0}, TypeError),
        ({"asset": ""}, ValueError),
    ],
)
def test_posting_rules_with_an_impossible_value_are_refused(kwargs, error):
    with pytest.raises(error):
        PostingRules(**kwargs)


# -- funds --------------------------------------------------------------------------------


def test_a_confirmed_deposit_moves_the_amount_from_chain_custody_to_the_consumer():
    t = only(postings_for(DEPOSITED))
    assert legs((t,)) == [(CUSTODY, AVAILABLE, 10_000)]
    assert t.code == TransferCode.deposit and t.flags == TransferFlags.none
    assert (t.asset, t.effective_at, t.pending_id) == ("AETH", T0, NIL_ID)
    assert t.references == (
        ("fact", "deposit_confirmed"),
        ("consumer", str(CONSUMER)),
        ("chain", CHAIN_REF),
    )
    assert t.id == transfer_id(f"deposit:{DEPOSIT_ID}", "deposit")


def test_a_deposit_is_named_by_its_id_not_its_fields():
    later = fu.DepositConfirmed(DEPOSIT_ID, CONSUMER, 10_000, CHAIN_REF, T0 + timedelta(hours=1))
    other = fu.DepositConfirmed(UUID(int=0xDF), CONSUMER, 10_000, CHAIN_REF, T0)
    assert only(postings_for(later)).id == only(postings_for(DEPOSITED)).id
    assert only(postings_for(other)).id != only(postings_for(DEPOSITED)).id


def test_a_deposit_with_the_longest_chain_reference_is_accepted_by_the_ledger():
    reference = "r" * fu.REFERENCE_LENGTH_MAX
    result, (fact,) = fu.confirm_deposit({}, DEPOSIT_ID, CONSUMER, 5, reference, T0)
    assert result is fu.ConfirmDepositResult.ok
    ledger = LedgerState()
    ledger.open_accounts(accounts_for(protocol=True, consumers=[CONSUMER]), T0)
    outcomes, _ = ledger.create_transfers(postings_for(fact), T0)
    assert [o.result.name for o in outcomes] == ["ok"]
    assert ledger.accounts[AVAILABLE].balance == 5


# -- stake --------------------------------------------------------------------------------


def test_a_bond_moves_the_amount_from_chain_custody_into_bonded_stake():
    t = only(postings_for(sk.StakeBonded(PROVIDER, 500, T0), key="stake/1"))
    assert (t.debit_account_id, t.credit_account_id, t.amount) == (CUSTODY, BONDED, 500)
    assert t.code == TransferCode.stake_bond and t.flags == TransferFlags.none
    assert t.asset == "AETH" and t.effective_at == T0
    assert t.references == (
        ("fact", "stake_bonded"),
        ("provider", str(PROVIDER)),
        ("at", T0.isoformat()),
    )


def test_an_unbond_request_moves_bonded_stake_into_unbonding():
    fact = sk.UnbondRequested(PROVIDER, 2, 300, T0, T0 + timedelta(seconds=120))
    t = only(postings_for(fact))
    assert (t.debit_account_id, t.credit_account_id, t.amount) == (BONDED, UNBONDING, 300)
    assert t.code == TransferCode.stake_unbond
    assert t.references == (
        ("fact", "unbond_requested"),
        ("provider", str(PROVIDER)),
        ("unbond", "2"),
    )
    assert t.id == transfer_id(f"unbond_requested:{PROVIDER}:2", "unbond")


def test_a_completed_unbond_returns_the_stake_to_chain_custody():
    t = only(postings_for(sk.UnbondCompleted(PROVIDER, 2, 280, T0)))
    assert (t.debit_account_id, t.credit_account_id, t.amount) == (UNBONDING, CUSTODY, 280)
    assert t.code == TransferCode.stake_unbond
    assert ("unbond", "2") in t.references and ("fact", "unbond_completed") in t.references


def slashed(from_bonded: int, *parts: tuple[int, int]) -> sk.StakeSlashed:
    pieces = tuple(sk.UnbondingSlash(unbond_id, amount) for unbond_id, amount in parts)
    amount = from_bonded + sum(p.amount for p in pieces)
    return sk.StakeSlashed(
        PROVIDER, sk.SlashKind.fraud, "H100", 1, amount, amount, from_bonded, pieces, T0, T0
    )


def test_a_slash_moves_each_part_to_the_insurance_pool_as_one_linked_chain():
    transfers = postings_for(slashed(100, (1, 30), (2, 7)), key="stake/9")
    assert [(t.debit_account_id, t.credit_account_id, t.amount) for t in transfers] == [
        (BONDED, POOL, 100),
        (UNBONDING, POOL, 30),
        (UNBONDING, POOL, 7),
    ]
    assert [t.flags for t in transfers] == [TransferFlags.linked, TransferFlags.linked, 0]
    assert {t.code for t in transfers} == {TransferCode.slash}
    assert transfers[1].references[-1] == ("unbond", "1")
    assert transfers[2].references[-1] == ("unbond", "2")
    assert all(("fact", "stake_slashed") in t.references for t in transfers)
    assert all(("kind", "fraud") in t.references for t in transfers)


def test_a_slash_of_unbonding_stake_only_leaves_out_the_empty_bonded_leg():
    t = only(postings_for(slashed(0, (4, 50)), key="stake/9"))
    assert (t.debit_account_id, t.credit_account_id, t.amount) == (UNBONDING, POOL, 50)
    assert t.flags == TransferFlags.none


# -- checkers and what follows a failed quorum --------------------------------------------


def test_a_registered_checker_stakes_from_chain_custody_into_its_checker_stake():
    t = only(postings_for(CHECKER_REGISTERED))
    assert legs((t,)) == [(CUSTODY, CHECKER_STAKE, 1_000)]
    assert t.code == TransferCode.stake_bond and t.flags == TransferFlags.none
    assert t.effective_at == T0
    assert t.references == (("fact", "checker_registered"), ("checker", str(CHECKER)))
    assert t.id == transfer_id(f"checker_registered:{CHECKER}", "stake")


def test_a_penalised_checker_loses_stake_to_the_insurance_pool():
    assert PENALIZED.amount == 100
    t = only(postings_for(PENALIZED))
    assert legs((t,)) == [(CHECKER_STAKE, POOL, 100)]
    assert t.code == TransferCode.slash and t.flags == TransferFlags.none
    assert t.effective_at == DECIDED
    assert t.references == (
        ("fact", "checker_penalized"),
        ("checker", str(CHECKER)),
        ("node", str(NODE)),
        ("window", T0.isoformat()),
    )
    assert t.id == transfer_id(f"checker_penalized:{CHECKER}:{NODE}:{T0.isoformat()}", "penalty")


def test_a_checker_is_penalised_once_per_node_window():
    def penalty(node: UUID, window_start: datetime, amount: int = 100) -> UUID:
        fact = sl.CheckerPenalized(CHECKER, node, window_start, amount, DECIDED)
        return only(postings_for(fact)).id

    first = penalty(NODE, T0)
    assert penalty(NODE, T0, amount=5) == first  # the same penalty, however sized
    assert penalty(NODE, WINDOW_END) != first
    assert penalty(UUID(int=0xD2), T0) != first


def test_a_refund_moves_the_owed_amount_from_the_insurance_pool_to_the_consumer():
    # The lease ran the whole failed window: 2 GPUs at 900 for 900 s.
    assert (REFUNDED.lease_id, REFUNDED.amount) == (LEASE, ob.lease_cost(2, 900, 900))
    t = only(postings_for(REFUNDED))
    assert legs((t,)) == [(POOL, AVAILABLE, 450)]
    assert t.code == TransferCode.refund and t.flags == TransferFlags.none
    assert t.effective_at == DECIDED
    assert t.references == (
        ("fact", "consumer_refunded"),
        ("lease", str(LEASE)),
        ("node", str(NODE)),
        ("window", T0.isoformat()),
    )
    assert t.id == transfer_id(f"consumer_refunded:{LEASE}:{T0.isoformat()}", "refund")


def test_a_partial_refund_moves_only_what_the_slash_had_left():
    (partial,) = sl.refunds_for(FAILED, 7, [LEASE_STATE], SLASHING_RULES, DECIDED)
    t = only(postings_for(partial))
    assert (t.amount, partial.owed) == (7, 450)
    assert t.id == only(postings_for(REFUNDED)).id  # the same refund of the same window


# -- order book and lease -----------------------------------------------------------------


def test_a_placed_bid_holds_its_escrow_in_the_bids_own_account():
    assert BID_PLACED.bid.escrow == 2_000
    t = only(postings_for(BID_PLACED))
    assert legs((t,)) == [(AVAILABLE, BID_ESCROW, 2_000)]
    assert t.code == TransferCode.escrow_hold and t.flags == TransferFlags.none
    assert (t.pending_id, t.effective_at) == (NIL_ID, T0)
    assert t.references == (
        ("fact", "bid_placed"),
        ("bid", str(BID)),
        ("consumer", str(CONSUMER)),
    )
    assert t.id == transfer_id(f"bid_placed:{BID}", "escrow_hold")


def test_a_match_holds_the_escrow_as_a_pending_transfer_from_the_bid_into_the_lease():
    t = only(postings_for(MATCH))
    assert t.id == escrow_hold_id(LEASE)
    assert legs((t,)) == [(BID_ESCROW, ESCROW, 1_800)]
    assert t.flags == TransferFlags.pending and t.timeout_s == 0
    assert t.code == TransferCode.escrow_hold
    assert t.references == (
        ("fact", "order_matched"),
        ("lease", str(LEASE)),
        ("ask", str(ASK)),
        ("bid", str(BID)),
    )


def test_opening_the_lease_posts_the_hold_in_full():
    t = only(postings_for(OPENED))
    assert t.flags == TransferFlags.post_pending_transfer
    assert t.pending_id == escrow_hold_id(LEASE)
    assert legs((t,)) == [(BID_ESCROW, ESCROW, 1_800)]
    assert t.code == TransferCode.escrow_hold
    assert t.references == (("fact", "lease_opened"), ("lease", str(LEASE)))
    assert t.id == transfer_id(f"lease_opened:{LEASE}", "escrow_post")


def test_the_bids_remainder_goes_back_to_the_consumer():
    assert REMAINDER.escrow_amount == 2_000 - 1_800
    t = only(postings_for(REMAINDER, consumer_id=CONSUMER))
    assert legs((t,)) == [(BID_ESCROW, AVAILABLE, 200)]
    assert t.code == TransferCode.escrow_release and t.flags == TransferFlags.none
    assert t.effective_at == T0
    assert t.references == (("fact", "bid_remainder_refunded"), ("bid", str(BID)))
    assert t.id == transfer_id(f"bid_remainder_refunded:{BID}", "release")


def test_a_bid_remainder_without_the_bids_consumer_is_a_caller_error():
    with pytest.raises(ValueError, match="consumer_id="):
        postings_for(REMAINDER, parties=LEASE_STATE)


def test_a_top_up_moves_consumer_funds_into_the_lease_escrow():
    fact = ls.EscrowToppedUp(LEASE, 900, 1_800, T0 + timedelta(hours=1, minutes=30), T0)
    t = only(postings_for(fact, key="lease/3", parties=LEASE_STATE))
    assert (t.debit_account_id, t.credit_account_id, t.amount) == (AVAILABLE, ESCROW, 900)
    assert t.code == TransferCode.escrow_hold and t.flags == TransferFlags.none
    assert t.pending_id == NIL_ID


def test_a_usage_charge_pays_the_provider_and_the_fee_as_a_linked_pair():
    fact = ls.UsageCharged(LEASE, "usage-7", 1_001, 1_001, T0)
    provider, fee = postings_for(
        fact, key="lease/4", parties=LEASE_STATE, rules=PostingRules(protocol_fee_bps=500)
    )
    assert (provider.debit_account_id, provider.credit_account_id) == (ESCROW, EARNINGS)
    assert (fee.debit_account_id, fee.credit_account_id) == (ESCROW, TREASURY)
    assert (provider.amount, fee.amount) == (951, 50)
    assert provider.code == TransferCode.usage_charge and fee.code == TransferCode.protocol_fee
    assert provider.flags == TransferFlags.linked and fee.flags == TransferFlags.none
    assert (
        provider.references
        == fee.references
        == (
            ("fact", "usage_charged"),
            ("lease", str(LEASE)),
            ("usage", "usage-7"),
            ("at", T0.isoformat()),
        )
    )


@pytest.mark.parametrize(
    ("bps", "amounts"),
    [
        (0, [(EARNINGS, 777)]),
        (10_000, [(TREASURY, 777)]),
        (3_333, [(EARNINGS, 519), (TREASURY, 258)]),
    ],
)
def test_the_provider_part_and_the_fee_always_add_up_to_the_charge(bps, amounts):
    fact = ls.UsageCharged(LEASE, "u", 800, 777, T0)
    transfers = postings_for(
        fact, key="lease/4", parties=LEASE_STATE, rules=PostingRules(protocol_fee_bps=bps)
    )
    assert [(t.credit_account_id, t.amount) for t in transfers] == amounts
    assert sum(t.amount for t in transfers) == 777


def test_a_charge_the_exhausted_escrow_could_not_cover_moves_nothing():
    fact = ls.UsageCharged(LEASE, "u", 50, 0, T0)
    assert postings_for(fact, key="lease/4", parties=LEASE_STATE) == ()


def test_closing_a_lease_releases_the_unused_escrow_to_the_consumer():
    fact = ls.LeaseClosed(LEASE, ls.CloseReason.consumer, CONSUMER, T0, 1_049, 0)
    t = only(postings_for(fact, parties=LEASE_STATE))
    assert (t.debit_account_id, t.credit_account_id, t.amount) == (ESCROW, AVAILABLE, 1_049)
    assert t.code == TransferCode.escrow_release
    assert t.references == (
        ("fact", "lease_closed"),
        ("lease", str(LEASE)),
        ("reason", "consumer"),
    )


def test_closing_a_lease_with_nothing_left_moves_nothing():
    fact = ls.LeaseClosed(LEASE, ls.CloseReason.escrow_exhausted, ls.PROTOCOL_ID, T0, 0, 0)
    assert postings_for(fact, parties=LEASE_STATE) == ()


@pytest.mark.parametrize(
    "fact",
    [
        ls.UsageCharged(LEASE, "u", 5, 5, T0),
        ls.LeaseClosed(LEASE, ls.CloseReason.consumer, CONSUMER, T0, 5, 0),
        ls.EscrowToppedUp(LEASE, 5, 1, T0, T0),
    ],
)
def test_a_lease_fact_without_the_leases_parties_is_a_caller_error(fact):
    with pytest.raises(ValueError, match="parties"):
        postings_for(fact)


@pytest.mark.parametrize(
    "fact",
    [
        ob.AskPlaced(ob.Ask(ASK, PROVIDER, NODE, "H100", 2, 900, T0 + timedelta(days=1)), 1, T0),
        ob.AskCancelled(ASK, 1, T0),
        ob.AskExpired(ASK, 1, T0),
        ob.BidCancelled(BID, 1, T0),
        ls.HeartbeatRecorded(LEASE, NODE, 1, T0, T0, 0),
        ls.DowntimeDetected(LEASE, T0, T0 + timedelta(seconds=200), 200),
        ls.LeasePaused(LEASE, T0, T0),
        ls.LeaseResumed(LEASE, T0),
    ],
)
def test_a_fact_that_moves_no_money_has_no_postings(fact):
    assert postings_for(fact, parties=LEASE_STATE, consumer_id=CONSUMER) == ()


def test_translating_a_fact_again_gives_identical_transfers_and_distinct_facts_distinct_ids():
    other_lease = ls.lease_id_for(ASK, UUID(int=0xF2))
    facts = [
        sk.StakeBonded(PROVIDER, 500, T0),
        sk.StakeBonded(PROVIDER, 500, T0 + timedelta(seconds=1)),
        sk.UnbondRequested(PROVIDER, 1, 300, T0, T0),
        sk.UnbondCompleted(PROVIDER, 1, 300, T0),
        slashed(100, (1, 30)),
        DEPOSITED,
        fu.DepositConfirmed(UUID(int=0xDF), CONSUMER, 10_000, CHAIN_REF, T0),
        BID_PLACED,
        MATCH,
        OPENED,
        REMAINDER,
        ls.UsageCharged(LEASE, "u1", 100, 100, T0),
        ls.UsageCharged(LEASE, "u2", 100, 100, T0),
        ls.LeaseClosed(LEASE, ls.CloseReason.consumer, CONSUMER, T0, 5, 0),
        CHECKER_REGISTERED,
        vd.CheckerRegistered(UUID(int=0xB2), ADDRESS, 1_000, T0),
        PENALIZED,
        sl.CheckerPenalized(CHECKER, NODE, WINDOW_END, 100, DECIDED),
        REFUNDED,
        sl.ConsumerRefunded(other_lease, CONSUMER, PROVIDER, NODE, T0, 10, 10, DECIDED),
        sl.ConsumerRefunded(LEASE, CONSUMER, PROVIDER, NODE, WINDOW_END, 10, 10, DECIDED),
    ]

    def translate(i: int, fact: object) -> tuple[NewTransfer, ...]:
        return postings_for(fact, key=f"k{i}", parties=LEASE_STATE, consumer_id=CONSUMER)  # type: ignore[arg-type]

    first = [translate(i, f) for i, f in enumerate(facts)]
    again = [translate(i, f) for i, f in enumerate(facts)]
    assert first == again
    assert all(first)
    ids = [t.id for transfers in first for t in transfers]
    assert len(ids) == len(set(ids))


def test_a_bid_from_placement_to_a_failed_quorum_keeps_every_account_exact():
    """Deposit, bid, match, open, remainder, bond, checker, slash, refund, penalty, SLA close."""
    ledger = LedgerState()
    ledger.open_accounts(
        accounts_for(
            protocol=True,
            consumers=[CONSUMER],
            providers=[PROVIDER],
            leases=[LEASE],
            bids=[BID],
            checkers=[CHECKER],
        ),
        T0,
    )
    stake_rules = sk.StakeRules(stake_per_gpu={"H100": 1_000}, unbond_delay_s=60)
    stake = sk.ProviderStake(PROVIDER)
    _, (bonded,) = sk.bond(stake, 2_000, T0)
    stake = sk.apply(stake, bonded)
    _, (slash,) = sk.slash(
        stake,
        stake_rules,
        kind=FAILED.slash_kind,
        gpu_model="H100",
        gpu_count=MATCH.gpu_count,
        offence_at=FAILED.window_start,
        now=DECIDED,
    )
    assert isinstance(slash, sk.StakeSlashed) and slash.amount == 2_000
    _, closing = ls.close(
        LEASE_STATE, ls.CloseReason.sla_breach, ls.PROTOCOL_ID, DECIDED, ls.LeaseRules()
    )
    (closed,) = (f for f in closing if isinstance(f, ls.LeaseClosed))
    assert sl.closes_leases(FAILED, SLASHING_RULES)

    balances = []
    steps: list[tuple[object, dict[str, object]]] = [
        (DEPOSITED, {}),
        (BID_PLACED, {}),
        (MATCH, {}),
        (OPENED, {}),
        (REMAINDER, {"consumer_id": CONSUMER}),
        (bonded, {"key": "stake/1"}),
        (CHECKER_REGISTERED, {}),
        (slash, {"key": "stake/2"}),
        (REFUNDED, {}),
        (PENALIZED, {}),
        (closed, {"parties": LEASE_STATE}),
    ]
    for fact, kwargs in steps:
        outcomes, _ = ledger.create_transfers(postings_for(fact, **kwargs), DECIDED)  # type: ignore[arg-type]
        assert [o.result.name for o in outcomes] == ["ok"], fact
        balances.append(
            tuple(
                ledger.accounts[a].available
                for a in (AVAILABLE, BID_ESCROW, ESCROW, POOL, CHECKER_STAKE)
            )
        )
    # available of: consumer, bid escrow, lease escrow, insurance pool, checker stake
    assert balances == [
        (10_000, 0, 0, 0, 0),
        (8_000, 2_000, 0, 0, 0),
        (8_000, 200, 0, 0, 0),  # 1_800 held for the lease, not yet posted
        (8_000, 200, 1_800, 0, 0),
        (8_200, 0, 1_800, 0, 0),
        (8_200, 0, 1_800, 0, 0),
        (8_200, 0, 1_800, 0, 1_000),
        (8_200, 0, 1_800, 2_000, 1_000),
        (8_650, 0, 1_800, 1_550, 1_000),
        (8_650, 0, 1_800, 1_650, 900),
        (10_450, 0, 0, 1_650, 900),
    ]
    assert ledger.pending_holds() == []
    assert ledger.accounts[CUSTODY].balance == -(10_000 + 2_000 + 1_000)


def test_a_bid_the_consumer_cannot_fund_is_refused_by_the_ledger_and_holds_nothing():
    ledger = LedgerState()
    ledger.open_accounts(accounts_for(protocol=True, consumers=[CONSUMER], bids=[BID]), T0)
    short = fu.DepositConfirmed(DEPOSIT_ID, CONSUMER, 1_999, CHAIN_REF, T0)
    ledger.create_transfers(postings_for(short), T0)
    outcomes, _ = ledger.create_transfers(postings_for(BID_PLACED), T0)
    assert [o.result.name for o in outcomes] == ["exceeds_credits"]
    assert ledger.accounts[BID_ESCROW].balance == 0
    assert ledger.accounts[AVAILABLE].available == 1_999


# -- property: a realistic marketplace keeps the ledger sound ------------------------------

STAKE_RULES = sk.StakeRules(stake_per_gpu={"H100": 1_000}, unbond_delay_s=60)
VERDICT_RULES = vd.VerdictRules(checker_stake_min=100, verdict_window_s=60, verdict_grace_s=10)
DEPOSIT = 10**9
CHECKER_STAKE_AMOUNT = 1_000
CONSUMERS = [UUID(int=0xC000 + i) for i in range(2)]
PROVIDERS = [UUID(int=0xA000 + i) for i in range(2)]
NODES = [UUID(int=0xD000 + i) for i in range(len(PROVIDERS))]
CHECKERS = [UUID(int=0xB000 + i) for i in range(3)]
EVIDENCE = "0f" * 32


@dataclass
class Market:
    """The domain's state, driven by its own decision functions, mirrored into a ledger.

    Next to the ledger it keeps what the domain says each account must hold, counted from
    the facts' own fields (never from the postings), to compare the ledger with."""

    rules: ls.LeaseRules
    postings: PostingRules
    slashing: sl.SlashingRules
    now: datetime = T0
    ledger: LedgerState = field(default_factory=LedgerState)
    stakes: dict[UUID, sk.ProviderStake] = field(default_factory=dict)
    book: ob.OrderBook = field(default_factory=lambda: ob.OrderBook("H100"))
    leases: dict[UUID, ls.Lease] = field(default_factory=dict)
    deposits: dict[UUID, fu.DepositConfirmed] = field(default_factory=dict)
    verdicts: vd.VerdictState = field(default_factory=vd.VerdictState)
    bid_consumers: dict[UUID, UUID] = field(default_factory=dict)
    checker_stake: dict[UUID, int] = field(default_factory=dict)
    """What is left of each checker's stake."""
    consumer_available: dict[UUID, int] = field(default_factory=dict)
    """What each consumer's account must hold, by the facts."""
    submitted: list[tuple[NewTransfer, ...]] = field(default_factory=list)
    charged: int = 0
    refunded: int = 0
    penalized: int = 0
    failures: int = 0
    ids: count[int] = field(default_factory=lambda: count(1))
    versions: dict[UUID, int] = field(default_factory=dict)
    """Facts recorded per stream so far: the key (stream, version) that names each fact."""

    def key(self, stream: UUID) -> str:
        self.versions[stream] = self.versions.get(stream, 0) + 1
        return f"{stream}/{self.versions[stream]}"

    def submit(self, transfers: tuple[NewTransfer, ...]) -> None:
        if not transfers:
            return
        outcomes, _ = self.ledger.create_transfers(transfers, self.now)
        assert [o.result.name for o in outcomes] == ["ok"] * len(transfers), transfers
        self.submitted.append(transfers)

    def credit_consumer(self, consumer: UUID, amount: int) -> None:
        self.consumer_available[consumer] = self.consumer_available.get(consumer, 0) + amount

    # -- facts -> postings, and the domain state they change ------------------------------

    def stake_facts(self, provider: UUID, facts: tuple[sk.Fact, ...]) -> int:
        """Submit the provider's stake facts; what they slashed."""
        slashed_amount = 0
        for fact in facts:
            self.submit(postings_for(fact, key=self.key(provider), rules=self.postings))
            self.stakes[provider] = sk.apply(self.stakes[provider], fact)
            if isinstance(fact, sk.StakeSlashed):
                slashed_amount += fact.amount
        return slashed_amount

    def lease_facts(self, facts: tuple[ls.LeaseFact, ...]) -> None:
        for fact in facts:
            before = self.leases.get(fact.lease_id)
            parties = before if before is not None else fact
            assert isinstance(parties, ls.Lease | ls.LeaseOpened)
            self.submit(
                postings_for(
                    fact, key=self.key(fact.lease_id), parties=parties, rules=self.postings
                )
            )
            if isinstance(fact, ls.UsageCharged):
                self.charged += fact.amount
            elif isinstance(fact, ls.EscrowToppedUp):
                self.credit_consumer(parties.consumer_id, -fact.amount)
            elif isinstance(fact, ls.LeaseClosed):
                self.credit_consumer(parties.consumer_id, fact.escrow_released)
            self.leases[fact.lease_id] = ls.apply(before, fact)

    def book_facts(self, facts: list[ob.OrderBookFact]) -> None:
        for fact in facts:
            consumer = None
            if isinstance(fact, ob.BidPlaced):
                self.bid_consumers[fact.bid.id] = fact.bid.consumer_id
                self.ledger.open_accounts(
                    accounts_for(bids=[fact.bid.id], rules=self.postings), self.now
                )
                self.credit_consumer(fact.bid.consumer_id, -fact.bid.escrow)
            elif isinstance(fact, ob.OrderMatched):
                lease_id = ls.lease_id_for(fact.ask_id, fact.bid_id)
                self.ledger.open_accounts(
                    accounts_for(leases=[lease_id], rules=self.postings), self.now
                )
            elif isinstance(fact, ob.BidRemainderRefunded):
                consumer = self.bid_consumers[fact.bid_id]
                self.credit_consumer(consumer, fact.escrow_amount)
            self.submit(postings_for(fact, consumer_id=consumer, rules=self.postings))
            if isinstance(fact, ob.OrderMatched):
                result_open, opened = ls.open_lease(fact, self.now)
                assert result_open is ls.OpenLeaseResult.ok
                self.lease_facts(opened)

    # -- the marketplace ------------------------------------------------------------------

    def start(self) -> None:
        self.ledger.open_accounts(
            accounts_for(
                protocol=True,
                consumers=CONSUMERS,
                providers=PROVIDERS,
                checkers=CHECKERS,
                rules=self.postings,
            ),
            self.now,
        )
        for consumer in CONSUMERS:
            self.deposit(consumer, DEPOSIT)
        for checker in CHECKERS:
            command = vd.RegisterChecker(checker, ADDRESS, CHECKER_STAKE_AMOUNT)
            result, facts = vd.register_checker(self.verdicts, command, VERDICT_RULES, self.now)
            assert result is vd.RegisterCheckerResult.ok
            for fact in facts:
                self.submit(postings_for(fact, rules=self.postings))
            self.verdicts = vd.apply_all(self.verdicts, facts)
            self.checker_stake[checker] = CHECKER_STAKE_AMOUNT
        for i, provider in enumerate(PROVIDERS):
            self.stakes[provider] = sk.ProviderStake(provider)
            self.stake_facts(provider, sk.bond(self.stakes[provider], 3_000, self.now)[1])
            self.place_ask(i, 8, 600 + 300 * i, timedelta(days=60))
        for consumer, amount in zip(CONSUMERS, (3_000, 4_999), strict=True):
            self.place_bid(consumer, amount)  # a lease from the start

    def deposit(self, consumer: UUID, amount: int) -> None:
        n = next(self.ids)
        deposit_id, reference = UUID(int=0xDE0000 + n), f"0x{n:064x}:{n % 7}"
        args = (deposit_id, consumer, amount, reference, self.now)
        result, facts = fu.confirm_deposit(self.deposits, *args)
        assert result is fu.ConfirmDepositResult.ok and len(facts) == 1
        for fact in facts:
            self.submit(postings_for(fact, rules=self.postings))
            self.deposits[fact.deposit_id] = fact
            self.credit_consumer(consumer, fact.amount)
        # The chain watcher sees the same log again: ok, nothing new.
        assert fu.confirm_deposit(self.deposits, *args) == (fu.ConfirmDepositResult.ok, ())

    def place_ask(self, index: int, gpu_count: int, price: int, ttl: timedelta) -> None:
        provider = PROVIDERS[index % len(PROVIDERS)]
        ask = ob.Ask(
            id=UUID(int=0xE00000 + next(self.ids)),
            provider_id=provider,
            node_id=NODES[index % len(NODES)],
            gpu_model="H100",
            gpu_count=gpu_count,
            price_per_gpu_hour=price,
            expires_at=self.now + ttl,
        )
        result, facts = self.book.place_ask(ask, self.now)
        assert result is ob.PlaceOrderResult.ok
        self.book_facts(facts)

    def place_bid(self, consumer: UUID, amount: int) -> None:
        gpu_count, duration_s, max_price = 1 + amount % 3, 60 + amount, 400 + amount % 800
        bid = ob.Bid(
            id=UUID(int=0xF00000 + next(self.ids)),
            consumer_id=consumer,
            gpu_model="H100",
            gpu_count=gpu_count,
            max_price_per_gpu_hour=max_price,
            duration_s=duration_s,
            escrow=ob.escrow_required(gpu_count, max_price, duration_s) + amount % 7,
        )
        result, facts = self.book.place_bid(bid, self.now)
        assert result is ob.PlaceOrderResult.ok
        self.book_facts(facts)

    def cancel_bid(self, index: int) -> None:
        resting = self.book.resting_bids()
        if not resting:
            return
        bid = resting[index % len(resting)].bid
        result, facts = self.book.cancel_bid(ob.CancelBid(bid.id, bid.consumer_id), self.now)
        assert result is ob.CancelOrderResult.ok
        assert any(isinstance(f, ob.BidRemainderRefunded) for f in facts)
        self.book_facts(facts)

    def fail_node(self, index: int, amount: int) -> None:
        """The checkers fail the node's last closed window; the slash, refunds, penalties and
        SLA closes follow."""
        with_leases = sorted({lease.node_id for lease in self.leases.values()})
        if index >= len(NODES) and with_leases:  # mostly a node that has leases
            node = with_leases[index % len(with_leases)]
        else:
            node = NODES[index % len(NODES)]
        provider = PROVIDERS[NODES.index(node)]
        grace = timedelta(seconds=VERDICT_RULES.verdict_grace_s)
        window_end = vd.window_containing(self.now - grace, VERDICT_RULES)
        window_start = window_end - timedelta(seconds=VERDICT_RULES.verdict_window_s)
        if (node, window_start) in self.verdicts.decisions:
            return
        passing = amount % 4  # the checker that passes the node; 3: none does
        kind = vd.FailureKind(1 + amount % 3)
        for i, checker in enumerate(CHECKERS):
            passed = i == passing
            verdict = vd.Verdict(
                verdict_id=UUID(int=0x7E0000 + next(self.ids)),
                checker_id=checker,
                node_id=node,
                provider_id=provider,
                window_start=window_start,
                window_end=window_end,
                latency_ms_p99=100,
                throughput_milli_per_s=1_000,
                uptime_ppm=vd.UPTIME_PPM_MAX if passed else 0,
                passed=passed,
                failure_kind=vd.FailureKind.none if passed else kind,
                evidence_hash=EVIDENCE,
            )
            result, facts = vd.submit_verdict(self.verdicts, verdict, VERDICT_RULES, window_end)
            assert result is vd.SubmitVerdictResult.ok
            self.verdicts = vd.apply_all(self.verdicts, facts)
        decide_result, decided = vd.decide_window(
            self.verdicts, node, window_start, VERDICT_RULES, self.now
        )
        assert decide_result is vd.DecideWindowResult.ok
        self.verdicts = vd.apply_all(self.verdicts, decided)
        failed, *contradicted = decided
        assert isinstance(failed, vd.QuorumFailed)
        self.failures += 1

        _, slash_facts = sk.slash(
            self.stakes[provider],
            STAKE_RULES,
            kind=failed.slash_kind,
            gpu_model="H100",
            gpu_count=1 + amount % 3,
            offence_at=failed.window_start,
            now=self.now,
        )
        slashed_amount = self.stake_facts(provider, slash_facts)
        on_node = [lease for lease in self.leases.values() if lease.node_id == node]
        refunds = sl.refunds_for(failed, slashed_amount, on_node, self.slashing, self.now)
        assert sum(r.amount for r in refunds) <= slashed_amount
        for refund in refunds:
            self.submit(postings_for(refund, rules=self.postings))
            self.credit_consumer(refund.consumer_id, refund.amount)
            self.refunded += refund.amount
        for contradiction in contradicted:
            assert isinstance(contradiction, vd.CheckerContradicted)
            checker = contradiction.checker_id
            penalty = sl.checker_penalty(
                CHECKER_STAKE_AMOUNT, self.checker_stake[checker], self.slashing
            )
            if penalty == 0:
                continue
            fact = sl.CheckerPenalized(checker, node, failed.window_start, penalty, self.now)
            self.submit(postings_for(fact, rules=self.postings))
            self.checker_stake[checker] -= penalty
            self.penalized += penalty
        if sl.closes_leases(failed, self.slashing):
            for lease in on_node:
                if lease.status is ls.LeaseStatus.closed:
                    continue
                result_close, facts = ls.close(
                    lease, ls.CloseReason.sla_breach, ls.PROTOCOL_ID, self.now, self.rules
                )
                assert result_close is ls.CloseResult.ok
                self.lease_facts(facts)

    def step(self, op: str, index: int, amount: int) -> None:
        provider = PROVIDERS[index % len(PROVIDERS)]
        stake = self.stakes[provider]
        if op == "bond":
            self.stake_facts(provider, sk.bond(stake, amount, self.now)[1])
        elif op == "unbond":
            self.stake_facts(
                provider, sk.request_unbond(stake, amount, (), STAKE_RULES, self.now)[1]
            )
        elif op == "complete":
            self.stake_facts(provider, sk.complete_unbond(stake, self.now)[1])
        elif op == "slash":
            kind = sk.SlashKind(1 + amount % 2)
            _, facts = sk.slash(
                stake,
                STAKE_RULES,
                kind=kind,
                gpu_model="H100",
                gpu_count=1 + amount % 3,
                offence_at=self.now,
                now=self.now,
            )
            self.stake_facts(provider, facts)
        elif op == "deposit":
            self.deposit(CONSUMERS[index % len(CONSUMERS)], amount)
        elif op == "bid":
            self.place_bid(CONSUMERS[index % len(CONSUMERS)], amount)
        elif op == "cancel_bid":
            self.cancel_bid(index)
        elif op == "ask":
            ttl = timedelta(seconds=300 + amount)
            self.place_ask(index, 1 + amount % 4, 500 + amount % 600, ttl)
        elif op == "fail":
            self.fail_node(index, amount)
        else:
            open_leases = [
                lease for lease in self.leases.values() if lease.status is not ls.LeaseStatus.closed
            ]
            if not open_leases:
                return
            lease = open_leases[index % len(open_leases)]
            if op == "charge":
                _, facts = ls.charge_usage(lease, amount, f"usage-{amount}", self.now, self.rules)
            elif op == "top_up":
                _, facts = ls.top_up(lease, amount, self.now)
            else:
                _, facts = ls.close(
                    lease, ls.CloseReason.consumer, lease.consumer_id, self.now, self.rules
                )
            self.lease_facts(facts)


OPS = st.sampled_from(
    [
        "bond",
        "unbond",
        "complete",
        "slash",
        "deposit",
        "bid",
        "cancel_bid",
        "ask",
        "fail",
        "charge",
        "top_up",
        "close",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(OPS, st.integers(0, 3), st.integers(1, 5_000), st.integers(0, 90)),
        max_size=40,
    ),
    fee_bps=st.integers(0, 10_000),
    on_exhausted=st.sampled_from(ls.EscrowExhaustedAction),
    refund_consumers=st.booleans(),
    checker_penalty_bps=st.sampled_from([0, 1_000, 4_000, 10_000]),
)
def test_a_realistic_marketplace_keeps_the_ledger_balanced_and_idempotent(
    ops, fee_bps, on_exhausted, refund_consumers, checker_penalty_bps
):
    market = Market(
        rules=ls.LeaseRules(on_escrow_exhausted=on_exhausted, escrow_grace_s=30),
        postings=PostingRules(protocol_fee_bps=fee_bps),
        slashing=sl.SlashingRules(
            refund_consumers=refund_consumers, checker_penalty_bps=checker_penalty_bps
        ),
    )
    market.start()
    for op, index, amount, advance_s in ops:
        market.now += timedelta(seconds=advance_s)
        market.step(op, index, amount)
    ledger = market.ledger
    accounts = ledger.accounts.values()

    # Per asset, debits == credits, posted and pending.
    for debits, credits in ledger.trial_balance().values():
        assert debits == credits
    assert sum(a.debits_pending for a in accounts) == sum(a.credits_pending for a in accounts)
    # No constrained account below zero, counting its holds.
    for account in accounts:
        if account.debits_limited:
            assert account.available >= 0, account
    # What was charged went to providers and the treasury, exactly.
    earned = sum(a.balance for a in accounts if a.code == AccountCode.provider_earnings)
    assert earned + ledger.accounts[TREASURY].balance == market.charged
    # The ledger mirrors the domain's own state.
    for provider, stake in market.stakes.items():
        assert (
            ledger.accounts[account_id(AccountCode.provider_stake_bonded, provider)].balance
            == stake.bonded
        )
        unbonding = ledger.accounts[account_id(AccountCode.provider_stake_unbonding, provider)]
        assert unbonding.balance == stake.unbonding_total
    slashed_total = sum(s.slashed for s in market.stakes.values())
    assert ledger.accounts[POOL].balance == slashed_total + market.penalized - market.refunded
    if not refund_consumers:
        assert market.refunded == 0
    for checker, left in market.checker_stake.items():
        assert ledger.accounts[account_id(AccountCode.checker_stake, checker)].balance == left
        assert ledger.accounts[account_id(AccountCode.checker_rewards, checker)].balance == 0
    for lease in market.leases.values():
        assert (
            ledger.accounts[account_id(AccountCode.lease_escrow, lease.id)].balance
            == lease.escrow_available
        )
    for bid_id in market.bid_consumers:
        standing = market.book.bid(bid_id)
        assert standing is not None
        held = ledger.accounts[account_id(AccountCode.bid_escrow, bid_id)].balance
        assert held == standing.escrow_remaining
        if standing.status is not ob.OrderStatus.resting:
            assert held == 0
    for consumer, expected in market.consumer_available.items():
        available = ledger.accounts[account_id(AccountCode.consumer_available, consumer)]
        assert available.balance == expected
    deposited = sum(d.amount for d in market.deposits.values())
    bonded_total = sum(s.bonded_total for s in market.stakes.values())
    released = sum(s.released for s in market.stakes.values())
    custody = ledger.accounts[CUSTODY].balance
    assert custody == -(deposited + bonded_total - released + CHECKER_STAKE_AMOUNT * len(CHECKERS))
    assert ledger.pending_holds() == []

    # Re-submitting every posting is a retry: all ok, nothing new recorded, nothing moves.
    balances = {a.id: a.balances() for a in accounts}
    for transfers in market.submitted:
        outcomes, facts = ledger.create_transfers(transfers, market.now)
        assert all(o.ok for o in outcomes)
        assert facts == []
    assert {a.id: a.balances() for a in ledger.accounts.values()} == balances


@pytest.mark.parametrize(
    "fact",
    [
        sk.StakeBonded(PROVIDER, 500, T0),
        ls.UsageCharged(LEASE, "u", 100, 100, T0),
        ls.EscrowToppedUp(LEASE, 900, 1_800, T0 + timedelta(hours=1), T0),
    ],
)
def test_a_fact_without_an_id_of_its_own_needs_a_key(fact):
    with pytest.raises(ValueError, match="pass key="):
        postings_for(fact, parties=LEASE_STATE)


def test_two_equal_bonds_with_their_own_keys_are_two_transfers():
    # Found by the property test: named by their fields, the second bond was taken for a retry.
    bond = sk.StakeBonded(PROVIDER, 1, T0)
    first = only(postings_for(bond, key="stake/1"))
    second = only(postings_for(bond, key="stake/2"))
    assert first.id != second.id
