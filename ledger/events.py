"""The ledger's stored events, and how each maps to the fact it records.

Each event is an `eventsourcing` domain event. Its stored state is plain JSON that any
reader can parse: ids as canonical UUID strings, times as ISO 8601 with offset, amounts as
decimal strings (JSON numbers lose precision past 2**53 in many readers), fields equal to
their defaults left out. `class_version` is bumped and an `upcast_vN_vN+1` added when a
state's shape changes; old events are upcast on read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Self, cast
from uuid import UUID, uuid5

from eventsourcing.domain import DomainEvent

from ledger.model import (
    NIL_ID,
    Account,
    AccountFlags,
    CreateTransferResult,
    Fact,
    NewTransfer,
    PendingExpiry,
    Rejection,
    Transfer,
    TransferFlags,
)

SHARD_NAMESPACE = UUID("6f1c1f4e-5a0b-4c55-9d0a-3f3a8f1e2b77")

State = dict[str, Any]


def shard_stream_id(shard: int) -> UUID:
    """The id of a shard's batch stream (its commit log)."""
    return uuid5(SHARD_NAMESPACE, f"ledger-shard-{shard}")


class LedgerEvent(DomainEvent):
    """Base of the ledger's events: knows its JSON state and the fact it records."""

    class_version: ClassVar[int] = 1

    def to_state(self) -> State:
        raise NotImplementedError

    @classmethod
    def from_state(cls, originator_id: UUID, originator_version: int, state: State) -> Self:
        raise NotImplementedError

    def to_fact(self) -> Fact | None:
        return None


def _new(cls: type[LedgerEvent], values: State) -> Any:
    event = object.__new__(cls)
    object.__setattr__(event, "__dict__", values)
    return event


class AccountOpened(LedgerEvent):
    """An account was opened. Stream: the account id, version 1."""

    asset: str
    code: int
    flags: int
    shard: int

    @classmethod
    def from_fact(cls, a: Account) -> AccountOpened:
        return cast(
            AccountOpened,
            _new(
                cls,
                {
                    "originator_id": a.id,
                    "originator_version": 1,
                    "timestamp": a.opened_at,
                    "asset": a.asset,
                    "code": a.code,
                    "flags": int(a.flags),
                    "shard": a.shard,
                },
            ),
        )

    def to_state(self) -> State:
        return {
            "timestamp": self.timestamp.isoformat(),
            "asset": self.asset,
            "code": self.code,
            "flags": self.flags,
            "shard": self.shard,
        }

    @classmethod
    def from_state(cls, originator_id: UUID, originator_version: int, state: State) -> Self:
        state["originator_id"] = originator_id
        state["originator_version"] = originator_version
        state["timestamp"] = datetime.fromisoformat(state["timestamp"])
        return cast(Self, _new(cls, state))

    def to_fact(self) -> Account:
        return Account(
            id=self.originator_id,
            asset=self.asset,
            code=self.code,
            flags=AccountFlags(self.flags),
            shard=self.shard,
            opened_at=self.timestamp,
        )


class TransferCreated(LedgerEvent):
    """A transfer was accepted. Stream: the transfer id, version 1. `timestamp` is recorded_at."""

    debit_account_id: UUID
    credit_account_id: UUID
    amount: int
    asset: str
    code: int
    flags: int
    pending_id: UUID
    timeout_s: int
    references: tuple[tuple[str, str], ...]
    effective_at: datetime

    @classmethod
    def from_fact(cls, t: Transfer) -> TransferCreated:
        return cast(
            TransferCreated,
            _new(
                cls,
                {
                    "originator_id": t.id,
                    "originator_version": 1,
                    "timestamp": t.recorded_at,
                    "debit_account_id": t.debit_account_id,
                    "credit_account_id": t.credit_account_id,
                    "amount": t.amount,
                    "asset": t.asset,
                    "code": t.code,
                    "flags": int(t.flags),
                    "pending_id": t.pending_id,
                    "timeout_s": t.timeout_s,
                    "references": t.references,
                    "effective_at": t.effective_at,
                },
            ),
        )

    def to_state(self) -> State:
        return stored_state_of(self.to_fact())[3]

    @classmethod
    def from_state(cls, originator_id: UUID, originator_version: int, state: State) -> Self:
        timestamp = datetime.fromisoformat(state["timestamp"])
        effective_at = state.get("effective_at")
        values = {
            "originator_id": originator_id,
            "originator_version": originator_version,
            "timestamp": timestamp,
            **_movement_fields(state),
            "effective_at": timestamp
            if effective_at is None
            else datetime.fromisoformat(effective_at),
        }
        return cast(Self, _new(cls, values))

    def to_fact(self) -> Transfer:
        return Transfer(
            id=self.originator_id,
            debit_account_id=self.debit_account_id,
            credit_account_id=self.credit_account_id,
            amount=self.amount,
            asset=self.asset,
            code=self.code,
            flags=TransferFlags(self.flags),
            pending_id=self.pending_id,
            timeout_s=self.timeout_s,
            references=self.references,
            effective_at=self.effective_at,
            recorded_at=self.timestamp,
        )


class TransferRejected(LedgerEvent):
    """A transfer was refused for a reason that depended on the ledger's state; its id is
    spent, so a retry gets the same answer. Stream: the transfer id, version 1.

    State: the command's fields (as in TransferCreated; `effective_at` only when given) and
    `result`, the name of the CreateTransferResult.
    """

    transfer: NewTransfer
    result: str
    shard: int

    @classmethod
    def from_fact(cls, rejection: Rejection) -> TransferRejected:
        return cast(
            TransferRejected,
            _new(
                cls,
                {
                    "originator_id": rejection.transfer.id,
                    "originator_version": 1,
                    "timestamp": rejection.recorded_at,
                    "transfer": rejection.transfer,
                    "result": rejection.result.name,
                    "shard": rejection.shard,
                },
            ),
        )

    def to_state(self) -> State:
        return stored_state_of(self.to_fact())[3]

    @classmethod
    def from_state(cls, originator_id: UUID, originator_version: int, state: State) -> Self:
        fields = _movement_fields(state)
        fields["flags"] = TransferFlags(fields["flags"])
        effective_at = state.get("effective_at")
        transfer = NewTransfer(
            id=originator_id,
            effective_at=None if effective_at is None else datetime.fromisoformat(effective_at),
            **fields,
        )
        return cast(
            Self,
            _new(
                cls,
                {
                    "originator_id": originator_id,
                    "originator_version": originator_version,
                    "timestamp": datetime.fromisoformat(state["timestamp"]),
                    "transfer": transfer,
                    "result": state["result"],
                    "shard": state["shard"],
                },
            ),
        )

    def to_fact(self) -> Rejection:
        return Rejection(
            transfer=self.transfer,
            result=CreateTransferResult[self.result],
            recorded_at=self.timestamp,
            shard=self.shard,
        )


class PendingTransferExpired(LedgerEvent):
    """A pending transfer's timeout passed. Stream: the pending transfer id, version 2."""

    @classmethod
    def from_fact(cls, e: PendingExpiry) -> PendingTransferExpired:
        return cast(
            PendingTransferExpired,
            _new(
                cls,
                {
                    "originator_id": e.pending_id,
                    "originator_version": 2,
                    "timestamp": e.expired_at,
                },
            ),
        )

    def to_state(self) -> State:
        return {"timestamp": self.timestamp.isoformat()}

    @classmethod
    def from_state(cls, originator_id: UUID, originator_version: int, state: State) -> Self:
        return cast(
            Self,
            _new(
                cls,
                {
                    "originator_id": originator_id,
                    "originator_version": originator_version,
                    "timestamp": datetime.fromisoformat(state["timestamp"]),
                },
            ),
        )

    def to_fact(self) -> PendingExpiry:
        return PendingExpiry(pending_id=self.originator_id, expired_at=self.timestamp)


class BatchCommitted(LedgerEvent):
    """A writer committed a batch. Stream: the shard's stream id, version = batch number.

    The unique (stream, version) key is what serializes writers: two writers that decided a
    batch on the same view of the shard both claim the same version, and only one commits.
    """

    shard: int
    facts_count: int
    """How many events this batch recorded besides this one."""

    @classmethod
    def make(cls, shard: int, batch_number: int, facts_count: int, at: datetime) -> BatchCommitted:
        return cast(
            BatchCommitted,
            _new(
                cls,
                {
                    "originator_id": shard_stream_id(shard),
                    "originator_version": batch_number,
                    "timestamp": at,
                    "shard": shard,
                    "facts_count": facts_count,
                },
            ),
        )

    def to_state(self) -> State:
        return {
            "timestamp": self.timestamp.isoformat(),
            "shard": self.shard,
            "facts_count": self.facts_count,
        }

    @classmethod
    def from_state(cls, originator_id: UUID, originator_version: int, state: State) -> Self:
        state["originator_id"] = originator_id
        state["originator_version"] = originator_version
        state["timestamp"] = datetime.fromisoformat(state["timestamp"])
        return cast(Self, _new(cls, state))


def _movement_state(state: State, t: Transfer | NewTransfer) -> State:
    """Add the fields that a transfer and a refused transfer share (defaults left out)."""
    state["debit_account_id"] = t.debit_account_id
    state["credit_account_id"] = t.credit_account_id
    state["amount"] = str(t.amount)
    state["asset"] = t.asset
    state["code"] = t.code
    if t.flags:
        state["flags"] = int(t.flags)
    if t.pending_id.int:
        state["pending_id"] = t.pending_id
    if t.timeout_s:
        state["timeout_s"] = t.timeout_s
    if t.references:
        state["references"] = t.references
    return state


def _movement_fields(state: State) -> State:
    """Read back what `_movement_state` wrote (flags as an int)."""
    pending_id = state.get("pending_id")
    references = state.get("references")
    return {
        "debit_account_id": UUID(state["debit_account_id"]),
        "credit_account_id": UUID(state["credit_account_id"]),
        "amount": int(state["amount"]),
        "asset": state["asset"],
        "code": state["code"],
        "flags": state.get("flags", 0),
        "pending_id": NIL_ID if pending_id is None else UUID(pending_id),
        "timeout_s": state.get("timeout_s", 0),
        "references": () if references is None else tuple((k, v) for k, v in references),
    }


def stored_state_of(fact: Fact) -> tuple[UUID, int, type[LedgerEvent], State]:
    """The stream, version, event class and JSON state that record a fact.

    Same result as `event_for(fact)` followed by `to_state()`, without building the event
    object: this is the write path's hot loop.
    """
    # orjson writes UUIDs and datetimes itself (canonical text, ISO 8601).
    if isinstance(fact, Transfer):
        state = _movement_state({"timestamp": fact.recorded_at}, fact)
        if fact.effective_at != fact.recorded_at:
            state["effective_at"] = fact.effective_at
        return fact.id, 1, TransferCreated, state
    if isinstance(fact, Rejection):
        t = fact.transfer
        state = _movement_state(
            {"timestamp": fact.recorded_at, "result": fact.result.name, "shard": fact.shard}, t
        )
        if t.effective_at is not None:
            state["effective_at"] = t.effective_at
        return t.id, 1, TransferRejected, state
    event = event_for(fact)
    return event.originator_id, event.originator_version, type(event), event.to_state()


def event_for(fact: Fact) -> LedgerEvent:
    """The event that records a fact."""
    if isinstance(fact, Transfer):
        return TransferCreated.from_fact(fact)
    if isinstance(fact, Account):
        return AccountOpened.from_fact(fact)
    if isinstance(fact, Rejection):
        return TransferRejected.from_fact(fact)
    return PendingTransferExpired.from_fact(fact)
