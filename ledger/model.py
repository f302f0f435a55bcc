"""The ledger's state machine: accounts, transfers, and the rules that move money.

Pure: no I/O and no clock reads. Time is passed in by the caller. Follows the
vocabulary and checks of TigerBeetle (accounts, transfers, two-phase pending /
post / void / expire, linked chains, result codes in the order they are checked).

Every accepted transfer is turned into an event; applying those events to an
empty `LedgerState` in log order rebuilds exactly the live state (`replay`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import IntEnum, IntFlag
from typing import cast
from uuid import UUID

from ledger.limits import (
    AMOUNT_MAX,
    ASSET_LENGTH_MAX,
    REFERENCE_KEY_LENGTH_MAX,
    REFERENCE_VALUE_LENGTH_MAX,
    REFERENCES_COUNT_MAX,
    TIMEOUT_S_MAX,
)

NIL_ID = UUID(int=0)

References = tuple[tuple[str, str], ...]
"""Opaque ids that tie a transfer to what caused it, e.g. (("lease", "..."), ("epoch", "7"))."""


class AccountFlags(IntFlag):
    """Which balance constraint an account enforces. At most one of the two."""

    none = 0
    debits_must_not_exceed_credits = 1 << 0
    """debits_pending + debits_posted may never exceed credits_posted (user-owned funds)."""
    credits_must_not_exceed_debits = 1 << 1
    """credits_pending + credits_posted may never exceed debits_posted."""


class TransferFlags(IntFlag):
    """How a transfer applies. `pending`, `post_pending_transfer` and
    `void_pending_transfer` are mutually exclusive."""

    none = 0
    linked = 1 << 0
    """Links this transfer with the next one in the batch: all apply or none does."""
    pending = 1 << 1
    """Reserves the amount (a hold) instead of moving it; posted, voided or expired later."""
    post_pending_transfer = 1 << 2
    """Posts (part of) the pending transfer named by pending_id."""
    void_pending_transfer = 1 << 3
    """Voids the pending transfer named by pending_id, releasing its hold."""


# Plain ints on the hot path: IntFlag arithmetic costs microseconds per operation.
_LINKED = int(TransferFlags.linked)
_PENDING = int(TransferFlags.pending)
_POST = int(TransferFlags.post_pending_transfer)
_VOID = int(TransferFlags.void_pending_transfer)
_TWO_PHASE_FLAGS = _PENDING | _POST | _VOID
_RESOLVE_FLAGS = _POST | _VOID
_DEBITS_MUST_NOT_EXCEED_CREDITS = int(AccountFlags.debits_must_not_exceed_credits)
_CREDITS_MUST_NOT_EXCEED_DEBITS = int(AccountFlags.credits_must_not_exceed_debits)


class CreateAccountResult(IntEnum):
    """Result of opening one account, in the order the rules are checked. Never renumber."""

    ok = 0
    id_must_not_be_zero = 1
    flags_are_mutually_exclusive = 2
    asset_must_not_be_empty = 3
    asset_exceeds_max_length = 4
    code_must_not_be_zero = 5
    exists_with_different_flags = 6
    exists_with_different_asset = 7
    exists_with_different_code = 8
    exists_with_different_shard = 9


class CreateTransferResult(IntEnum):
    """Result of one transfer, in the order the rules are checked. Never renumber.

    `ok` is also returned for a retry whose fields equal the accepted original:
    the caller gets the original result back (same recorded_at).
    """

    ok = 0
    linked_event_failed = 1
    linked_event_chain_open = 2
    id_must_not_be_zero = 3
    flags_are_mutually_exclusive = 4
    debit_account_id_must_not_be_zero = 5
    credit_account_id_must_not_be_zero = 6
    accounts_must_be_different = 7
    pending_id_must_be_zero = 8
    pending_id_must_not_be_zero = 9
    pending_id_must_be_different = 10
    timeout_reserved_for_pending_transfer = 11
    timeout_exceeds_max = 12
    amount_must_not_be_negative = 13
    amount_must_not_be_zero = 14
    amount_exceeds_max = 15
    asset_must_not_be_empty = 16
    code_must_not_be_zero = 17
    references_exceed_max = 18
    exists_with_different_flags = 19
    exists_with_different_debit_account_id = 20
    exists_with_different_credit_account_id = 21
    exists_with_different_amount = 22
    exists_with_different_pending_id = 23
    exists_with_different_timeout = 24
    exists_with_different_asset = 25
    exists_with_different_code = 26
    exists_with_different_references = 27
    exists_with_different_effective_at = 28
    debit_account_not_found = 29
    credit_account_not_found = 30
    accounts_must_have_the_same_asset = 31
    transfer_must_have_the_same_asset_as_accounts = 32
    pending_transfer_not_found = 33
    pending_transfer_not_pending = 34
    pending_transfer_has_different_debit_account_id = 35
    pending_transfer_has_different_credit_account_id = 36
    pending_transfer_has_different_asset = 37
    pending_transfer_has_different_code = 38
    exceeds_pending_transfer_amount = 39
    pending_transfer_has_different_amount = 40
    pending_transfer_already_posted = 41
    pending_transfer_already_voided = 42
    pending_transfer_expired = 43
    overflows_debits = 44
    overflows_credits = 45
    exceeds_credits = 46
    exceeds_debits = 47


class PendingStatus(IntEnum):
    """Where a pending transfer stands."""

    pending = 1
    posted = 2
    voided = 3
    expired = 4


@dataclass(slots=True)
class Account:
    """An account and its four balances, all integers in the asset's smallest unit."""

    id: UUID
    asset: str
    """The asset's symbol, e.g. "AETH". Transfers only move money within one asset."""
    code: int
    """What the account is for (consumer funds, lease escrow, treasury...). Must not be zero."""
    flags: AccountFlags
    shard: int
    """The ledger shard that owns the account; one writer per shard."""
    opened_at: datetime
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    debits_limited: bool = field(init=False, repr=False, compare=False)
    """Cached: flags has debits_must_not_exceed_credits (an IntFlag test costs microseconds)."""
    credits_limited: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.debits_limited = bool(int(self.flags) & _DEBITS_MUST_NOT_EXCEED_CREDITS)
        self.credits_limited = bool(int(self.flags) & _CREDITS_MUST_NOT_EXCEED_DEBITS)

    @property
    def balance(self) -> int:
        """credits_posted - debits_posted (the net posted balance, credit-normal)."""
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        """What may still be debited: credits_posted - debits_posted - debits_pending."""
        return self.credits_posted - self.debits_posted - self.debits_pending

    def balances(self) -> tuple[int, int, int, int]:
        return (self.debits_pending, self.debits_posted, self.credits_pending, self.credits_posted)


@dataclass(frozen=True, slots=True)
class NewAccount:
    """Command: open an account. Opening the same id with the same fields again is `ok`."""

    id: UUID
    asset: str
    code: int
    flags: AccountFlags = AccountFlags.none
    shard: int = 0


@dataclass(frozen=True, slots=True)
class NewTransfer:
    """Command: create one transfer. `id` is the idempotency key."""

    id: UUID
    debit_account_id: UUID
    credit_account_id: UUID
    amount: int
    """> 0, except for a void, where 0 means the whole pending amount."""
    asset: str
    code: int
    """The reason for the transfer (escrow hold, usage charge, fee, slash...). Not zero."""
    flags: TransferFlags = TransferFlags.none
    pending_id: UUID = NIL_ID
    """For post and void: the pending transfer they resolve."""
    timeout_s: int = 0
    """For pending: seconds after recording at which the hold expires; 0 = never."""
    references: References = ()
    effective_at: datetime | None = None
    """When the transfer took effect in the world; defaults to recorded_at."""

    def __post_init__(self) -> None:
        # Money is an int in the smallest unit: a float or a bool here is a caller's bug that
        # must never reach the log.
        if type(self.amount) is not int:
            raise TypeError(f"transfer {self.id}: amount must be an int, got {self.amount!r}")
        for name in ("id", "debit_account_id", "credit_account_id", "pending_id"):
            if not isinstance(getattr(self, name), UUID):
                raise TypeError(f"transfer {self.id}: {name} must be a UUID")


@dataclass(frozen=True, slots=True)
class Transfer:
    """An accepted transfer, as stored. Immutable."""

    id: UUID
    debit_account_id: UUID
    credit_account_id: UUID
    amount: int
    asset: str
    code: int
    flags: TransferFlags
    pending_id: UUID
    timeout_s: int
    references: References
    effective_at: datetime
    recorded_at: datetime
    """When the ledger accepted it (strictly increasing within a shard)."""

    @property
    def expires_at(self) -> datetime | None:
        if not self.flags & _PENDING or self.timeout_s == 0:
            return None
        return self.recorded_at + timedelta(seconds=self.timeout_s)


@dataclass(frozen=True, slots=True)
class TransferOutcome:
    """The answer to one NewTransfer."""

    id: UUID
    result: CreateTransferResult
    recorded_at: datetime | None = None
    """When the ledger recorded the (original) transfer, or its rejection when the rejection
    depended on the ledger's state (see `Rejection`); None for other rejections."""

    @property
    def ok(self) -> bool:
        return self.result is CreateTransferResult.ok


@dataclass(frozen=True, slots=True)
class PendingExpiry:
    """Fact: a pending transfer's timeout passed before it was posted or voided."""

    pending_id: UUID
    expired_at: datetime


@dataclass(slots=True)
class _Pending:
    transfer: Transfer
    status: PendingStatus


@dataclass(frozen=True, slots=True)
class Rejection:
    """Fact: a transfer was refused for a reason that depended on the ledger's state at the
    time (an account or pending transfer not found, a balance limit, an overflow).

    It is recorded so that a retry of the same transfer gets the same answer later, even
    after the state changed: the id is spent. Other rejections depend only on the command
    and the immutable history, so they repeat by themselves and are not recorded.
    """

    transfer: NewTransfer
    result: CreateTransferResult
    recorded_at: datetime
    shard: int = 0
    """The shard that refused it (its accounts may not exist, so they cannot tell)."""


TRANSIENT_RESULTS = frozenset(
    {
        CreateTransferResult.debit_account_not_found,
        CreateTransferResult.credit_account_not_found,
        CreateTransferResult.pending_transfer_not_found,
        CreateTransferResult.overflows_debits,
        CreateTransferResult.overflows_credits,
        CreateTransferResult.exceeds_credits,
        CreateTransferResult.exceeds_debits,
    }
)
"""Rejections that depend on the ledger's state; recorded as `Rejection` facts."""

Fact = Account | Transfer | PendingExpiry | Rejection
"""What the state machine records: an opened account, an accepted transfer, an expiry, a
rejection that depended on the state."""


class LedgerState:
    """All accounts, all accepted transfers and every pending hold of one ledger shard.

    `open_accounts`, `create_transfers` and `expire_pending` decide and apply at once,
    returning the facts to persist. If persisting fails, `rollback()` undoes everything
    since the last `mark()`; `apply()` is the replay path for facts read back from the log.
    """

    def __init__(self, shard: int = 0) -> None:
        self.shard = shard
        """The ledger shard this state belongs to."""
        self.accounts: dict[UUID, Account] = {}
        self.transfers: dict[UUID, Transfer] = {}
        self.rejected: dict[UUID, Rejection] = {}
        """Transfers refused for a state-dependent reason; their ids are spent."""
        self._pending: dict[UUID, _Pending] = {}
        self._expiries: list[tuple[datetime, UUID]] = []
        self.last_recorded_at: datetime | None = None
        # Undo log since the last commit(): (kind, key, value before), newest last.
        self._undo: list[tuple[int, object, object]] = []
        self._undo_base = 0
        """How many undo entries were released so far: mark() positions are absolute."""

    # -- undo log -------------------------------------------------------------------

    def mark(self) -> int:
        """Start (or nest) a unit that may be rolled back; returns its position."""
        return self._undo_base + len(self._undo)

    def release(self, position: int) -> None:
        """Keep for good what was applied before `position` (a value returned by mark())."""
        del self._undo[: position - self._undo_base]
        self._undo_base = max(self._undo_base, position)

    def commit(self) -> None:
        """Keep for good everything applied so far."""
        self.release(self.mark())

    def rollback(self, position: int | None = None) -> None:
        """Undo everything applied since `position` (a value returned by mark()), or since
        the last commit()."""
        keep = 0 if position is None else position - self._undo_base
        assert keep >= 0, "cannot roll back past what was released"
        while len(self._undo) > keep:
            kind, key, before = self._undo.pop()
            if kind == _UNDO_BALANCES:
                assert isinstance(key, Account) and isinstance(before, tuple)
                (
                    key.debits_pending,
                    key.debits_posted,
                    key.credits_pending,
                    key.credits_posted,
                ) = before
            elif kind == _UNDO_NEW_ACCOUNT:
                assert isinstance(key, UUID)
                del self.accounts[key]
            elif kind == _UNDO_NEW_REJECTION:
                assert isinstance(key, UUID)
                del self.rejected[key]
            elif kind == _UNDO_NEW_TRANSFER:
                assert isinstance(key, UUID)
                del self.transfers[key]
                self._pending.pop(key, None)
            elif kind == _UNDO_PENDING_STATUS:
                assert isinstance(key, _Pending) and isinstance(before, PendingStatus)
                key.status = before
            elif kind == _UNDO_EXPIRY_PUSHED:
                self._expiries.remove(cast(tuple[datetime, UUID], key))
                heapq.heapify(self._expiries)
            elif kind == _UNDO_EXPIRY_POPPED:
                heapq.heappush(self._expiries, cast(tuple[datetime, UUID], key))
            elif kind == _UNDO_CLOCK:
                assert before is None or isinstance(before, datetime)
                self.last_recorded_at = before

    # -- queries ----------------------------------------------------------------------

    def pending_status(self, pending_id: UUID) -> PendingStatus | None:
        pending = self._pending.get(pending_id)
        return None if pending is None else pending.status

    def pending_holds(self) -> list[Transfer]:
        """Pending transfers not yet posted, voided or expired."""
        return [p.transfer for p in self._pending.values() if p.status is PendingStatus.pending]

    def next_expiry_at(self) -> datetime | None:
        while self._expiries:
            at, pending_id = self._expiries[0]
            if self._pending[pending_id].status is PendingStatus.pending:
                return at
            self._pop_expiry()
        return None

    def trial_balance(self) -> dict[str, tuple[int, int]]:
        """Per asset: (sum of debits_posted, sum of credits_posted). They must be equal."""
        sums: dict[str, tuple[int, int]] = {}
        for account in self.accounts.values():
            debits, credits = sums.get(account.asset, (0, 0))
            sums[account.asset] = (debits + account.debits_posted, credits + account.credits_posted)
        return sums

    def clock(self, now: datetime) -> datetime:
        """The recorded_at for the next fact: `now`, but strictly after the last one."""
        last = self.last_recorded_at
        if last is not None and now <= last:
            return last + _TICK
        return now

    # -- commands ---------------------------------------------------------------------

    def open_accounts(
        self, commands: Sequence[NewAccount], now: datetime
    ) -> tuple[list[CreateAccountResult], list[Account]]:
        """Open accounts. Returns one result per command and the accounts newly opened."""
        results: list[CreateAccountResult] = []
        opened: list[Account] = []
        for command in commands:
            result = self._check_account(command)
            if result is CreateAccountResult.ok and command.id not in self.accounts:
                account = Account(
                    id=command.id,
                    asset=command.asset,
                    code=command.code,
                    flags=command.flags,
                    shard=command.shard,
                    opened_at=self._tick(now),
                )
                self._apply_account(account)
                opened.append(account)
            results.append(result)
        return results, opened

    def create_transfers(
        self, commands: Sequence[NewTransfer], now: datetime
    ) -> tuple[list[TransferOutcome], list[Fact]]:
        """Expire what is due at `now`, then apply each transfer in order.

        Returns one outcome per command and the facts to persist, in order. A linked
        chain (transfers flagged `linked`, ending at the first one not flagged) applies
        in full or not at all.
        """
        facts: list[Fact] = list(self.expire_pending(now))
        outcomes: list[TransferOutcome] = []
        chain_start: int | None = None  # index into outcomes where the open chain began
        chain_mark = 0
        chain_facts = 0
        chain_failed: CreateTransferResult | None = None
        count = len(commands)
        for index, command in enumerate(commands):
            linked = bool(int(command.flags) & _LINKED)
            if chain_start is None and linked:
                chain_start, chain_mark, chain_facts = index, self.mark(), len(facts)
                chain_failed = None
            if linked and index == count - 1:
                result = CreateTransferResult.linked_event_chain_open
            elif chain_failed is not None:
                result = CreateTransferResult.linked_event_failed
            else:
                result, transfer = self._create_transfer(command, now)
                if result is CreateTransferResult.ok:
                    if transfer is not None:
                        facts.append(transfer)
                        outcomes.append(TransferOutcome(command.id, result, transfer.recorded_at))
                    else:
                        original = self.transfers[command.id]
                        outcomes.append(TransferOutcome(command.id, result, original.recorded_at))
                    if chain_start is not None and not linked:
                        chain_start = None  # chain closed, all applied
                    continue
            outcomes.append(self._rejected(command, result, now, facts))
            if chain_start is not None:
                if chain_failed is None:
                    chain_failed = result
                    # Undo the chain's earlier transfers and mark them failed.
                    self.rollback(chain_mark)
                    del facts[chain_facts:]
                    for earlier in range(chain_start, index):
                        outcomes[earlier] = TransferOutcome(
                            commands[earlier].id, CreateTransferResult.linked_event_failed
                        )
                    if result in TRANSIENT_RESULTS:  # its rejection was undone with the chain
                        outcomes[index] = self._rejected(command, result, now, facts)
                if not linked:
                    chain_start, chain_failed = None, None
        return outcomes, facts

    def _rejected(
        self, command: NewTransfer, result: CreateTransferResult, now: datetime, facts: list[Fact]
    ) -> TransferOutcome:
        """The outcome of a rejection; records it when it depended on the state."""
        earlier = self.rejected.get(command.id)
        if earlier is not None:
            if result is earlier.result:  # a retry: the original answer
                return TransferOutcome(command.id, result, earlier.recorded_at)
            return TransferOutcome(command.id, result)
        if result not in TRANSIENT_RESULTS:
            return TransferOutcome(command.id, result)
        rejection = Rejection(command, result, self._tick(now), self.shard)
        self._apply_rejection(rejection)
        facts.append(rejection)
        return TransferOutcome(command.id, result, rejection.recorded_at)

    def expire_pending(self, now: datetime) -> list[PendingExpiry]:
        """Expire every pending transfer whose timeout passed at or before `now`."""
        expired: list[PendingExpiry] = []
        while self._expiries and self._expiries[0][0] <= now:
            _at, pending_id = self._expiries[0]
            if self._pending[pending_id].status is PendingStatus.pending:
                expiry = PendingExpiry(pending_id=pending_id, expired_at=self._tick(now))
                self._apply_expiry(expiry)
                expired.append(expiry)
            else:
                self._pop_expiry()
        return expired

    # -- replay -----------------------------------------------------------------------

    def owns(self, fact: Fact) -> bool:
        """Whether a fact read from a log shared by several shards belongs to this state."""
        if isinstance(fact, Account | Rejection):
            return fact.shard == self.shard
        if isinstance(fact, Transfer):
            return fact.debit_account_id in self.accounts
        return fact.pending_id in self.transfers

    def apply(self, fact: Fact) -> None:
        """Apply a fact read back from the log (already validated when it was decided)."""
        if isinstance(fact, Transfer):
            self._apply_transfer(
                fact, self.accounts[fact.debit_account_id], self.accounts[fact.credit_account_id]
            )
        elif isinstance(fact, Account):
            self._apply_account(fact)
        elif isinstance(fact, Rejection):
            self._apply_rejection(fact)
        else:
            self._apply_expiry(fact)

    # -- rules ------------------------------------------------------------------------

    def _check_account(self, command: NewAccount) -> CreateAccountResult:
        r = CreateAccountResult
        if not command.id.int:
            return r.id_must_not_be_zero
        both = _DEBITS_MUST_NOT_EXCEED_CREDITS | _CREDITS_MUST_NOT_EXCEED_DEBITS
        if int(command.flags) & both == both:
            return r.flags_are_mutually_exclusive
        if not command.asset:
            return r.asset_must_not_be_empty
        if len(command.asset) > ASSET_LENGTH_MAX:
            return r.asset_exceeds_max_length
        if command.code == 0:
            return r.code_must_not_be_zero
        existing = self.accounts.get(command.id)
        if existing is not None:
            if existing.flags != command.flags:
                return r.exists_with_different_flags
            if existing.asset != command.asset:
                return r.exists_with_different_asset
            if existing.code != command.code:
                return r.exists_with_different_code
            if existing.shard != command.shard:
                return r.exists_with_different_shard
        return r.ok

    def _create_transfer(
        self, t: NewTransfer, now: datetime
    ) -> tuple[CreateTransferResult, Transfer | None]:
        """Check one transfer and apply it. (ok, None) means: an identical retry."""
        r = CreateTransferResult
        flags = int(t.flags)
        resolving = bool(flags & _RESOLVE_FLAGS)
        if not t.id.int:
            return r.id_must_not_be_zero, None
        two_phase = flags & _TWO_PHASE_FLAGS
        if two_phase & (two_phase - 1):
            return r.flags_are_mutually_exclusive, None
        if not resolving:
            if not t.debit_account_id.int:
                return r.debit_account_id_must_not_be_zero, None
            if not t.credit_account_id.int:
                return r.credit_account_id_must_not_be_zero, None
            if t.debit_account_id.int == t.credit_account_id.int:
                return r.accounts_must_be_different, None
            if t.pending_id.int:
                return r.pending_id_must_be_zero, None
        else:
            if not t.pending_id.int:
                return r.pending_id_must_not_be_zero, None
            if t.pending_id.int == t.id.int:
                return r.pending_id_must_be_different, None
        if t.timeout_s != 0:
            if not flags & _PENDING:
                return r.timeout_reserved_for_pending_transfer, None
            if t.timeout_s < 0 or t.timeout_s > TIMEOUT_S_MAX:
                return r.timeout_exceeds_max, None
        if t.amount < 0:
            return r.amount_must_not_be_negative, None
        if t.amount == 0 and not flags & _VOID:
            return r.amount_must_not_be_zero, None
        if t.amount > AMOUNT_MAX:
            return r.amount_exceeds_max, None
        if not t.asset:
            return r.asset_must_not_be_empty, None
        if t.code == 0:
            return r.code_must_not_be_zero, None
        if t.references and (
            len(t.references) > REFERENCES_COUNT_MAX
            or any(
                len(k) > REFERENCE_KEY_LENGTH_MAX or len(v) > REFERENCE_VALUE_LENGTH_MAX
                for k, v in t.references
            )
        ):
            return r.references_exceed_max, None

        existing = self.transfers.get(t.id)
        if existing is not None:
            return _compare_existing(t, existing), None
        if self.rejected:
            refused = self.rejected.get(t.id)
            if refused is not None:
                code = _compare_command(t, refused.transfer)
                return (refused.result if code is r.ok else code), None

        pending: _Pending | None = None
        debit_account_id, credit_account_id = t.debit_account_id, t.credit_account_id
        if resolving:
            pending = self._pending.get(t.pending_id)
            if pending is None:
                if t.pending_id in self.transfers:
                    return r.pending_transfer_not_pending, None
                return r.pending_transfer_not_found, None
            p = pending.transfer
            # Post and void may leave the accounts zero: they default to the pending's.
            if not debit_account_id.int:
                debit_account_id = p.debit_account_id
            if not credit_account_id.int:
                credit_account_id = p.credit_account_id

        debit = self.accounts.get(debit_account_id)
        if debit is None:
            return r.debit_account_not_found, None
        credit = self.accounts.get(credit_account_id)
        if credit is None:
            return r.credit_account_not_found, None
        if debit.asset != credit.asset:
            return r.accounts_must_have_the_same_asset, None
        if t.asset != debit.asset:
            return r.transfer_must_have_the_same_asset_as_accounts, None

        amount = t.amount
        if pending is not None:
            p = pending.transfer
            if debit_account_id != p.debit_account_id:
                return r.pending_transfer_has_different_debit_account_id, None
            if credit_account_id != p.credit_account_id:
                return r.pending_transfer_has_different_credit_account_id, None
            if t.asset != p.asset:
                return r.pending_transfer_has_different_asset, None
            if t.code != p.code:
                return r.pending_transfer_has_different_code, None
            if flags & _POST:
                if amount > p.amount:
                    return r.exceeds_pending_transfer_amount, None
            elif amount not in (0, p.amount):
                return r.pending_transfer_has_different_amount, None
            if pending.status is PendingStatus.posted:
                return r.pending_transfer_already_posted, None
            if pending.status is PendingStatus.voided:
                return r.pending_transfer_already_voided, None
            if pending.status is PendingStatus.expired:
                return r.pending_transfer_expired, None
            if flags & _VOID:
                amount = p.amount
        else:
            if debit.debits_pending + debit.debits_posted + amount > AMOUNT_MAX:
                return r.overflows_debits, None
            if credit.credits_pending + credit.credits_posted + amount > AMOUNT_MAX:
                return r.overflows_credits, None
            if (
                debit.debits_limited
                and debit.debits_pending + debit.debits_posted + amount > debit.credits_posted
            ):
                return r.exceeds_credits, None
            if (
                credit.credits_limited
                and credit.credits_pending + credit.credits_posted + amount > credit.debits_posted
            ):
                return r.exceeds_debits, None

        recorded_at = self._tick(now)
        transfer = Transfer(
            id=t.id,
            debit_account_id=debit_account_id,
            credit_account_id=credit_account_id,
            amount=amount,
            asset=t.asset,
            code=t.code,
            flags=t.flags,
            pending_id=t.pending_id,
            timeout_s=t.timeout_s,
            references=t.references,
            effective_at=t.effective_at or recorded_at,
            recorded_at=recorded_at,
        )
        self._apply_transfer(transfer, debit, credit)
        return r.ok, transfer

    # -- appliers (shared by decisions and replay) -----------------------------------------

    def _tick(self, now: datetime) -> datetime:
        at = self.clock(now)
        self._undo.append((_UNDO_CLOCK, None, self.last_recorded_at))
        self.last_recorded_at = at
        return at

    def _see(self, at: datetime) -> None:
        if self.last_recorded_at is None or at > self.last_recorded_at:
            self._undo.append((_UNDO_CLOCK, None, self.last_recorded_at))
            self.last_recorded_at = at

    def _apply_account(self, account: Account) -> None:
        self._see(account.opened_at)
        # The state owns its accounts: a fact handed out (or replayed) is never aliased.
        self.accounts[account.id] = replace(account)
        self._undo.append((_UNDO_NEW_ACCOUNT, account.id, None))

    def _save_balances(self, account: Account) -> None:
        self._undo.append((_UNDO_BALANCES, account, account.balances()))

    def _apply_transfer(self, t: Transfer, debit: Account, credit: Account) -> None:
        self._see(t.recorded_at)
        undo = self._undo
        undo.append(
            (
                _UNDO_BALANCES,
                debit,
                (
                    debit.debits_pending,
                    debit.debits_posted,
                    debit.credits_pending,
                    debit.credits_posted,
                ),
            )
        )
        undo.append(
            (
                _UNDO_BALANCES,
                credit,
                (
                    credit.debits_pending,
                    credit.debits_posted,
                    credit.credits_pending,
                    credit.credits_posted,
                ),
            )
        )
        flags = int(t.flags)
        if flags & _PENDING:
            debit.debits_pending += t.amount
            credit.credits_pending += t.amount
            self._pending[t.id] = _Pending(t, PendingStatus.pending)
            expires_at = t.expires_at
            if expires_at is not None:
                entry = (expires_at, t.id)
                heapq.heappush(self._expiries, entry)
                self._undo.append((_UNDO_EXPIRY_PUSHED, entry, None))
        elif flags & _RESOLVE_FLAGS:
            pending = self._pending[t.pending_id]
            held = pending.transfer.amount
            debit.debits_pending -= held
            credit.credits_pending -= held
            self._undo.append((_UNDO_PENDING_STATUS, pending, pending.status))
            if flags & _POST:
                debit.debits_posted += t.amount
                credit.credits_posted += t.amount
                pending.status = PendingStatus.posted
            else:
                pending.status = PendingStatus.voided
        else:
            debit.debits_posted += t.amount
            credit.credits_posted += t.amount
        self.transfers[t.id] = t
        self._undo.append((_UNDO_NEW_TRANSFER, t.id, None))

    def _apply_rejection(self, rejection: Rejection) -> None:
        self._see(rejection.recorded_at)
        self.rejected[rejection.transfer.id] = rejection
        self._undo.append((_UNDO_NEW_REJECTION, rejection.transfer.id, None))

    def _apply_expiry(self, expiry: PendingExpiry) -> None:
        self._see(expiry.expired_at)
        pending = self._pending[expiry.pending_id]
        p = pending.transfer
        debit = self.accounts[p.debit_account_id]
        credit = self.accounts[p.credit_account_id]
        self._save_balances(debit)
        self._save_balances(credit)
        debit.debits_pending -= p.amount
        credit.credits_pending -= p.amount
        self._undo.append((_UNDO_PENDING_STATUS, pending, pending.status))
        pending.status = PendingStatus.expired

    def _pop_expiry(self) -> None:
        entry = heapq.heappop(self._expiries)
        self._undo.append((_UNDO_EXPIRY_POPPED, entry, None))


_UNDO_BALANCES = 1
_UNDO_NEW_ACCOUNT = 2
_UNDO_NEW_TRANSFER = 3
_UNDO_PENDING_STATUS = 4
_UNDO_EXPIRY_PUSHED = 5
_UNDO_EXPIRY_POPPED = 7
_UNDO_NEW_REJECTION = 8
_UNDO_CLOCK = 6
_TICK = timedelta(microseconds=1)
_REPLAY_UNDO_MAX = 100_000


def _compare_existing(t: NewTransfer, e: Transfer) -> CreateTransferResult:
    r = CreateTransferResult
    if t.flags != e.flags:
        return r.exists_with_different_flags
    resolving = bool(t.flags & _RESOLVE_FLAGS)
    if t.debit_account_id != e.debit_account_id and not (
        resolving and t.debit_account_id == NIL_ID
    ):
        return r.exists_with_different_debit_account_id
    if t.credit_account_id != e.credit_account_id and not (
        resolving and t.credit_account_id == NIL_ID
    ):
        return r.exists_with_different_credit_account_id
    if t.amount != e.amount and not (t.flags & _VOID and t.amount == 0):
        return r.exists_with_different_amount
    if t.pending_id != e.pending_id:
        return r.exists_with_different_pending_id
    if t.timeout_s != e.timeout_s:
        return r.exists_with_different_timeout
    if t.asset != e.asset:
        return r.exists_with_different_asset
    if t.code != e.code:
        return r.exists_with_different_code
    if t.references != e.references:
        return r.exists_with_different_references
    if t.effective_at is not None and t.effective_at != e.effective_at:
        return r.exists_with_different_effective_at
    return r.ok


def _compare_command(t: NewTransfer, e: NewTransfer) -> CreateTransferResult:
    """Compare a transfer with an earlier command of the same id (one that was refused)."""
    r = CreateTransferResult
    for name, code in (
        ("flags", r.exists_with_different_flags),
        ("debit_account_id", r.exists_with_different_debit_account_id),
        ("credit_account_id", r.exists_with_different_credit_account_id),
        ("amount", r.exists_with_different_amount),
        ("pending_id", r.exists_with_different_pending_id),
        ("timeout_s", r.exists_with_different_timeout),
        ("asset", r.exists_with_different_asset),
        ("code", r.exists_with_different_code),
        ("references", r.exists_with_different_references),
        ("effective_at", r.exists_with_different_effective_at),
    ):
        value = getattr(t, name)
        if value != getattr(e, name) and not (name == "effective_at" and value is None):
            return code
    return r.ok


def replay(facts: Iterable[Fact], shard: int = 0) -> LedgerState:
    """Rebuild a ledger shard's state from its facts in log order."""
    state = LedgerState(shard)
    for fact in facts:
        state.apply(fact)
        if len(state._undo) > _REPLAY_UNDO_MAX:
            state.commit()
    state.commit()
    return state


__all__ = [
    "NIL_ID",
    "TRANSIENT_RESULTS",
    "Account",
    "AccountFlags",
    "CreateAccountResult",
    "CreateTransferResult",
    "Fact",
    "LedgerState",
    "NewAccount",
    "NewTransfer",
    "PendingExpiry",
    "PendingStatus",
    "References",
    "Rejection",
    "Transfer",
    "TransferFlags",
    "TransferOutcome",
    "replay",
]
