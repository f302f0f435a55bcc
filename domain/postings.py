"""Marketplace facts -> ledger commands. Pure: no I/O, no clock reads, no ledger state.

Every movement of money the marketplace decides (`domain.stake`, `domain.orderbook`,
`domain.lease`) becomes one or more `ledger.model.NewTransfer`s whose `references` point
back at the fact that caused it. Translating the same fact twice yields identical commands
(same ids, same fields), so re-submitting them to the ledger is an idempotent retry.

Accounts
--------

One account per (AccountCode, owner), with a deterministic id::

    account_id(code, owner) = uuid5(ACCOUNT_ID_NAMESPACE, f"{code.name}:{owner}")

Owners: a consumer's id (consumer_available), a provider's id (provider_earnings,
provider_stake_bonded, provider_stake_unbonding), a bid's id (bid_escrow), a lease's id
(lease_escrow), a checker's id (checker_stake, checker_rewards). The
protocol-wide accounts (chain_custody, protocol_treasury, insurance_pool) are owned by
`PROTOCOL_OWNER` (= `domain.lease.PROTOCOL_ID`, UUID(int=1)).

Flags: every account may not go below zero (`debits_must_not_exceed_credits`), except
chain_custody, the external mirror of the tokens held on chain: it is the other side of
every deposit, withdrawal, bond and release, and runs negative by what the contracts hold.

Scheme (one fact -> its transfers; amounts are the fact's, never recomputed)
--------------------------------------------------------------------------

- `StakeBonded`: chain_custody -> provider_stake_bonded (stake_bond). Stake is bonded on
  chain, from the provider's wallet, so the chain mirror is the source; it is not drawn from
  provider_earnings (which a provider claims on chain first).
- `UnbondRequested`: provider_stake_bonded -> provider_stake_unbonding (stake_unbond).
- `UnbondCompleted`: provider_stake_unbonding -> chain_custody (stake_unbond): the stake
  leaves the protocol where it came from.
- `StakeSlashed`: from_bonded provider_stake_bonded -> insurance_pool, and each
  from_unbonding part provider_stake_unbonding -> insurance_pool (slash); the legs are one
  linked chain: all or nothing.
- `DepositConfirmed`: chain_custody -> consumer_available (deposit).
- `BidPlaced`: the bid's escrow consumer_available -> bid_escrow (escrow_hold): a bid arrives
  with its escrow held, so no later match can find the consumer short of funds.
- `OrderMatched`: a PENDING transfer bid_escrow -> lease_escrow (escrow_hold) of
  escrow_amount, no timeout: the bid's funds are reserved for the lease.
- `LeaseOpened`: posts that hold in full (escrow_hold, pending_id = `escrow_hold_id`): the
  escrow now sits in lease_escrow and usage may draw it.
- `BidRemainderRefunded`: bid_escrow -> consumer_available (escrow_release): what the bid's
  fills did not use, when it leaves the book.
- `CheckerRegistered`: chain_custody -> checker_stake (stake_bond).
- `CheckerPenalized`: checker_stake -> insurance_pool (slash).
- `ConsumerRefunded`: insurance_pool -> consumer_available (refund).
- `EscrowToppedUp`: consumer_available -> lease_escrow (escrow_hold), posted at once.
- `UsageCharged`: the drawn `amount` splits into withheld (usage the checkers failed:
  lease_escrow -> insurance_pool, usage_charge; the slash refunds the consumer out of that
  pool), fee = (amount - withheld) * protocol_fee_bps // 10_000 (rounded down) and provider
  = amount - withheld - fee, so withheld + provider + fee == amount exactly; linked legs
  lease_escrow -> provider_earnings (usage_charge) and lease_escrow -> protocol_treasury
  (protocol_fee). A zero leg is left out; `amount_uncovered` never moves.
- `LeaseClosed`: escrow_released lease_escrow -> consumer_available (escrow_release); none
  when the close kept the escrow for settlement.
- `EscrowReleased`: amount lease_escrow -> consumer_available (escrow_release).
- `CheckerRewarded`: protocol_treasury -> checker_rewards (checker_reward).
- `PayoutClaimed`: provider_earnings -> chain_custody (payout): the tokens left on chain.
- Everything else (placing or cancelling orders, heartbeats, downtime, pauses...) moves no
  money: ().

In natural fact order no constrained account is overdrawn: a lease's escrow is posted
(LeaseOpened) before usage draws it, charges never exceed escrow_held (the lease rules),
and the close releases exactly held - charged, leaving lease_escrow at zero.

Ids
---

Each fact has an identity string (its kind and the ids or fields that name it); each leg
gets ``uuid5(TRANSFER_ID_NAMESPACE, f"{identity}/{leg}")``. Facts named by ids
(UnbondRequested/Completed: provider + unbond_id; OrderMatched, LeaseOpened, LeaseClosed:
the lease; DepositConfirmed: the deposit; BidPlaced, BidRemainderRefunded: the bid;
CheckerRegistered: the checker; CheckerPenalized: checker + node + window;
ConsumerRefunded: lease + window) are unique by construction. Facts without an id of their own (StakeBonded,
StakeSlashed, EscrowToppedUp, UsageCharged) are named by the caller's `key` (their event's
stream and version): named by their fields, two equal facts would share ids and the second
would be taken for a retry (the property test found exactly that: two equal bonds).

Lease facts after the open (`EscrowToppedUp`, `UsageCharged`, `LeaseClosed`) carry only the
lease id: the caller passes the lease's parties (`parties=`, e.g. the `Lease`, its
`LeaseOpened` or the `OrderMatched`) to name the consumer's and provider's accounts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from uuid import UUID, uuid5

from domain import funds as funds_facts
from domain import lease as lease_facts
from domain import orderbook as book_facts
from domain import slashing as slashing_facts
from domain import stake as stake_facts
from domain import verdicts as verdict_facts
from domain.codes import AccountCode, TransferCode
from domain.lease import PROTOCOL_ID, lease_id_for
from ledger.model import NIL_ID, AccountFlags, NewAccount, NewTransfer, References, TransferFlags

ACCOUNT_ID_NAMESPACE = UUID("1013b5fe-932c-5d8a-a88b-bcd799ee7cea")
"""uuid5(NAMESPACE_URL, "urn:aether-ledger:account"): the namespace of account ids. Never
change."""
TRANSFER_ID_NAMESPACE = UUID("2326159d-9620-5720-84c7-2ef8b16200bf")
"""uuid5(NAMESPACE_URL, "urn:aether-ledger:transfer"): the namespace of transfer ids. Never
change."""
PROTOCOL_OWNER = PROTOCOL_ID
"""The owner of the protocol-wide accounts: chain_custody, protocol_treasury,
insurance_pool."""
PROTOCOL_CODES = (
    AccountCode.chain_custody,
    AccountCode.protocol_treasury,
    AccountCode.insurance_pool,
)
CONSUMER_CODES = (AccountCode.consumer_available,)
PROVIDER_CODES = (
    AccountCode.provider_earnings,
    AccountCode.provider_stake_bonded,
    AccountCode.provider_stake_unbonding,
)
LEASE_CODES = (AccountCode.lease_escrow,)
BID_CODES = (AccountCode.bid_escrow,)
CHECKER_CODES = (AccountCode.checker_stake, AccountCode.checker_rewards)
BPS_MAX = 10_000
"""Basis points in a whole: a fee of BPS_MAX takes everything."""

MarketFact = (
    stake_facts.Fact
    | book_facts.OrderBookFact
    | lease_facts.LeaseFact
    | funds_facts.DepositConfirmed
    | funds_facts.CheckerRewarded
    | funds_facts.PayoutClaimed
    | verdict_facts.CheckerRegistered
    | slashing_facts.CheckerPenalized
    | slashing_facts.ConsumerRefunded
)
"""Every fact `postings_for` accepts."""


@dataclass(frozen=True, slots=True)
class PostingRules:
    """The asset, the shard and the protocol fee. Validated at construction."""

    asset: str = "AETH"
    protocol_fee_bps: int = 500
    """Share of each usage charge that goes to protocol_treasury, in basis points
    (0..BPS_MAX); rounded down, the provider gets the rest."""
    shard: int = 0
    """The ledger shard that owns the accounts opened by `accounts_for`."""

    def __post_init__(self) -> None:
        if type(self.protocol_fee_bps) is not int:
            raise TypeError(f"protocol_fee_bps must be an int, got {self.protocol_fee_bps!r}")
        if not 0 <= self.protocol_fee_bps <= BPS_MAX:
            raise ValueError(f"protocol_fee_bps must be within 0..{BPS_MAX}")
        if not self.asset:
            raise ValueError("asset must not be empty")

    def fee_of(self, amount: int) -> int:
        """The protocol fee of a usage charge: floor(amount * bps / 10_000)."""
        return amount * self.protocol_fee_bps // BPS_MAX


DEFAULT_POSTING_RULES = PostingRules()


class LeaseParties(Protocol):
    """Who a lease involves: a `Lease`, a `LeaseOpened` or an `OrderMatched`."""

    @property
    def consumer_id(self) -> UUID: ...

    @property
    def provider_id(self) -> UUID: ...


# -- accounts -----------------------------------------------------------------------------


def account_id(code: AccountCode, owner: UUID) -> UUID:
    """The id of `owner`'s account of kind `code`: uuid5 over f"{code.name}:{owner}"."""
    return uuid5(ACCOUNT_ID_NAMESPACE, f"{code.name}:{owner}")


def protocol_account_id(code: AccountCode) -> UUID:
    """The id of a protocol-wide account (owned by PROTOCOL_OWNER)."""
    return account_id(code, PROTOCOL_OWNER)


def account_flags(code: AccountCode) -> AccountFlags:
    """chain_custody is unconstrained; every other account may not go below zero."""
    if code is AccountCode.chain_custody:
        return AccountFlags.none
    return AccountFlags.debits_must_not_exceed_credits


def _new_account(code: AccountCode, owner: UUID, rules: PostingRules) -> NewAccount:
    return NewAccount(
        account_id(code, owner), rules.asset, int(code), account_flags(code), rules.shard
    )


def accounts_for(
    *,
    protocol: bool = False,
    consumers: Iterable[UUID] = (),
    providers: Iterable[UUID] = (),
    leases: Iterable[UUID] = (),
    bids: Iterable[UUID] = (),
    checkers: Iterable[UUID] = (),
    rules: PostingRules = DEFAULT_POSTING_RULES,
) -> tuple[NewAccount, ...]:
    """The accounts to open: the protocol's (if `protocol`), then each consumer's, each
    provider's, each lease's, each bid's and each checker's. Opening an account again with
    equal fields is `ok`."""
    commands: list[NewAccount] = []
    if protocol:
        commands += [_new_account(code, PROTOCOL_OWNER, rules) for code in PROTOCOL_CODES]
    for owners, codes in (
        (consumers, CONSUMER_CODES),
        (providers, PROVIDER_CODES),
        (leases, LEASE_CODES),
        (bids, BID_CODES),
        (checkers, CHECKER_CODES),
    ):
        for owner in owners:
            commands += [_new_account(code, owner, rules) for code in codes]
    return tuple(commands)


# -- transfer ids -------------------------------------------------------------------------


def transfer_id(identity: str, leg: str) -> UUID:
    """The id of the transfer `leg` of the fact named `identity`."""
    return uuid5(TRANSFER_ID_NAMESPACE, f"{identity}/{leg}")


def _order_matched_identity(lease_id: UUID) -> str:
    return f"order_matched:{lease_id}"


def escrow_hold_id(lease_id: UUID) -> UUID:
    """The id of the pending escrow hold placed by the match that opens `lease_id`."""
    return transfer_id(_order_matched_identity(lease_id), "escrow_hold")


def _at(moment: datetime) -> str:
    return moment.isoformat()


# -- postings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Leg:
    name: str
    debit: UUID
    credit: UUID
    amount: int
    code: TransferCode
    references: References = ()


def _transfers(
    identity: str,
    legs: Iterable[_Leg],
    references: References,
    effective_at: datetime,
    rules: PostingRules,
    flags: TransferFlags = TransferFlags.none,
    pending_id: UUID = NIL_ID,
) -> tuple[NewTransfer, ...]:
    """One transfer per leg with a non-zero amount; several form one linked chain."""
    kept = [leg for leg in legs if leg.amount > 0]
    return tuple(
        NewTransfer(
            id=transfer_id(identity, leg.name),
            debit_account_id=leg.debit,
            credit_account_id=leg.credit,
            amount=leg.amount,
            asset=rules.asset,
            code=int(leg.code),
            flags=flags | (TransferFlags.linked if index < len(kept) - 1 else TransferFlags.none),
            pending_id=pending_id,
            references=references + leg.references,
            effective_at=effective_at,
        )
        for index, leg in enumerate(kept)
    )


def _require_key(fact: MarketFact, key: str | None) -> str:
    if not key:
        raise ValueError(
            f"{type(fact).__name__} has no id of its own: pass key= (e.g. its event's stream "
            "and version), or two equal facts would share transfer ids"
        )
    return key


def _require_parties(fact: MarketFact, parties: LeaseParties | None) -> LeaseParties:
    if parties is None:
        raise ValueError(
            f"{type(fact).__name__} of lease {getattr(fact, 'lease_id', '?')}: "
            "pass parties= (the lease) to name its accounts"
        )
    return parties


def postings_for(
    fact: MarketFact,
    *,
    key: str | None = None,
    parties: LeaseParties | None = None,
    consumer_id: UUID | None = None,
    rules: PostingRules = DEFAULT_POSTING_RULES,
) -> tuple[NewTransfer, ...]:
    """The ledger transfers that mirror `fact`, in the order to submit them; () when the fact
    moves no money. `parties` (the lease) is required for EscrowToppedUp, UsageCharged and
    LeaseClosed, whose facts name only the lease; `consumer_id` (the bid's) for
    BidRemainderRefunded. `key` is required for the facts that have no id of their own
    (StakeBonded, StakeSlashed, EscrowToppedUp, UsageCharged): what names the fact uniquely,
    e.g. its event's stream and version."""
    custody = protocol_account_id(AccountCode.chain_custody)
    pool = protocol_account_id(AccountCode.insurance_pool)
    if isinstance(fact, funds_facts.DepositConfirmed):
        refs: References = (
            ("fact", "deposit_confirmed"),
            ("consumer", str(fact.consumer_id)),
            ("chain", fact.reference),
        )
        leg = _Leg(
            "deposit",
            custody,
            account_id(AccountCode.consumer_available, fact.consumer_id),
            fact.amount,
            TransferCode.deposit,
        )
        return _transfers(f"deposit:{fact.deposit_id}", [leg], refs, fact.confirmed_at, rules)
    if isinstance(fact, book_facts.BidPlaced):
        bid = fact.bid
        refs = (("fact", "bid_placed"), ("bid", str(bid.id)), ("consumer", str(bid.consumer_id)))
        leg = _Leg(
            "escrow_hold",
            account_id(AccountCode.consumer_available, bid.consumer_id),
            account_id(AccountCode.bid_escrow, bid.id),
            bid.escrow,
            TransferCode.escrow_hold,
        )
        return _transfers(f"bid_placed:{bid.id}", [leg], refs, fact.placed_at, rules)
    if isinstance(fact, book_facts.BidRemainderRefunded):
        if consumer_id is None:
            raise ValueError(
                f"BidRemainderRefunded of bid {fact.bid_id}: pass consumer_id= (the bid's)"
            )
        refs = (("fact", "bid_remainder_refunded"), ("bid", str(fact.bid_id)))
        leg = _Leg(
            "release",
            account_id(AccountCode.bid_escrow, fact.bid_id),
            account_id(AccountCode.consumer_available, consumer_id),
            fact.escrow_amount,
            TransferCode.escrow_release,
        )
        return _transfers(
            f"bid_remainder_refunded:{fact.bid_id}", [leg], refs, fact.refunded_at, rules
        )
    if isinstance(fact, verdict_facts.CheckerRegistered):
        c = fact.checker_id
        refs = (("fact", "checker_registered"), ("checker", str(c)))
        leg = _Leg(
            "stake",
            custody,
            account_id(AccountCode.checker_stake, c),
            fact.stake_amount,
            TransferCode.stake_bond,
        )
        return _transfers(f"checker_registered:{c}", [leg], refs, fact.registered_at, rules)
    if isinstance(fact, slashing_facts.CheckerPenalized):
        c = fact.checker_id
        window = _at(fact.window_start)
        refs = (
            ("fact", "checker_penalized"),
            ("checker", str(c)),
            ("node", str(fact.node_id)),
            ("window", window),
        )
        leg = _Leg(
            "penalty",
            account_id(AccountCode.checker_stake, c),
            pool,
            fact.amount,
            TransferCode.slash,
        )
        identity = f"checker_penalized:{c}:{fact.node_id}:{window}"
        return _transfers(identity, [leg], refs, fact.penalized_at, rules)
    if isinstance(fact, slashing_facts.ConsumerRefunded):
        window = _at(fact.window_start)
        refs = (
            ("fact", "consumer_refunded"),
            ("lease", str(fact.lease_id)),
            ("node", str(fact.node_id)),
            ("window", window),
        )
        leg = _Leg(
            "refund",
            pool,
            account_id(AccountCode.consumer_available, fact.consumer_id),
            fact.amount,
            TransferCode.refund,
        )
        identity = f"consumer_refunded:{fact.lease_id}:{window}"
        return _transfers(identity, [leg], refs, fact.refunded_at, rules)
    if isinstance(fact, stake_facts.StakeBonded):
        p = fact.provider_id
        identity = f"stake_bonded:{p}:{_require_key(fact, key)}"
        refs = (
            ("fact", "stake_bonded"),
            ("provider", str(p)),
            ("at", _at(fact.bonded_at)),
        )
        bonded = account_id(AccountCode.provider_stake_bonded, p)
        leg = _Leg("bond", custody, bonded, fact.amount, TransferCode.stake_bond)
        return _transfers(identity, [leg], refs, fact.bonded_at, rules)
    if isinstance(fact, stake_facts.UnbondRequested):
        p = fact.provider_id
        identity = f"unbond_requested:{p}:{fact.unbond_id}"
        refs = (("fact", "unbond_requested"), ("provider", str(p)), ("unbond", str(fact.unbond_id)))
        leg = _Leg(
            "unbond",
            account_id(AccountCode.provider_stake_bonded, p),
            account_id(AccountCode.provider_stake_unbonding, p),
            fact.amount,
            TransferCode.stake_unbond,
        )
        return _transfers(identity, [leg], refs, fact.requested_at, rules)
    if isinstance(fact, stake_facts.UnbondCompleted):
        p = fact.provider_id
        identity = f"unbond_completed:{p}:{fact.unbond_id}"
        refs = (("fact", "unbond_completed"), ("provider", str(p)), ("unbond", str(fact.unbond_id)))
        unbonding = account_id(AccountCode.provider_stake_unbonding, p)
        leg = _Leg("release", unbonding, custody, fact.amount, TransferCode.stake_unbond)
        return _transfers(identity, [leg], refs, fact.completed_at, rules)
    if isinstance(fact, stake_facts.StakeSlashed):
        p = fact.provider_id
        identity = f"stake_slashed:{p}:{_require_key(fact, key)}"
        refs = (
            ("fact", "stake_slashed"),
            ("provider", str(p)),
            ("kind", fact.kind.name),
            ("at", _at(fact.slashed_at)),
        )
        legs = [
            _Leg(
                "from_bonded",
                account_id(AccountCode.provider_stake_bonded, p),
                pool,
                fact.from_bonded,
                TransferCode.slash,
            )
        ]
        unbonding = account_id(AccountCode.provider_stake_unbonding, p)
        legs += [
            _Leg(
                f"from_unbonding:{part.unbond_id}",
                unbonding,
                pool,
                part.amount,
                TransferCode.slash,
                (("unbond", str(part.unbond_id)),),
            )
            for part in fact.from_unbonding
        ]
        return _transfers(identity, legs, refs, fact.slashed_at, rules)
    if isinstance(fact, book_facts.OrderMatched):
        lease_id = lease_id_for(fact.ask_id, fact.bid_id)
        refs = (
            ("fact", "order_matched"),
            ("lease", str(lease_id)),
            ("ask", str(fact.ask_id)),
            ("bid", str(fact.bid_id)),
        )
        leg = _Leg(
            "escrow_hold",
            account_id(AccountCode.bid_escrow, fact.bid_id),
            account_id(AccountCode.lease_escrow, lease_id),
            fact.escrow_amount,
            TransferCode.escrow_hold,
        )
        identity = _order_matched_identity(lease_id)
        return _transfers(identity, [leg], refs, fact.matched_at, rules, TransferFlags.pending)
    if isinstance(fact, lease_facts.LeaseOpened):
        refs = (("fact", "lease_opened"), ("lease", str(fact.lease_id)))
        leg = _Leg(
            "escrow_post",
            account_id(AccountCode.bid_escrow, fact.bid_id),
            account_id(AccountCode.lease_escrow, fact.lease_id),
            fact.escrow_amount,
            TransferCode.escrow_hold,
        )
        return _transfers(
            f"lease_opened:{fact.lease_id}",
            [leg],
            refs,
            fact.opened_at,
            rules,
            TransferFlags.post_pending_transfer,
            escrow_hold_id(fact.lease_id),
        )
    if isinstance(fact, lease_facts.EscrowToppedUp):
        who = _require_parties(fact, parties)
        identity = f"escrow_topped_up:{fact.lease_id}:{_require_key(fact, key)}"
        refs = (
            ("fact", "escrow_topped_up"),
            ("lease", str(fact.lease_id)),
            ("at", _at(fact.topped_up_at)),
        )
        leg = _Leg(
            "top_up",
            account_id(AccountCode.consumer_available, who.consumer_id),
            account_id(AccountCode.lease_escrow, fact.lease_id),
            fact.amount,
            TransferCode.escrow_hold,
        )
        return _transfers(identity, [leg], refs, fact.topped_up_at, rules)
    if isinstance(fact, lease_facts.UsageCharged):
        who = _require_parties(fact, parties)
        identity = f"usage_charged:{fact.lease_id}:{_require_key(fact, key)}"
        refs = (
            ("fact", "usage_charged"),
            ("lease", str(fact.lease_id)),
            ("usage", fact.usage_ref),
            ("at", _at(fact.charged_at)),
        )
        escrow = account_id(AccountCode.lease_escrow, fact.lease_id)
        fee = rules.fee_of(fact.amount - fact.withheld)
        legs = [
            _Leg(
                "withheld",
                escrow,
                protocol_account_id(AccountCode.insurance_pool),
                fact.withheld,
                TransferCode.usage_charge,
            ),
            _Leg(
                "provider",
                escrow,
                account_id(AccountCode.provider_earnings, who.provider_id),
                fact.amount - fact.withheld - fee,
                TransferCode.usage_charge,
            ),
            _Leg(
                "fee",
                escrow,
                protocol_account_id(AccountCode.protocol_treasury),
                fee,
                TransferCode.protocol_fee,
            ),
        ]
        return _transfers(identity, legs, refs, fact.charged_at, rules)
    if isinstance(fact, funds_facts.CheckerRewarded):
        refs = (
            ("fact", "checker_rewarded"),
            ("checker", str(fact.checker_id)),
            ("epoch", _at(fact.epoch_start)),
            ("agreed_verdicts", str(fact.agreed_verdicts)),
        )
        legs = [
            _Leg(
                "reward",
                protocol_account_id(AccountCode.protocol_treasury),
                account_id(AccountCode.checker_rewards, fact.checker_id),
                fact.amount,
                TransferCode.checker_reward,
            )
        ]
        identity = f"checker_rewarded:{fact.checker_id}:{_at(fact.epoch_start)}"
        return _transfers(identity, legs, refs, fact.rewarded_at, rules)
    if isinstance(fact, funds_facts.PayoutClaimed):
        refs = (
            ("fact", "payout_claimed"),
            ("provider", str(fact.provider_id)),
            ("epoch", str(fact.epoch)),
            ("chain", fact.reference),
        )
        legs = [
            _Leg(
                "payout",
                account_id(AccountCode.provider_earnings, fact.provider_id),
                protocol_account_id(AccountCode.chain_custody),
                fact.amount,
                TransferCode.payout,
            )
        ]
        return _transfers(f"payout_claimed:{fact.reference}", legs, refs, fact.claimed_at, rules)
    if isinstance(fact, lease_facts.EscrowReleased):
        who = _require_parties(fact, parties)
        refs = (
            ("fact", "escrow_released"),
            ("lease", str(fact.lease_id)),
            ("at", _at(fact.released_at)),
        )
        legs = [
            _Leg(
                "release",
                account_id(AccountCode.lease_escrow, fact.lease_id),
                account_id(AccountCode.consumer_available, who.consumer_id),
                fact.amount,
                TransferCode.escrow_release,
            )
        ]
        return _transfers(f"escrow_released:{fact.lease_id}", legs, refs, fact.released_at, rules)
    if isinstance(fact, lease_facts.LeaseClosed):
        who = _require_parties(fact, parties)
        refs = (
            ("fact", "lease_closed"),
            ("lease", str(fact.lease_id)),
            ("reason", fact.reason.name),
        )
        leg = _Leg(
            "release",
            account_id(AccountCode.lease_escrow, fact.lease_id),
            account_id(AccountCode.consumer_available, who.consumer_id),
            fact.escrow_released,
            TransferCode.escrow_release,
        )
        return _transfers(f"lease_closed:{fact.lease_id}", [leg], refs, fact.closed_at, rules)
    return ()


__all__ = [
    "ACCOUNT_ID_NAMESPACE",
    "BID_CODES",
    "BPS_MAX",
    "CHECKER_CODES",
    "CONSUMER_CODES",
    "DEFAULT_POSTING_RULES",
    "LEASE_CODES",
    "PROTOCOL_CODES",
    "PROTOCOL_OWNER",
    "PROVIDER_CODES",
    "TRANSFER_ID_NAMESPACE",
    "LeaseParties",
    "MarketFact",
    "PostingRules",
    "account_flags",
    "account_id",
    "accounts_for",
    "escrow_hold_id",
    "postings_for",
    "protocol_account_id",
    "transfer_id",
]
