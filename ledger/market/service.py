"""The marketplace's application service: commands in, facts and ledger transfers out,
saved together.

Each command carries a `command_id`, its idempotency key. `Marketplace.handle(command)`:

1. reads what other processes appended since its last look (one indexed read);
2. answers a retry: the same id with the same content returns the first answer and records
   nothing; the same id with other content is `IdempotencyConflictError`;
3. loads the aggregates the command touches (kept in memory, rebuilt from the log at
   start) and decides with the pure rules of `domain` (time is the service's clock);
4. translates every fact into its ledger transfers (`domain.postings`) and opens the
   accounts they need;
5. saves everything in ONE Postgres transaction through the shard's `LedgerWriter.execute`:
   the marketplace events (table marketplace_events), a `CommandHandled` record, the
   accounts and the transfers (table ledger_events). If any transfer is refused (a
   consumer short of funds, say), nothing at all is written, and the command fails with a
   typed error. Nothing is ever half-written.

Refusals raise a `MarketError` subclass whose `code` names the rule (the domain's result
code where the domain decided). A refused command records nothing; a retry of it is decided
again.

Streams (aggregate ids) in marketplace_events: a provider (its registration and nodes); its
stake (`stake_stream_id`); one order book per GPU model (`book_stream_id`); a lease (its
facts and the refunds paid to its consumer); a deposit; a checker (registration and
penalties); a node's verdicts (`verdict_stream_id`: verdicts, window decisions,
contradictions); a command (`CommandHandled`).

Concurrency: one service per ledger shard writes; commands are handled one at a time (a
lock). A second process appending to the same streams is detected by the events table's
unique (stream, version) key: the command fails with `ConcurrentUpdateError` (nothing
written, safe to retry) and this service reloads the log.

Ticks (`Tick`): time-driven rules run when the clock is advanced by a tick: asks expire,
overdue heartbeats become downtime, leases whose time or escrow grace ran out close, and
node-windows whose verdict grace ended are decided; a failed window slashes the provider,
refunds the affected consumers out of the slash, penalises the contradicted checkers and,
for fraud or under-spec, closes the node's leases (sla_breach). See `domain.slashing`.
Unbonding cannot escape a slash: an unbonding entry answers for offences committed before
its waiting period ends, so `CompleteUnbond` is refused until the verdict window containing
the entry's `available_at` is past its grace (no verdict for it or any earlier window can
still arrive) and while a window of the provider's nodes holds verdicts and is not decided
yet (tick first).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any
from uuid import UUID, uuid5

import orjson

from domain import funds, lease, orderbook, providers, slashing, stake, verdicts
from domain.codes import AccountCode
from domain.lease import PROTOCOL_ID, CloseReason, Lease, LeaseRules, LeaseStatus
from domain.orderbook import Ask, Bid, OrderBook
from domain.postings import (
    DEFAULT_POSTING_RULES,
    MarketFact,
    PostingRules,
    account_id,
    accounts_for,
    postings_for,
)
from domain.providers import Node, Provider
from domain.slashing import SlashingRules
from domain.stake import ProviderStake, StakeRules
from domain.verdicts import VerdictRules, VerdictState
from ledger.errors import WriterStateError
from ledger.market.codec import encode
from ledger.market.store import CommandHandled, MarketEvent, MarketplaceApplication
from ledger.model import CreateTransferResult, NewAccount, NewTransfer, TransferOutcome
from ledger.writer import AtomicOutcome, LedgerWriter

log = logging.getLogger(__name__)

STREAM_NAMESPACE = UUID("5b0c7c55-7f3e-5d1e-9a51-0c7f7c1f9d11")
"""Namespace of the marketplace's derived stream ids. Never change."""
FACTS_PER_COMMAND_MAX = 4_096
"""Most facts one command may record (a tick over a large market is cut into several)."""
LEASES_PER_TICK_MAX = 1_000
"""Most leases one tick examines; the next tick goes on from there."""
WINDOWS_PER_TICK_MAX = 256
"""Most node-windows one tick decides."""

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def stake_stream_id(provider_id: UUID) -> UUID:
    return uuid5(STREAM_NAMESPACE, f"stake:{provider_id}")


def book_stream_id(gpu_model: str) -> UUID:
    return uuid5(STREAM_NAMESPACE, f"book:{gpu_model}")


def verdict_stream_id(node_id: UUID) -> UUID:
    return uuid5(STREAM_NAMESPACE, f"verdicts:{node_id}")


def payout_stream_id(provider_id: UUID) -> UUID:
    return uuid5(STREAM_NAMESPACE, f"payouts:{provider_id}")


def reward_stream_id(checker_id: UUID) -> UUID:
    return uuid5(STREAM_NAMESPACE, f"rewards:{checker_id}")


# -- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarketRules:
    """Every number of the marketplace, as configuration (defaults: the demo's)."""

    stake: StakeRules = field(default_factory=StakeRules)
    lease: LeaseRules = field(default_factory=LeaseRules)
    verdicts: VerdictRules = field(default_factory=VerdictRules)
    slashing: SlashingRules = field(default_factory=SlashingRules)
    postings: PostingRules = DEFAULT_POSTING_RULES
    bid_escrow_min: int = 1
    """Least escrow a bid may bring, in the token's smallest unit (>= 1)."""

    def __post_init__(self) -> None:
        if type(self.bid_escrow_min) is not int or self.bid_escrow_min < 1:
            raise ValueError("bid_escrow_min must be an int >= 1")


# -- errors ---------------------------------------------------------------------------------


class MarketError(Exception):
    """A command was refused; nothing was recorded. `code` names the rule."""

    code: str = "refused"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class IdempotencyConflictError(MarketError):
    code = "command_exists_with_different_content"


class UnknownProviderError(MarketError):
    code = "provider_not_found"


class UnknownNodeError(MarketError):
    code = "node_not_found"


class UnknownLeaseError(MarketError):
    code = "lease_not_found"


class UnknownOrderError(MarketError):
    code = "order_not_found"


class UnknownCheckerError(MarketError):
    code = "verdict_from_unregistered_checker"


class InsufficientStakeError(MarketError):
    code = "stake_below_required"


class InsufficientFundsError(MarketError):
    code = "insufficient_funds"


class BidBelowMinimumError(MarketError):
    code = "bid_below_minimum"


class LeaseClosedError(MarketError):
    code = "lease_already_closed"


class NotPermittedError(MarketError):
    code = "not_permitted"


class UnbondBlockedError(MarketError):
    code = "unbond_blocked_by_undecided_window"


class ConcurrentUpdateError(MarketError):
    """Another process appended to the same streams first; nothing of this command was
    written and the service has reloaded the log: retry the command."""

    code = "concurrent_update"


class RuleRefusedError(MarketError):
    """The domain refused with `result` (its result code, e.g. PlaceOrderResult.book_full)."""

    def __init__(self, result: IntEnum, message: str) -> None:
        super().__init__(f"{message}: {result.name}", code=result.name)
        self.result = result


class LedgerRefusedError(MarketError):
    """The ledger refused a transfer the rules had allowed (a bug, or another ledger client
    spent funds between the check and the commit)."""

    def __init__(self, outcome: Any) -> None:
        name = outcome.result.name if isinstance(outcome, TransferOutcome) else outcome.name
        super().__init__(f"the ledger refused the command's postings: {name}", code=name)
        self.outcome = outcome


# -- commands -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterProvider:
    command_id: UUID
    provider_id: UUID
    operator_address: str
    nodes: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class ListNode:
    command_id: UUID
    provider_id: UUID
    node: Node


@dataclass(frozen=True, slots=True)
class DelistNode:
    command_id: UUID
    provider_id: UUID
    node_id: UUID


@dataclass(frozen=True, slots=True)
class DeregisterProvider:
    command_id: UUID
    provider_id: UUID


@dataclass(frozen=True, slots=True)
class BondStake:
    command_id: UUID
    provider_id: UUID
    amount: int


@dataclass(frozen=True, slots=True)
class RequestUnbond:
    command_id: UUID
    provider_id: UUID
    amount: int


@dataclass(frozen=True, slots=True)
class CompleteUnbond:
    """Release every unbonding entry of the provider whose waiting period is over."""

    command_id: UUID
    provider_id: UUID


@dataclass(frozen=True, slots=True)
class ConfirmDeposit:
    command_id: UUID
    deposit_id: UUID
    consumer_id: UUID
    amount: int
    reference: str


@dataclass(frozen=True, slots=True)
class PlaceAsk:
    command_id: UUID
    ask: Ask


@dataclass(frozen=True, slots=True)
class PlaceBid:
    """Place a bid; its escrow is taken from the consumer's available funds at once."""

    command_id: UUID
    bid: Bid


@dataclass(frozen=True, slots=True)
class CancelAsk:
    command_id: UUID
    ask_id: UUID
    provider_id: UUID


@dataclass(frozen=True, slots=True)
class CancelBid:
    command_id: UUID
    bid_id: UUID
    consumer_id: UUID


@dataclass(frozen=True, slots=True)
class TopUpEscrow:
    command_id: UUID
    lease_id: UUID
    consumer_id: UUID
    amount: int


@dataclass(frozen=True, slots=True)
class RecordHeartbeat:
    command_id: UUID
    lease_id: UUID
    node_id: UUID
    sequence: int
    at: datetime


@dataclass(frozen=True, slots=True)
class ChargeUsage:
    command_id: UUID
    lease_id: UUID
    amount: int
    usage_ref: str
    withheld: int = 0
    """Of amount: not the provider's (usage inside failed windows; see UsageCharged)."""


@dataclass(frozen=True, slots=True)
class ReleaseEscrow:
    """Settlement charged a closed lease's last usage: release its unused escrow."""

    command_id: UUID
    lease_id: UUID


@dataclass(frozen=True, slots=True)
class RewardChecker:
    command_id: UUID
    checker_id: UUID
    epoch_start: datetime
    agreed_verdicts: int
    amount: int


@dataclass(frozen=True, slots=True)
class RecordPayoutClaim:
    """A claim paid on chain by the payout distributor (from the chain watcher)."""

    command_id: UUID
    provider_id: UUID
    epoch: int
    cumulative: int
    amount: int
    reference: str


@dataclass(frozen=True, slots=True)
class CloseLease:
    command_id: UUID
    lease_id: UUID
    reason: CloseReason
    by: UUID


@dataclass(frozen=True, slots=True)
class RegisterChecker:
    command_id: UUID
    checker_id: UUID
    operator_address: str
    stake_amount: int


@dataclass(frozen=True, slots=True)
class SubmitVerdict:
    command_id: UUID
    verdict: verdicts.Verdict


@dataclass(frozen=True, slots=True)
class Tick:
    """Run the time-driven rules at the service's clock (see the module docstring)."""

    command_id: UUID


Command = (
    RegisterProvider
    | ListNode
    | DelistNode
    | DeregisterProvider
    | BondStake
    | RequestUnbond
    | CompleteUnbond
    | ConfirmDeposit
    | PlaceAsk
    | PlaceBid
    | CancelAsk
    | CancelBid
    | TopUpEscrow
    | RecordHeartbeat
    | ChargeUsage
    | ReleaseEscrow
    | RewardChecker
    | RecordPayoutClaim
    | CloseLease
    | RegisterChecker
    | SubmitVerdict
    | Tick
)


def command_digest(command: Command) -> str:
    """sha256 of the command's kind and canonical JSON content (without its id)."""
    state = encode(command)
    state.pop("command_id")
    payload = orjson.dumps([type(command).__name__, state], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True, slots=True)
class Handled:
    """The answer to a command."""

    command_id: UUID
    kind: str
    facts: tuple[Any, ...]
    """The facts recorded, in order (empty for a retry: see `facts_count`)."""
    facts_count: int
    lease_ids: tuple[UUID, ...]
    """Leases the command opened."""
    retried: bool
    """True when this answers a retry of a command handled before."""


# -- state ----------------------------------------------------------------------------------


@dataclass
class MarketState:
    """Everything the rules need, folded from the log. Mutated only by `apply`."""

    providers: MutableMapping[UUID, Provider] = field(default_factory=dict)
    stakes: MutableMapping[UUID, ProviderStake] = field(default_factory=dict)
    books: dict[str, OrderBook] = field(default_factory=dict)
    leases: MutableMapping[UUID, Lease] = field(default_factory=dict)
    verdicts: VerdictState = field(default_factory=VerdictState)
    deposits: MutableMapping[UUID, funds.DepositConfirmed] = field(default_factory=dict)
    rewards: MutableMapping[tuple[UUID, datetime], funds.CheckerRewarded] = field(
        default_factory=dict
    )
    payout_claims: MutableMapping[str, funds.PayoutClaimed] = field(default_factory=dict)
    """By chain reference."""
    claimed: MutableMapping[UUID, int] = field(default_factory=dict)
    """Provider -> what its claims paid in all."""
    checker_stake_left: MutableMapping[UUID, int] = field(default_factory=dict)
    refunds: list[slashing.ConsumerRefunded] = field(default_factory=list)
    commands: MutableMapping[UUID, CommandHandled] = field(default_factory=dict)
    versions: MutableMapping[UUID, int] = field(default_factory=dict)
    node_provider: MutableMapping[UUID, UUID] = field(default_factory=dict)
    node_keys: MutableMapping[str, UUID] = field(default_factory=dict)
    """Node signing key -> the provider that listed it (keys are unique across providers)."""
    operator_addresses: MutableMapping[str, UUID] = field(default_factory=dict)
    """Operator address (lower case) -> the provider registered with it."""
    leases_by_node: MutableMapping[UUID, tuple[UUID, ...]] = field(default_factory=dict)
    order_models: MutableMapping[UUID, str] = field(default_factory=dict)
    """Order (ask or bid) id -> the GPU model of its book."""
    position: int = 0
    """Notification id of the last marketplace event applied."""

    def stake_of(self, provider_id: UUID) -> ProviderStake:
        return self.stakes.get(provider_id) or ProviderStake(provider_id)

    def book(self, gpu_model: str) -> OrderBook:
        return self.books.get(gpu_model) or OrderBook(gpu_model)

    def apply(self, stream_id: UUID, version: int, fact: Any) -> None:
        """Fold one fact (decided by the service, or read back from the log)."""
        self.versions[stream_id] = version
        if isinstance(fact, providers.Fact):
            provider = providers.apply(self.providers.get(fact.provider_id), fact)
            self.providers[fact.provider_id] = provider
            self.operator_addresses[provider.operator_address.lower()] = provider.provider_id
            for node in provider.nodes:
                self.node_provider[node.node_id] = provider.provider_id
                self.node_keys[node.public_key] = provider.provider_id
        elif isinstance(fact, stake.Fact):
            self.stakes[fact.provider_id] = stake.apply(self.stake_of(fact.provider_id), fact)
        elif isinstance(fact, orderbook.OrderBookFact):
            model = _book_model(fact, self.order_models)
            book = self.books.setdefault(model, OrderBook(model))
            book.apply(fact)
            if isinstance(fact, orderbook.AskPlaced):
                self.order_models[fact.ask.id] = model
            elif isinstance(fact, orderbook.BidPlaced):
                self.order_models[fact.bid.id] = model
        elif isinstance(fact, lease.LeaseFact):
            updated = lease.apply(self.leases.get(fact.lease_id), fact)
            if fact.lease_id not in self.leases:
                # Replaced, never appended to: a staged view must not change the base's.
                known = self.leases_by_node.get(updated.node_id, ())
                self.leases_by_node[updated.node_id] = (*known, updated.id)
            self.leases[fact.lease_id] = updated
        elif isinstance(fact, verdicts.Fact):
            self.verdicts = verdicts.apply(self.verdicts, fact)
            if isinstance(fact, verdicts.CheckerRegistered):
                self.checker_stake_left[fact.checker_id] = fact.stake_amount
        elif isinstance(fact, slashing.CheckerPenalized):
            self.checker_stake_left[fact.checker_id] -= fact.amount
        elif isinstance(fact, slashing.ConsumerRefunded):
            self.refunds.append(fact)
        elif isinstance(fact, funds.DepositConfirmed):
            self.deposits[fact.deposit_id] = fact
        elif isinstance(fact, funds.CheckerRewarded):
            self.rewards[(fact.checker_id, fact.epoch_start)] = fact
        elif isinstance(fact, funds.PayoutClaimed):
            self.payout_claims[fact.reference] = fact
            self.claimed[fact.provider_id] = self.claimed.get(fact.provider_id, 0) + fact.amount
        elif isinstance(fact, CommandHandled):
            self.commands[fact.command_id] = fact
        else:
            raise TypeError(f"not a marketplace fact: {type(fact).__name__}")

    def undecided_windows(self) -> list[tuple[UUID, datetime]]:
        """Node-windows that hold verdicts and are not decided, oldest first."""
        keys = [k for k in self.verdicts.windows if k not in self.verdicts.decisions]
        return sorted(keys, key=lambda k: (k[1], str(k[0])))


def _book_model(fact: orderbook.OrderBookFact, order_models: Mapping[UUID, str]) -> str:
    if isinstance(fact, orderbook.AskPlaced):
        return fact.ask.gpu_model
    if isinstance(fact, orderbook.BidPlaced):
        return fact.bid.gpu_model
    if isinstance(fact, orderbook.OrderMatched):
        return fact.gpu_model
    if isinstance(fact, orderbook.AskExpired | orderbook.AskCancelled):
        return order_models[fact.ask_id]
    return order_models[fact.bid_id]


class _Work:
    """One command's unit of work: a staged view over the state, the facts recorded, their
    ledger postings and the accounts those need. Applied to the state only after commit."""

    def __init__(
        self, state: MarketState, command_id: UUID, now: datetime, rules: MarketRules
    ) -> None:
        self.base = state
        self.command_id = command_id
        self.now = now
        self.rules = rules
        # A staged view: every mapping is an overlay (ChainMap) whose writes stay in the
        # overlay and whose reads fall through to the live state, so staging a command
        # costs what it touches, not the size of the market, and leaves the live state as
        # it was until commit. The aggregates are immutable values, replaced on change;
        # order books are copied on first touch (their decisions mutate them).
        self.staged = MarketState(
            providers=ChainMap({}, state.providers),
            stakes=ChainMap({}, state.stakes),
            books={},
            leases=ChainMap({}, state.leases),
            verdicts=state.verdicts,
            deposits=ChainMap({}, state.deposits),
            rewards=ChainMap({}, state.rewards),
            payout_claims=ChainMap({}, state.payout_claims),
            claimed=ChainMap({}, state.claimed),
            checker_stake_left=ChainMap({}, state.checker_stake_left),
            refunds=[],
            commands={},
            versions=ChainMap({}, state.versions),
            node_provider=ChainMap({}, state.node_provider),
            node_keys=ChainMap({}, state.node_keys),
            operator_addresses=ChainMap({}, state.operator_addresses),
            leases_by_node=ChainMap({}, state.leases_by_node),
            order_models=ChainMap({}, state.order_models),
        )
        self.facts: list[tuple[UUID, int, Any]] = []
        self.transfers: list[NewTransfer] = []
        self.accounts: list[NewAccount] = []
        self.lease_ids: list[UUID] = []

    def book(self, gpu_model: str) -> OrderBook:
        """The staged book of a model (a copy of the live one; decisions mutate it)."""
        book = self.staged.books.get(gpu_model)
        if book is None:
            live = self.base.books.get(gpu_model)
            book = copy.deepcopy(live) if live is not None else OrderBook(gpu_model)
            self.staged.books[gpu_model] = book
        return book

    def version(self, stream_id: UUID) -> int:
        return self.staged.versions.get(stream_id, 0)

    def record(self, stream_id: UUID, fact: Any, *, book_applied: bool = False) -> None:
        """Record a fact in a stream: stage it and translate it into ledger postings.
        `book_applied`: an order book fact its (staged) book already applied."""
        if len(self.facts) >= FACTS_PER_COMMAND_MAX:
            raise MarketError(
                f"a command may record at most {FACTS_PER_COMMAND_MAX} facts",
                code="facts_per_command_exceed_max",
            )
        version = self.version(stream_id) + 1
        self.facts.append((stream_id, version, fact))
        if isinstance(fact, orderbook.OrderBookFact):
            assert book_applied, "order book facts come from a staged book's decision"
            self.staged.versions[stream_id] = version
            if isinstance(fact, orderbook.AskPlaced):
                self.staged.order_models[fact.ask.id] = fact.ask.gpu_model
            elif isinstance(fact, orderbook.BidPlaced):
                self.staged.order_models[fact.bid.id] = fact.bid.gpu_model
        else:
            self.staged.apply(stream_id, version, fact)
        if not isinstance(fact, CommandHandled):
            self._post(stream_id, version, fact)

    def _post(self, stream_id: UUID, version: int, fact: MarketFact) -> None:
        rules = self.rules.postings
        parties: Any = None
        consumer_id: UUID | None = None
        if isinstance(
            fact,
            lease.EscrowToppedUp | lease.UsageCharged | lease.LeaseClosed | lease.EscrowReleased,
        ):
            parties = self.staged.leases[fact.lease_id]
        if isinstance(fact, orderbook.BidRemainderRefunded):
            standing = self.book(self.staged.order_models[fact.bid_id]).bid(fact.bid_id)
            assert standing is not None
            consumer_id = standing.bid.consumer_id
        if isinstance(fact, providers.ProviderRegistered):
            self.accounts += accounts_for(providers=[fact.provider_id], rules=rules)
        elif isinstance(fact, funds.DepositConfirmed):
            self.accounts += accounts_for(consumers=[fact.consumer_id], rules=rules)
        elif isinstance(fact, orderbook.BidPlaced):
            self.accounts += accounts_for(bids=[fact.bid.id], rules=rules)
        elif isinstance(fact, orderbook.OrderMatched):
            self.accounts += accounts_for(
                leases=[lease.lease_id_for(fact.ask_id, fact.bid_id)], rules=rules
            )
        elif isinstance(fact, verdicts.CheckerRegistered):
            self.accounts += accounts_for(checkers=[fact.checker_id], rules=rules)
        if isinstance(fact, MarketFact):
            self.transfers += postings_for(
                fact,
                key=f"{stream_id}:{version}",
                parties=parties,
                consumer_id=consumer_id,
                rules=rules,
            )


# -- the service ----------------------------------------------------------------------------


class Marketplace:
    """The marketplace's application service for one ledger shard (see the module
    docstring)."""

    def __init__(
        self,
        app: MarketplaceApplication,
        writer: LedgerWriter,
        *,
        rules: MarketRules | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.app = app
        self.writer = writer
        self.rules = rules or MarketRules()
        self.clock = clock
        self.state = MarketState()
        self._lock = threading.Lock()
        if self.rules.postings.shard != writer.shard:
            raise ValueError(
                f"posting rules name shard {self.rules.postings.shard}, "
                f"the writer writes shard {writer.shard}"
            )
        with self._lock:
            self._catch_up()
            protocol = accounts_for(protocol=True, rules=self.rules.postings)
            outcome = self.writer.execute(protocol, ())
            if not outcome.applied:
                raise LedgerRefusedError(outcome.first_failure())

    # -- reads ---------------------------------------------------------------------------

    def provider(self, provider_id: UUID) -> Provider | None:
        return self.state.providers.get(provider_id)

    def stake_of(self, provider_id: UUID) -> ProviderStake:
        return self.state.stake_of(provider_id)

    def provider_by_address(self, address: str) -> Provider | None:
        """The provider whose operator address is `address` (case-insensitive)."""
        provider_id = self.state.operator_addresses.get(address.lower())
        return None if provider_id is None else self.state.providers.get(provider_id)

    def lease(self, lease_id: UUID) -> Lease | None:
        return self.state.leases.get(lease_id)

    def book(self, gpu_model: str) -> OrderBook:
        return self.state.book(gpu_model)

    def available(self, consumer_id: UUID) -> int:
        """The consumer's available funds in the ledger (0 without an account)."""
        account = self.writer.account(account_id(AccountCode.consumer_available, consumer_id))
        return 0 if account is None else account.available

    def refresh(self) -> None:
        """Read what other processes appended to the marketplace log since our last look."""
        with self._lock:
            self._catch_up()

    # -- commands ------------------------------------------------------------------------

    def handle(self, command: Command) -> Handled:
        """Decide and save one command (see the module docstring); raises MarketError."""
        digest = command_digest(command)
        kind = type(command).__name__
        with self._lock:
            self._catch_up()
            seen = self.state.commands.get(command.command_id)
            if seen is not None:
                if seen.digest != digest or seen.kind != kind:
                    raise IdempotencyConflictError(
                        f"command {command.command_id} was handled before with other "
                        f"content (a {seen.kind})"
                    )
                return Handled(
                    seen.command_id, kind, (), seen.facts_count, seen.lease_ids, retried=True
                )
            now = self.clock()
            work = _Work(self.state, command.command_id, now, self.rules)
            self._decide(work, command)
            facts_count = len(work.facts)
            work.record(
                command.command_id,
                CommandHandled(
                    command.command_id, kind, digest, facts_count, tuple(work.lease_ids), now
                ),
            )
            self._save(work)
            return Handled(
                command.command_id,
                kind,
                tuple(f for _, _, f in work.facts[:facts_count]),
                facts_count,
                tuple(work.lease_ids),
                retried=False,
            )

    def _save(self, work: _Work) -> None:
        mapper = self.app.market_mapper
        stored = [
            mapper.to_stored_event(MarketEvent(stream, version, work.now, fact))
            for stream, version, fact in work.facts
        ]
        try:
            outcome = self.writer.execute(
                _unique_accounts(work.accounts),
                work.transfers,
                events=stored,
                events_recorder=self.app.app_recorder,
            )
        except WriterStateError as e:
            # Another process appended to our streams first (the events table's unique
            # (stream, version) key refused ours): nothing was written; read the log again.
            self.state = MarketState()
            self._catch_up()
            raise ConcurrentUpdateError(
                f"command {work.command_id}: another process changed the same aggregates "
                "first; nothing was written, retry the command"
            ) from e
        except Exception:
            # Whatever failed, read the log again before the next command.
            self.state = MarketState()
            self._catch_up()
            raise
        if not outcome.applied:
            raise self._ledger_refusal(work, outcome)
        for stream, version, fact in work.facts:
            self.state.apply(stream, version, fact)
        for model, book in work.staged.books.items():
            self.state.books[model] = book  # the staged copy already holds its facts

    def _ledger_refusal(self, work: _Work, outcome: AtomicOutcome) -> MarketError:
        failure = outcome.first_failure()
        if isinstance(failure, TransferOutcome) and failure.result in (
            CreateTransferResult.exceeds_credits,
            CreateTransferResult.debit_account_not_found,
        ):
            transfer = next(t for t in work.transfers if t.id == failure.id)
            account = self.writer.account(transfer.debit_account_id)
            available = 0 if account is None else account.available
            return InsufficientFundsError(
                f"account {transfer.debit_account_id} has {available} available, "
                f"{transfer.amount} needed"
            )
        return LedgerRefusedError(failure)

    def _head_position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def _catch_up(self) -> None:
        """Apply what the log holds after our position and we have not applied yet (our
        own commits are applied at commit and skipped here by their stream version)."""
        if self._head_position() <= self.state.position:
            return
        for position, event in self.app.read(after=self.state.position):
            stream, version = event.originator_id, event.originator_version
            if version > self.state.versions.get(stream, 0):
                assert version == self.state.versions.get(stream, 0) + 1, (stream, version)
                self.state.apply(stream, version, event.fact)
            self.state.position = position

    # -- decisions -----------------------------------------------------------------------

    def _decide(self, work: _Work, c: Command) -> None:
        result: IntEnum
        facts: Sequence[Any]
        f: Any
        if isinstance(c, RegisterProvider):
            result, facts = providers.register(
                work.staged.providers.get(c.provider_id),
                c.provider_id,
                c.operator_address,
                c.nodes,
                work.now,
            )
            _require_ok(result, f"provider {c.provider_id} not registered")
            self._check_keys_unused(work, c.provider_id, c.nodes)
            for f in facts:
                work.record(c.provider_id, f)
        elif isinstance(c, ListNode):
            provider = self._provider(work, c.provider_id)
            self._check_keys_unused(work, c.provider_id, (c.node,))
            result, facts = providers.list_node(provider, c.node, work.now)
            _require_ok(result, f"node {c.node.node_id} not listed")
            for f in facts:
                work.record(c.provider_id, f)
        elif isinstance(c, DelistNode):
            provider = self._provider(work, c.provider_id)
            result, facts = providers.delist_node(provider, c.node_id, work.now)
            if result is providers.DelistNodeResult.node_not_found:
                raise UnknownNodeError(f"provider {c.provider_id} has no node {c.node_id}")
            _require_ok(result, f"node {c.node_id} not delisted")
            for f in facts:
                work.record(c.provider_id, f)
        elif isinstance(c, DeregisterProvider):
            provider = self._provider(work, c.provider_id)
            result, facts = providers.deregister(provider, work.now)
            _require_ok(result, f"provider {c.provider_id} not deregistered")
            for f in facts:
                work.record(c.provider_id, f)
        elif isinstance(c, BondStake):
            self._provider(work, c.provider_id)
            result, facts = stake.bond(work.staged.stake_of(c.provider_id), c.amount, work.now)
            _require_ok(result, f"stake of {c.provider_id} not bonded")
            for f in facts:
                work.record(stake_stream_id(c.provider_id), f)
        elif isinstance(c, RequestUnbond):
            provider = self._provider(work, c.provider_id)
            result, facts = stake.request_unbond(
                work.staged.stake_of(c.provider_id),
                c.amount,
                provider.listed_nodes(),
                self.rules.stake,
                work.now,
            )
            _require_ok(result, f"unbond of {c.provider_id} refused")
            for f in facts:
                work.record(stake_stream_id(c.provider_id), f)
        elif isinstance(c, CompleteUnbond):
            self._provider(work, c.provider_id)
            pending = [
                key
                for key in work.staged.undecided_windows()
                if work.staged.node_provider.get(key[0]) == c.provider_id
            ]
            if pending:
                node_id, window_start = pending[0]
                raise UnbondBlockedError(
                    f"provider {c.provider_id}: the window {window_start.isoformat()} of node "
                    f"{node_id} holds verdicts and is not decided yet (a slash for it may "
                    "still take unbonding stake); tick after its grace, then complete"
                )
            self._check_unbond_final(work, c.provider_id)
            result, facts = stake.complete_unbond(work.staged.stake_of(c.provider_id), work.now)
            _require_ok(result, f"unbond of {c.provider_id} not completed")
            for f in facts:
                work.record(stake_stream_id(c.provider_id), f)
        elif isinstance(c, ConfirmDeposit):
            result, deposits = funds.confirm_deposit(
                work.staged.deposits, c.deposit_id, c.consumer_id, c.amount, c.reference, work.now
            )
            _require_ok(result, f"deposit {c.deposit_id} refused")
            for f in deposits:
                work.record(c.deposit_id, f)
        elif isinstance(c, PlaceAsk):
            self._place_ask(work, c.ask)
        elif isinstance(c, PlaceBid):
            self._place_bid(work, c.bid)
        elif isinstance(c, CancelAsk | CancelBid):
            self._cancel(work, c)
        elif isinstance(c, TopUpEscrow):
            current = self._lease(work, c.lease_id)
            if c.consumer_id != current.consumer_id:
                raise NotPermittedError(
                    f"lease {c.lease_id} belongs to another consumer: only it may top up"
                )
            result, facts = lease.top_up(current, c.amount, work.now)
            _require_lease_ok(result, f"top-up of lease {c.lease_id} refused")
            for f in facts:
                work.record(c.lease_id, f)
        elif isinstance(c, RecordHeartbeat):
            current = self._lease(work, c.lease_id)
            result, facts = lease.record_heartbeat(
                current, c.node_id, c.sequence, c.at, work.now, self.rules.lease
            )
            _require_lease_ok(result, f"heartbeat of lease {c.lease_id} refused")
            for f in facts:
                work.record(c.lease_id, f)
        elif isinstance(c, ChargeUsage):
            current = self._lease(work, c.lease_id)
            result, facts = lease.charge_usage(
                current, c.amount, c.usage_ref, work.now, self.rules.lease, c.withheld
            )
            if result is not lease.ChargeUsageResult.escrow_exhausted:
                _require_lease_ok(result, f"usage of lease {c.lease_id} refused")
            for f in facts:
                work.record(c.lease_id, f)
        elif isinstance(c, ReleaseEscrow):
            current = self._lease(work, c.lease_id)
            result, facts = lease.release_escrow(current, work.now)
            _require_lease_ok(result, f"escrow of lease {c.lease_id} not released")
            for f in facts:
                work.record(c.lease_id, f)
        elif isinstance(c, RewardChecker):
            if c.checker_id not in work.staged.verdicts.checkers:
                raise UnknownCheckerError(f"checker {c.checker_id} is not registered")
            result, rewarded = funds.reward_checker(
                work.staged.rewards,
                c.checker_id,
                c.epoch_start,
                c.agreed_verdicts,
                c.amount,
                work.now,
            )
            _require_ok(result, f"reward of checker {c.checker_id} refused")
            for f in rewarded:
                work.record(reward_stream_id(c.checker_id), f)
        elif isinstance(c, RecordPayoutClaim):
            self._provider(work, c.provider_id)
            result, claims = funds.claim_payout(
                work.staged.payout_claims,
                work.staged.claimed.get(c.provider_id, 0),
                c.provider_id,
                c.epoch,
                c.cumulative,
                c.amount,
                c.reference,
                work.now,
            )
            _require_ok(result, f"payout claim {c.reference} refused")
            for f in claims:
                work.record(payout_stream_id(c.provider_id), f)
        elif isinstance(c, CloseLease):
            current = self._lease(work, c.lease_id)
            result, facts = lease.close(current, c.reason, c.by, work.now, self.rules.lease)
            _require_lease_ok(result, f"close of lease {c.lease_id} refused")
            for f in facts:
                work.record(c.lease_id, f)
        elif isinstance(c, RegisterChecker):
            result, facts = verdicts.register_checker(
                work.staged.verdicts,
                verdicts.RegisterChecker(c.checker_id, c.operator_address, c.stake_amount),
                self.rules.verdicts,
                work.now,
            )
            _require_ok(result, f"checker {c.checker_id} not registered")
            for f in facts:
                work.record(c.checker_id, f)
        elif isinstance(c, SubmitVerdict):
            v = c.verdict
            if v.checker_id not in work.staged.verdicts.checkers:
                raise UnknownCheckerError(f"checker {v.checker_id} is not registered")
            if work.staged.node_provider.get(v.node_id) != v.provider_id:
                raise UnknownNodeError(f"provider {v.provider_id} has no node {v.node_id}")
            result, facts = verdicts.submit_verdict(
                work.staged.verdicts, v, self.rules.verdicts, work.now
            )
            _require_ok(result, f"verdict {v.verdict_id} refused")
            for f in facts:
                work.record(verdict_stream_id(v.node_id), f)
        elif isinstance(c, Tick):
            self._tick(work)
        else:
            raise TypeError(f"not a marketplace command: {type(c).__name__}")

    def _check_unbond_final(self, work: _Work, provider_id: UUID) -> None:
        """An unbonding entry answers for offences committed before its waiting period ends
        (`available_at`). It is paid out only once the window containing `available_at`
        (and so every window before it) can no longer take verdicts: its grace is over."""
        rules = self.rules.verdicts
        grace = timedelta(seconds=rules.verdict_grace_s)
        for entry in work.staged.stake_of(provider_id).unbonding:
            if entry.available_at > work.now:
                continue
            window = verdicts.window_containing(entry.available_at, rules)
            final_at = verdicts.window_end_of(window, rules) + grace
            if work.now < final_at:
                raise UnbondBlockedError(
                    f"provider {provider_id}: unbond {entry.unbond_id} ended its waiting "
                    f"period at {entry.available_at.isoformat()}, inside the verdict window "
                    f"{window.isoformat()}, which takes verdicts until {final_at.isoformat()} "
                    "(a slash for it may still take this stake); complete after that"
                )

    def _provider(self, work: _Work, provider_id: UUID) -> Provider:
        provider = work.staged.providers.get(provider_id)
        if provider is None:
            raise UnknownProviderError(f"provider {provider_id} is not registered")
        return provider

    def _lease(self, work: _Work, lease_id: UUID) -> Lease:
        found = work.staged.leases.get(lease_id)
        if found is None:
            raise UnknownLeaseError(f"lease {lease_id} does not exist")
        return found

    def _check_keys_unused(self, work: _Work, provider_id: UUID, nodes: Iterable[Node]) -> None:
        """A node's signing key names the node everywhere: unique across providers."""
        for node in nodes:
            for owner in (
                work.staged.node_keys.get(node.public_key),
                work.staged.node_provider.get(node.node_id),
            ):
                if owner is not None and owner != provider_id:
                    raise RuleRefusedError(
                        providers.ListNodeResult.public_key_in_use,
                        f"node {node.node_id}: id or key used by provider {owner}",
                    )

    def _place_ask(self, work: _Work, ask: Ask) -> None:
        provider = self._provider(work, ask.provider_id)
        if provider.deregistered_at is not None:
            raise NotPermittedError(f"provider {ask.provider_id} deregistered")
        node = provider.node(ask.node_id)
        if node is None or node.node_id in provider.delisted:
            raise UnknownNodeError(f"provider {ask.provider_id} has no listed node {ask.node_id}")
        if ask.gpu_model != node.gpu_model or ask.gpu_count > node.gpu_count:
            raise NotPermittedError(
                f"ask {ask.id}: node {node.node_id} has {node.gpu_count} x {node.gpu_model}, "
                f"the ask offers {ask.gpu_count} x {ask.gpu_model}",
                code="ask_exceeds_node",
            )
        holding = work.staged.stake_of(ask.provider_id)
        if not stake.can_place_asks(holding, provider.listed_nodes(), self.rules.stake):
            _, required = stake.required_stake(provider.listed_nodes(), self.rules.stake)
            raise InsufficientStakeError(
                f"provider {ask.provider_id} has {holding.bonded} bonded, its listed nodes "
                f"need {required}: bond more before placing asks"
            )
        book = work.book(ask.gpu_model)
        result, facts = book.place_ask(ask, work.now)
        self._record_book_facts(work, ask.gpu_model, facts)
        _require_ok(result, f"ask {ask.id} refused")

    def _place_bid(self, work: _Work, bid: Bid) -> None:
        if bid.escrow < self.rules.bid_escrow_min:
            raise BidBelowMinimumError(
                f"bid {bid.id}: escrow {bid.escrow} is below the minimum "
                f"{self.rules.bid_escrow_min}"
            )
        book = work.book(bid.gpu_model)
        result, facts = book.place_bid(bid, work.now)
        if result is orderbook.PlaceOrderResult.escrow_below_cost:
            need = orderbook.escrow_required(
                bid.gpu_count, bid.max_price_per_gpu_hour, bid.duration_s
            )
            raise BidBelowMinimumError(
                f"bid {bid.id}: escrow {bid.escrow} does not cover {need}, the cost of "
                f"{bid.gpu_count} GPUs for {bid.duration_s} s at its max price",
                code=result.name,
            )
        self._record_book_facts(work, bid.gpu_model, facts)
        _require_ok(result, f"bid {bid.id} refused")

    def _cancel(self, work: _Work, c: CancelAsk | CancelBid) -> None:
        order_id = c.ask_id if isinstance(c, CancelAsk) else c.bid_id
        model = work.staged.order_models.get(order_id)
        if model is None:
            raise UnknownOrderError(f"no order {order_id}")
        book = work.book(model)
        if isinstance(c, CancelAsk):
            result, facts = book.cancel_ask(orderbook.CancelAsk(c.ask_id, c.provider_id), work.now)
        else:
            result, facts = book.cancel_bid(orderbook.CancelBid(c.bid_id, c.consumer_id), work.now)
        if result is orderbook.CancelOrderResult.canceller_must_be_owner:
            raise NotPermittedError(f"order {order_id} belongs to someone else", code=result.name)
        self._record_book_facts(work, model, facts)
        _require_ok(result, f"cancel of {order_id} refused")

    def _record_book_facts(
        self, work: _Work, gpu_model: str, facts: Sequence[orderbook.OrderBookFact]
    ) -> None:
        stream = book_stream_id(gpu_model)
        for f in facts:
            work.record(stream, f, book_applied=True)
            if isinstance(f, orderbook.OrderMatched):
                result, opened = lease.open_lease(f, work.now)
                assert result is lease.OpenLeaseResult.ok, result
                for g in opened:
                    assert isinstance(g, lease.LeaseOpened)
                    work.record(g.lease_id, g)
                    work.lease_ids.append(g.lease_id)

    def _tick(self, work: _Work) -> None:
        now = work.now
        result: IntEnum
        facts: Sequence[Any]
        f: Any
        for model in sorted(self.state.books):
            due = self.state.books[model].next_expiry_at()
            if due is not None and due <= now:
                self._record_book_facts(work, model, work.book(model).expire(now))
        open_leases = [x for x in work.staged.leases.values() if x.status is not LeaseStatus.closed]
        open_leases.sort(key=lambda x: (x.opened_at, x.id))
        for current in open_leases[:LEASES_PER_TICK_MAX]:
            _down_result, down = lease.detect_downtime(current, now, self.rules.lease)
            for f in down:
                work.record(current.id, f)
            current = work.staged.leases[current.id]
            reason = lease.close_due(current, now)
            if reason is not None:
                result, facts = lease.close(current, reason, PROTOCOL_ID, now, self.rules.lease)
                assert result is lease.CloseResult.ok, result
                for f in facts:
                    work.record(current.id, f)
        for node_id, window_start in work.staged.undecided_windows()[:WINDOWS_PER_TICK_MAX]:
            result, facts = verdicts.decide_window(
                work.staged.verdicts, node_id, window_start, self.rules.verdicts, now
            )
            if result is not verdicts.DecideWindowResult.ok:
                continue  # not closed yet: a later tick decides it
            for f in facts:
                work.record(verdict_stream_id(node_id), f)
            for f in facts:
                if isinstance(f, verdicts.QuorumFailed):
                    self._consequences(work, f)
                elif isinstance(f, verdicts.CheckerContradicted):
                    self._penalize(work, f)

    def _consequences(self, work: _Work, failed: verdicts.QuorumFailed) -> None:
        """Slash, refund the affected consumers, close the node's leases for fraud."""
        f: Any
        now = work.now
        provider = work.staged.providers.get(failed.provider_id)
        node = None if provider is None else provider.node(failed.node_id)
        if node is None:
            log.warning("failed window of unknown node %s: nothing to slash", failed.node_id)
            return
        result, slashed = stake.slash(
            work.staged.stake_of(failed.provider_id),
            self.rules.stake,
            kind=failed.slash_kind,
            gpu_model=node.gpu_model,
            gpu_count=node.gpu_count,
            offence_at=failed.window_start,
            now=now,
        )
        taken = 0
        for f in slashed:
            assert isinstance(f, stake.StakeSlashed)
            work.record(stake_stream_id(failed.provider_id), f)
            taken += f.amount
        node_leases = [
            work.staged.leases[i] for i in work.staged.leases_by_node.get(failed.node_id, [])
        ]
        for refund in slashing.refunds_for(failed, taken, node_leases, self.rules.slashing, now):
            work.record(refund.lease_id, refund)
        if slashing.closes_leases(failed, self.rules.slashing):
            for current in node_leases:
                current = work.staged.leases[current.id]
                if current.status is LeaseStatus.closed:
                    continue
                close_result, facts = lease.close(
                    current, CloseReason.sla_breach, PROTOCOL_ID, now, self.rules.lease
                )
                assert close_result is lease.CloseResult.ok, close_result
                for f in facts:
                    work.record(current.id, f)
        if result is not stake.SlashResult.ok:
            log.info("window of node %s failed but nothing slashed: %s", node.node_id, result.name)

    def _penalize(self, work: _Work, contradicted: verdicts.CheckerContradicted) -> None:
        registered = work.staged.verdicts.checkers.get(contradicted.checker_id)
        if registered is None:
            return
        left = work.staged.checker_stake_left.get(contradicted.checker_id, 0)
        amount = slashing.checker_penalty(registered.stake_amount, left, self.rules.slashing)
        if amount > 0:
            work.record(
                contradicted.checker_id,
                slashing.CheckerPenalized(
                    contradicted.checker_id,
                    contradicted.node_id,
                    contradicted.window_start,
                    amount,
                    work.now,
                ),
            )


def _require_ok(result: IntEnum, message: str) -> None:
    if result.value != 0:
        if result.name in ("provider_not_found",):
            raise UnknownProviderError(f"{message}: {result.name}")
        if result.name == "verdict_from_unregistered_checker":
            raise UnknownCheckerError(f"{message}: {result.name}")
        if result.name == "unbond_would_leave_stake_below_required":
            raise InsufficientStakeError(f"{message}: {result.name}", code=result.name)
        raise RuleRefusedError(result, message)


def _require_lease_ok(result: IntEnum, message: str) -> None:
    if result.name == "lease_already_closed":
        raise LeaseClosedError(f"{message}: the lease is closed")
    _require_ok(result, message)


def _unique_accounts(accounts: Sequence[NewAccount]) -> list[NewAccount]:
    seen: set[UUID] = set()
    unique: list[NewAccount] = []
    for a in accounts:
        if a.id not in seen:
            seen.add(a.id)
            unique.append(a)
    return unique
