"""Settlement's event store: per-epoch plans, outcomes, payout roots and their proofs.

Table `settlement_events` (append-only, on the ledger's datastore like the marketplace's,
plain JSON facts by `ledger.market.codec`). One stream per epoch, named by the epoch number
(``epoch_stream_id(epoch)``), written in this order, each version at most once:

1. `EpochPlanned` (version 1): what `domain.settlement.settle_epoch` decided, before any
   money moves: the charges per lease with the usage sequences they cover, the checker
   rewards, the closed leases whose escrow is released, the totals. A plan is a
   commitment: its usage keys count as settled for every later epoch, and a re-run of the
   epoch executes the recorded plan again (every command a retry), never a new one.
2. `EpochSettled` (version 2): the outcome once the plan's commands are handled: what each
   charge actually drew from escrow (an exhausted escrow draws less), and the payout
   batch: per provider (operator address) the cumulative amount it may claim on chain (its
   provider_earnings credits in the ledger, all epochs so far), the Merkle root over them
   (`ledger.merkle.PayoutTree`, OpenZeppelin's StandardMerkleTree layout that the
   PayoutDistributor contract checks) and the amount new in this epoch.
3. `PayoutRootPosted` (version 3): the root was posted on chain (transaction hash).

Everything a provider needs to claim comes from the log alone: `SettlementLog.proof(epoch,
address)` rebuilds the epoch's tree from its `EpochSettled` entries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.postgres import PostgresDatastore

from ledger.market.store import MarketEvent, MarketplaceApplication
from ledger.merkle import PayoutTree, normalize_account
from ledger.model import LedgerState
from ledger.queries import state_as_of
from ledger.store import LedgerApplication

SETTLEMENT_APPLICATION_NAME = "settlement"
SETTLEMENT_EVENTS_TABLE_NAME = "settlement_events"
SETTLEMENT_NAMESPACE = UUID("5b0e1a0c-2f52-4f0e-8a43-3c2b7d1e9f61")
"""Namespace of settlement stream ids and command ids. Never change."""


def epoch_stream_id(epoch: int) -> UUID:
    return uuid5(SETTLEMENT_NAMESPACE, f"epoch:{epoch}")


@dataclass(frozen=True, slots=True)
class PlannedCharge:
    """One lease's usage settled in the epoch (`domain.settlement.LeaseCharge`)."""

    lease_id: UUID
    provider_id: UUID
    consumer_id: UUID
    amount: int
    withheld: int
    fee: int
    provider_share: int
    sequences: tuple[int, ...]
    billable_s: int
    failed_windows: tuple[datetime, ...] = ()
    """Starts of the failed verdict windows (of the lease's node) the withheld part lies in."""


@dataclass(frozen=True, slots=True)
class PlannedReward:
    checker_id: UUID
    agreed_verdicts: int
    amount: int


@dataclass(frozen=True, slots=True)
class EpochPlanned:
    """Fact: the epoch's settlement decided (see the module docstring)."""

    epoch: int
    epoch_start: datetime
    epoch_end: datetime
    charges: tuple[PlannedCharge, ...]
    rewards: tuple[PlannedReward, ...]
    releases: tuple[UUID, ...]
    """Closed leases whose unused escrow this settlement releases (after their charge)."""
    unknown_lease_usage: int
    """Usage records of leases the marketplace does not know: left unsettled."""
    charged: int
    withheld: int
    fee: int
    provider_share: int
    reward_pool: int
    checker_rewards_total: int
    treasury_net: int
    planned_at: datetime


@dataclass(frozen=True, slots=True)
class ChargeOutcome:
    lease_id: UUID
    drawn: int
    """What the escrow covered of the planned amount."""
    uncovered: int


@dataclass(frozen=True, slots=True)
class PayoutEntry:
    provider_id: UUID
    address: str
    """The provider's operator address (checksummed), the leaf's account."""
    cumulative: int
    """Everything credited to the provider's earnings so far: what it may have claimed in
    all once this root is posted."""


@dataclass(frozen=True, slots=True)
class EpochSettled:
    """Fact: the plan's commands are handled; the payout batch of the epoch."""

    epoch: int
    outcomes: tuple[ChargeOutcome, ...]
    drawn: int
    uncovered: int
    payouts: tuple[PayoutEntry, ...]
    payout_root: str
    """0x-hex Merkle root of (address, cumulative); "" when no provider has earned yet."""
    payout_total: int
    """Sum of the entries' cumulative amounts."""
    payout_new: int
    """payout_total minus the previous epoch's: what the distributor must be funded with."""
    settled_at: datetime
    rewards: tuple[PlannedReward, ...] = ()
    """The rewards paid: shares of the pool of the fees actually drawn (the plan's rewards
    are the most they can be, when every charge is covered)."""
    ledger_position: int = 0
    """The ledger log's last position when the payouts were read: the ledger as of the
    settlement is its log up to here (0: not recorded; then `settled_at` stands in)."""


def ledger_at_settlement(app: LedgerApplication, shard: int, settled: EpochSettled) -> LedgerState:
    """The ledger shard's state as the epoch's settlement saw it (by log position; by time
    for an outcome recorded before positions were)."""
    if settled.ledger_position:
        return state_as_of(app, shard=shard, position=settled.ledger_position)
    return state_as_of(app, shard=shard, at=settled.settled_at)


@dataclass(frozen=True, slots=True)
class PayoutRootPosted:
    """Fact: the epoch's payout root is on chain."""

    epoch: int
    payout_root: str
    funded: int
    transaction: str
    posted_at: datetime


SettlementFact = EpochPlanned | EpochSettled | PayoutRootPosted


class SettlementApplication(MarketplaceApplication):
    """Settlement's bounded context: table `settlement_events`, on the ledger's datastore."""

    name = SETTLEMENT_APPLICATION_NAME
    events_table_name = SETTLEMENT_EVENTS_TABLE_NAME

    def __init__(self, datastore: PostgresDatastore, env: Mapping[str, str] | None = None) -> None:
        super().__init__(datastore, env)


@dataclass
class EpochRecord:
    """What the log holds of one epoch."""

    plan: EpochPlanned
    settled: EpochSettled | None = None
    posted: PayoutRootPosted | None = None

    @property
    def version(self) -> int:
        return 1 + (self.settled is not None) + (self.posted is not None)


class SettlementLog:
    """Reads and appends settlement facts; holds every epoch read so far, by number."""

    def __init__(self, app: SettlementApplication) -> None:
        self.app = app
        self.epochs: dict[int, EpochRecord] = {}
        self.position = 0

    def refresh(self) -> None:
        """Read what was appended since the last read."""
        for position, event in self.app.read(after=self.position):
            self._apply(event.fact)
            self.position = position

    def _apply(self, fact: Any) -> None:
        if isinstance(fact, EpochPlanned):
            self.epochs[fact.epoch] = EpochRecord(fact)
        elif isinstance(fact, EpochSettled):
            self.epochs[fact.epoch].settled = fact
        elif isinstance(fact, PayoutRootPosted):
            self.epochs[fact.epoch].posted = fact
        else:
            raise TypeError(f"not a settlement fact: {type(fact).__name__}")

    def append(self, fact: SettlementFact, version: int, at: datetime) -> None:
        """Append `fact` as version `version` of its epoch's stream (the store refuses a
        version written before: `eventsourcing.persistence.IntegrityError`)."""
        event = MarketEvent(epoch_stream_id(fact.epoch), version, at, fact)
        self.app.app_recorder.insert_events([self.app.market_mapper.to_stored_event(event)])
        self.refresh()

    def settled_keys(self) -> set[tuple[UUID, int]]:
        """Every usage key an epoch's plan settled."""
        return {
            (c.lease_id, sequence)
            for record in self.epochs.values()
            for c in record.plan.charges
            for sequence in c.sequences
        }

    def last_settled(self, before: int | None = None) -> EpochSettled | None:
        """The latest epoch's outcome (below `before` when given)."""
        done = [
            r.settled
            for n, r in self.epochs.items()
            if r.settled is not None and (before is None or n < before)
        ]
        return max(done, key=lambda s: s.epoch) if done else None

    def tree(self, epoch: int) -> PayoutTree:
        """The epoch's payout tree, rebuilt from its `EpochSettled` entries."""
        settled = self._settled(epoch)
        if not settled.payouts:
            raise LookupError(f"epoch {epoch} has no payouts")
        return PayoutTree.build([(p.address, p.cumulative) for p in settled.payouts])

    def proof(self, epoch: int, address: str) -> PayoutProof:
        """What a provider passes to PayoutDistributor.claim for `epoch`."""
        tree = self.tree(epoch)
        if address not in tree:
            raise LookupError(f"{address} has no payout in epoch {epoch}")
        return PayoutProof(
            epoch=epoch,
            address=normalize_account(address),
            cumulative=tree.amount(address),
            proof=tuple("0x" + p.hex() for p in tree.proof(address)),
            root=tree.root_hex,
        )

    def _settled(self, epoch: int) -> EpochSettled:
        record = self.epochs.get(epoch)
        if record is None or record.settled is None:
            raise LookupError(f"epoch {epoch} is not settled")
        return record.settled

    def __iter__(self) -> Iterator[EpochRecord]:
        return iter(self.epochs[n] for n in sorted(self.epochs))


@dataclass(frozen=True, slots=True)
class PayoutProof:
    epoch: int
    address: str
    cumulative: int
    proof: tuple[str, ...]
    """0x-hex sibling hashes, leaf to root."""
    root: str
