"""Stateful property test: random ledger histories against the real writer and PostgreSQL.

A hypothesis `RuleBasedStateMachine` drives a `LedgerWriter` (injected clock) on a fresh
schema per run through random sequences of: opening accounts (two assets; unconstrained,
debits_must_not_exceed_credits, credits_must_not_exceed_debits), single-phase transfers,
pending transfers (some with a timeout), full and partial posts, voids, clock moves (forward
so holds expire, and backward), expire_pending, linked chains (some poisoned so they fail
part-way, some that post or void a hold created earlier in the same chain), transfers naming
unknown accounts or holds (refusals that are recorded), several requests in flight at once
through the writer's pipeline, writer restarts, and retries of earlier requests (identical,
without effective_at, and with a different amount).

Next to the writer runs `Model`: a small, separately written model of the books (plain dicts
of balances, holds, transfers and recorded refusals) that predicts every result code, every
recorded_at and the number of events each request writes. After every step the machine checks:

- per asset, sum(debits_posted) == sum(credits_posted), and the same for the pending sums;
- no account breaks its balance constraint flag;
- the model and the writer agree on every account, transfer, hold and recorded refusal;
- `replay(read_facts(app))` and a fresh `LedgerWriter(app)` rebuild exactly the live state;
- a retry of a settled request answers as before (same recorded_at) and writes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger.config import eventsourcing_env
from ledger.events import BatchCommitted
from ledger.model import (
    NIL_ID,
    AccountFlags,
    CreateAccountResult,
    CreateTransferResult,
    LedgerState,
    NewAccount,
    NewTransfer,
    PendingStatus,
    TransferFlags,
    TransferOutcome,
    replay,
)
from ledger.queries import read_facts
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter
from tests.schemas import create_schema, drop_schema

R = CreateTransferResult
LINKED = TransferFlags.linked
PENDING = TransferFlags.pending
POST = TransferFlags.post_pending_transfer
VOID = TransferFlags.void_pending_transfer
DMNEC = AccountFlags.debits_must_not_exceed_credits
CMNED = AccountFlags.credits_must_not_exceed_debits
ASSETS = ("AETH", "USDX")
ACCOUNT_FLAGS = (AccountFlags.none, DMNEC, CMNED)
TICK = timedelta(microseconds=1)
START = datetime(2030, 1, 1, tzinfo=UTC)
EFFECTIVE_AT = datetime(2029, 12, 31, 23, 59, 59, 123456, tzinfo=UTC)

TRANSIENT = frozenset(
    {
        R.debit_account_not_found,
        R.credit_account_not_found,
        R.pending_transfer_not_found,
        R.overflows_debits,
        R.overflows_credits,
        R.exceeds_credits,
        R.exceeds_debits,
    }
)
"""Refusals that depend on the ledger's state: recorded, so a retry gets the same answer."""
COMMAND_FIELDS = (
    ("flags", R.exists_with_different_flags),
    ("debit_account_id", R.exists_with_different_debit_account_id),
    ("credit_account_id", R.exists_with_different_credit_account_id),
    ("amount", R.exists_with_different_amount),
    ("pending_id", R.exists_with_different_pending_id),
    ("timeout_s", R.exists_with_different_timeout),
    ("asset", R.exists_with_different_asset),
    ("code", R.exists_with_different_code),
    ("references", R.exists_with_different_references),
    ("effective_at", R.exists_with_different_effective_at),
)
"""How a command is compared with a refused one of the same id, in order (a retry may leave
effective_at out)."""

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- the independent model ------------------------------------------------------------------


@dataclass
class MAccount:
    asset: str
    code: int
    flags: AccountFlags
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0

    def balances(self) -> tuple[int, int, int, int]:
        return (self.debits_pending, self.debits_posted, self.credits_pending, self.credits_posted)


@dataclass
class MTransfer:
    command: NewTransfer
    debit: UUID
    credit: UUID
    amount: int
    recorded_at: datetime


@dataclass
class MHold:
    debit: UUID
    credit: UUID
    amount: int
    asset: str
    code: int
    expires_at: datetime | None
    status: PendingStatus = PendingStatus.pending


@dataclass
class Model:
    """What the books should hold, kept from the commands alone."""

    accounts: dict[UUID, MAccount] = field(default_factory=dict)
    transfers: dict[UUID, MTransfer] = field(default_factory=dict)
    holds: dict[UUID, MHold] = field(default_factory=dict)
    rejected: dict[UUID, tuple[NewTransfer, R, datetime]] = field(default_factory=dict)
    """Transfers refused for a state-dependent reason: their ids are spent."""
    last: datetime | None = None
    facts: int = 0
    """Events (accounts, transfers, rejections, expiries) that should be in the log, the
    BatchCommitted events aside."""

    def tick(self, now: datetime) -> datetime:
        at = now if self.last is None or now > self.last else self.last + TICK
        self.last = at
        self.facts += 1
        return at

    def open(self, c: NewAccount, now: datetime) -> CreateAccountResult:
        existing = self.accounts.get(c.id)
        if existing is not None:
            if existing.flags != c.flags:
                return CreateAccountResult.exists_with_different_flags
            if existing.asset != c.asset:
                return CreateAccountResult.exists_with_different_asset
            if existing.code != c.code:
                return CreateAccountResult.exists_with_different_code
            return CreateAccountResult.ok
        self.tick(now)
        self.accounts[c.id] = MAccount(c.asset, c.code, c.flags)
        return CreateAccountResult.ok

    def expire(self, now: datetime) -> None:
        for hold in self.holds.values():
            if (
                hold.status is PendingStatus.pending
                and hold.expires_at is not None
                and hold.expires_at <= now
            ):
                hold.status = PendingStatus.expired
                self.accounts[hold.debit].debits_pending -= hold.amount
                self.accounts[hold.credit].credits_pending -= hold.amount
                self.tick(now)

    def create(self, commands: list[NewTransfer], now: datetime) -> list[tuple[R, datetime | None]]:
        """Expected (result, recorded_at) per command; applies the accepted ones."""
        self.expire(now)
        out: list[tuple[R, datetime | None]] = []
        chain_start: int | None = None
        saved: Model | None = None
        failed = False
        for i, c in enumerate(commands):
            linked = bool(c.flags & LINKED)
            if chain_start is None and linked:
                chain_start, saved, failed = i, copy.deepcopy(self), False
            if linked and i == len(commands) - 1:
                result = R.linked_event_chain_open
            elif failed:
                result = R.linked_event_failed
            else:
                result, recorded_at = self.decide(c, now)
                if result is R.ok:
                    out.append((result, recorded_at))
                    if chain_start is not None and not linked:
                        chain_start = None
                    continue
            if chain_start is not None and not failed:
                failed = True
                assert saved is not None
                self.__dict__.update(saved.__dict__)  # the whole chain is undone
                for j in range(chain_start, i):
                    out[j] = (R.linked_event_failed, None)
            out.append(self.reject(c, result, now))
            if chain_start is not None and not linked:
                chain_start, failed = None, False
        return out

    def reject(self, c: NewTransfer, result: R, now: datetime) -> tuple[R, datetime | None]:
        """A state-dependent rejection is recorded (once); a retry gets its recorded_at."""
        earlier = self.rejected.get(c.id)
        if earlier is not None:
            return result, earlier[2] if result is earlier[1] else None
        if result not in TRANSIENT:
            return result, None
        recorded_at = self.tick(now)
        self.rejected[c.id] = (c, result, recorded_at)
        return result, recorded_at

    def decide(self, c: NewTransfer, now: datetime) -> tuple[R, datetime | None]:
        existing = self.transfers.get(c.id)
        if existing is not None:
            result = self.compare(c, existing)
            return result, existing.recorded_at if result is R.ok else None
        refused = self.rejected.get(c.id)
        if refused is not None:
            command, result, _ = refused
            for name, different in COMMAND_FIELDS:
                value = getattr(c, name)
                if value != getattr(command, name) and not (
                    name == "effective_at" and value is None
                ):
                    return different, None
            return result, None
        resolving = bool(c.flags & (POST | VOID))
        debit_id, credit_id = c.debit_account_id, c.credit_account_id
        hold = None
        if resolving:
            hold = self.holds.get(c.pending_id)
            if hold is None:
                if c.pending_id in self.transfers:
                    return R.pending_transfer_not_pending, None
                return R.pending_transfer_not_found, None
            debit_id = hold.debit if debit_id == NIL_ID else debit_id
            credit_id = hold.credit if credit_id == NIL_ID else credit_id
        debit, credit = self.accounts.get(debit_id), self.accounts.get(credit_id)
        if debit is None:
            return R.debit_account_not_found, None
        if credit is None:
            return R.credit_account_not_found, None
        if debit.asset != credit.asset:
            return R.accounts_must_have_the_same_asset, None
        if c.asset != debit.asset:
            return R.transfer_must_have_the_same_asset_as_accounts, None
        amount = c.amount
        if hold is not None:
            if debit_id != hold.debit:
                return R.pending_transfer_has_different_debit_account_id, None
            if credit_id != hold.credit:
                return R.pending_transfer_has_different_credit_account_id, None
            if c.asset != hold.asset:
                return R.pending_transfer_has_different_asset, None
            if c.code != hold.code:
                return R.pending_transfer_has_different_code, None
            if c.flags & POST:
                if amount > hold.amount:
                    return R.exceeds_pending_transfer_amount, None
            elif amount not in (0, hold.amount):
                return R.pending_transfer_has_different_amount, None
            if hold.status is not PendingStatus.pending:
                return {
                    PendingStatus.posted: R.pending_transfer_already_posted,
                    PendingStatus.voided: R.pending_transfer_already_voided,
                    PendingStatus.expired: R.pending_transfer_expired,
                }[hold.status], None
            if c.flags & VOID:
                amount = hold.amount
        else:
            if debit.flags & DMNEC and (
                debit.debits_pending + debit.debits_posted + amount > debit.credits_posted
            ):
                return R.exceeds_credits, None
            if credit.flags & CMNED and (
                credit.credits_pending + credit.credits_posted + amount > credit.debits_posted
            ):
                return R.exceeds_debits, None

        recorded_at = self.tick(now)
        if c.flags & PENDING:
            debit.debits_pending += amount
            credit.credits_pending += amount
            expires_at = recorded_at + timedelta(seconds=c.timeout_s) if c.timeout_s else None
            self.holds[c.id] = MHold(debit_id, credit_id, amount, c.asset, c.code, expires_at)
        elif hold is not None:
            debit.debits_pending -= hold.amount
            credit.credits_pending -= hold.amount
            if c.flags & POST:
                debit.debits_posted += amount
                credit.credits_posted += amount
                hold.status = PendingStatus.posted
            else:
                hold.status = PendingStatus.voided
        else:
            debit.debits_posted += amount
            credit.credits_posted += amount
        self.transfers[c.id] = MTransfer(c, debit_id, credit_id, amount, recorded_at)
        return R.ok, recorded_at

    @staticmethod
    def compare(c: NewTransfer, e: MTransfer) -> R:
        o = e.command
        resolving = bool(c.flags & (POST | VOID))
        if c.flags != o.flags:
            return R.exists_with_different_flags
        if c.debit_account_id != e.debit and not (resolving and c.debit_account_id == NIL_ID):
            return R.exists_with_different_debit_account_id
        if c.credit_account_id != e.credit and not (resolving and c.credit_account_id == NIL_ID):
            return R.exists_with_different_credit_account_id
        if c.amount != e.amount and not (c.flags & VOID and c.amount == 0):
            return R.exists_with_different_amount
        if c.pending_id != o.pending_id:
            return R.exists_with_different_pending_id
        if c.timeout_s != o.timeout_s:
            return R.exists_with_different_timeout
        if c.asset != o.asset:
            return R.exists_with_different_asset
        if c.code != o.code:
            return R.exists_with_different_code
        if c.references != o.references:
            return R.exists_with_different_references
        if c.effective_at is not None and c.effective_at != (o.effective_at or e.recorded_at):
            return R.exists_with_different_effective_at
        return R.ok


# -- the machine ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class Sent:
    commands: tuple[NewTransfer, ...]
    outcomes: tuple[TransferOutcome, ...]

    @property
    def settled(self) -> bool:
        """Every command was accepted, or refused for a reason that was recorded."""
        return bool(self.outcomes) and all(o.recorded_at is not None for o in self.outcomes)


def balances_of(state: LedgerState) -> dict[UUID, tuple[int, int, int, int]]:
    return {i: a.balances() for i, a in state.accounts.items()}


class LedgerMachine(RuleBasedStateMachine):
    database_url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.schema = create_schema(self.database_url)
        try:
            self.app = LedgerApplication(env=eventsourcing_env(self.database_url, self.schema, 2))
        except BaseException:
            self.drop_schema()
            raise
        self.clock = Clock()
        self.writer = LedgerWriter(self.app, clock=self.clock)
        self.model = Model()
        self.serial = 0
        self.sent: list[Sent] = []
        self.pending_ids: list[UUID] = []  # every pending command ever sent, accepted or not

    def teardown(self) -> None:
        self.app.close()
        self.drop_schema()

    def drop_schema(self) -> None:
        drop_schema(self.database_url, self.schema)

    # -- helpers ----------------------------------------------------------------------------

    def new_id(self, kind: int) -> UUID:
        self.serial += 1
        return UUID(int=(kind << 64) | self.serial)

    def log_position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def events_since(self, position: int) -> int:
        return len(
            self.app.recorder.select_notifications(
                start=position, limit=10_000, inclusive_of_start=False
            )
        )

    def expected_events(self, facts_before: int) -> int:
        new_facts = self.model.facts - facts_before
        return new_facts + 1 if new_facts else 0  # plus the batch's BatchCommitted

    def due_expiries(self) -> int:
        now = self.clock.now
        return sum(
            1
            for h in self.model.holds.values()
            if h.status is PendingStatus.pending
            and h.expires_at is not None
            and h.expires_at <= now
        )

    def open(self, commands: list[NewAccount]) -> list[CreateAccountResult]:
        position, facts = self.log_position(), self.model.facts
        expected = [self.model.open(c, self.clock.now) for c in commands]
        results = self.writer.open_accounts(commands)
        assert results == expected
        assert self.events_since(position) == self.expected_events(facts)
        return results

    def submit(self, commands: list[NewTransfer]) -> list[TransferOutcome]:
        note(f"at {self.clock.now.isoformat()} submit {commands}")
        position, facts = self.log_position(), self.model.facts
        expected = self.model.create(commands, self.clock.now)
        outcomes = self.writer.create_transfers(commands)
        self.check_answer(commands, outcomes, expected)
        assert self.events_since(position) == self.expected_events(facts)
        return outcomes

    def check_answer(
        self,
        commands: list[NewTransfer],
        outcomes: list[TransferOutcome],
        expected: list[tuple[R, datetime | None]],
    ) -> None:
        note(f"  -> {[o.result.name for o in outcomes]}")
        for o in outcomes:
            event(f"result: {o.result.name}")
        assert [o.id for o in outcomes] == [c.id for c in commands]
        assert [(o.result, o.recorded_at) for o in outcomes] == expected
        if commands:
            self.sent.append(Sent(tuple(commands), tuple(outcomes)))
        self.pending_ids.extend(c.id for c in commands if c.flags & PENDING)

    def pairs(self, same_asset: bool) -> list[tuple[UUID, UUID]]:
        accounts = self.model.accounts
        return [
            (d, c)
            for d in accounts
            for c in accounts
            if d != c and (accounts[d].asset == accounts[c].asset) == same_asset
        ]

    def open_holds(self) -> list[UUID]:
        return [i for i, h in self.model.holds.items() if h.status is PendingStatus.pending]

    def has_pair(self) -> bool:
        return bool(self.pairs(same_asset=True))

    def draw_plain(self, data: st.DataObject, *, pending: bool) -> NewTransfer:
        cross = data.draw(st.integers(0, 19), label="cross-asset?") == 19 and self.pairs(False)
        pairs = self.pairs(same_asset=not cross)
        # Constrained accounts need money in before they can move any: bias towards
        # funding them, and towards using the room they have.
        focus = data.draw(st.sampled_from(["any", "any", "fund", "spend"]), label="focus")
        accounts = self.model.accounts
        if focus == "fund":
            funding = [
                (d, c) for d, c in pairs if accounts[c].flags & DMNEC or accounts[d].flags & CMNED
            ]
            pairs = funding or pairs
        elif focus == "spend":
            spending = [(d, c) for d, c in pairs if (self.room(d, c) or 0) > 0]
            pairs = spending or pairs
        debit, credit = data.draw(st.sampled_from(pairs), label="pair")
        timeout = 0
        if pending:
            timeout = data.draw(st.sampled_from([0, 0, 0, 1, 2, 5, 30, 600]), label="timeout_s")
        extras = data.draw(st.integers(0, 5), label="extras")
        amount = self.draw_amount(data, debit, credit)
        asset = self.model.accounts[debit].asset
        stray = data.draw(st.integers(0, 29), label="unknown account?")
        if stray == 29:
            debit = self.new_id(8)  # never opened: debit_account_not_found
        elif stray == 28:
            credit = self.new_id(8)  # credit_account_not_found
        return NewTransfer(
            id=self.new_id(2),
            debit_account_id=debit,
            credit_account_id=credit,
            amount=amount,
            asset=asset,
            code=data.draw(st.sampled_from([1, 2]), label="code"),
            flags=PENDING if pending else TransferFlags.none,
            timeout_s=timeout,
            references=(("lease", f"L{self.serial}"), ("epoch", "7")) if extras == 1 else (),
            effective_at=EFFECTIVE_AT if extras == 2 else None,
        )

    def draw_amount(self, data: st.DataObject, debit: UUID, credit: UUID) -> int:
        """Mostly small amounts; sometimes exactly the room a constrained account has left,
        or one more than that."""
        room = self.room(debit, credit)
        how = data.draw(st.sampled_from(["any", "any", "room", "room + 1"]), label="amount?")
        if room is not None and room > 0 and how != "any":
            return room + (how == "room + 1")
        return data.draw(st.integers(1, 300), label="amount")

    def room(self, debit: UUID, credit: UUID) -> int | None:
        """The most a transfer debit -> credit may move under the accounts' constraints."""
        d, c = self.model.accounts[debit], self.model.accounts[credit]
        rooms = []
        if d.flags & DMNEC:
            rooms.append(d.credits_posted - d.debits_posted - d.debits_pending)
        if c.flags & CMNED:
            rooms.append(c.debits_posted - c.credits_posted - c.credits_pending)
        return min(rooms) if rooms else None

    def draw_resolve(
        self, data: st.DataObject, flag: TransferFlags, pending_id: UUID | None = None
    ) -> NewTransfer:
        if pending_id is None:
            open_holds = self.open_holds()
            choice = data.draw(st.integers(0, 19), label="target")
            if choice < 14 and open_holds:
                pending_id = data.draw(st.sampled_from(open_holds), label="open hold")
            elif choice < 17 and self.model.holds:
                pending_id = data.draw(st.sampled_from(list(self.model.holds)), label="any hold")
            elif choice < 18 and self.pending_ids:  # accepted or not
                pending_id = data.draw(st.sampled_from(self.pending_ids), label="pending id")
            elif choice < 19 and self.model.transfers:  # maybe not a pending transfer at all
                pending_id = data.draw(st.sampled_from(list(self.model.transfers)), label="id")
            else:
                pending_id = self.new_id(9)  # never existed
        hold = self.model.holds.get(pending_id)
        if hold is None:  # unknown to the model: it must fail on lookup
            return self.resolve_unknown(data, flag, pending_id, kind=3)
        explicit = data.draw(st.integers(0, 9), label="accounts")
        debit, credit = NIL_ID, NIL_ID
        if 4 <= explicit <= 8:
            debit, credit = hold.debit, hold.credit
        elif explicit == 9:
            debit, credit = hold.credit, hold.debit  # the wrong way round
        code = hold.code if data.draw(st.integers(0, 14), label="code?") < 14 else hold.code + 1
        if flag & POST:
            how = data.draw(st.sampled_from(["full", "full", "partial", "partial", "over"]))
            amount = hold.amount + (how == "over")
            if how == "partial":
                amount = data.draw(st.integers(1, hold.amount), label="partial")
        else:
            amount = data.draw(st.sampled_from([0, 0, hold.amount, hold.amount + 1]))
        return NewTransfer(
            self.new_id(3), debit, credit, amount, hold.asset, code, flag, pending_id
        )

    def draw_poison(self, data: st.DataObject) -> NewTransfer:
        """A transfer that must fail (exceeds_credits, or post of an unknown hold)."""
        constrained = [(d, c) for d, c in self.pairs(True) if self.model.accounts[d].flags & DMNEC]
        if constrained and data.draw(st.booleans(), label="overdraw?"):
            debit, credit = data.draw(st.sampled_from(constrained), label="overdraw")
            a = self.model.accounts[debit]
            available = a.credits_posted - a.debits_posted - a.debits_pending
            return NewTransfer(self.new_id(4), debit, credit, available + 10_000, a.asset, 1)
        return self.resolve_unknown(data, POST, self.new_id(9), kind=4)

    def resolve_unknown(
        self, data: st.DataObject, flag: TransferFlags, pending_id: UUID, kind: int
    ) -> NewTransfer:
        """A post or void of a hold that does not exist (pending_transfer_not_found or
        pending_transfer_not_pending; a refusal that is recorded in the first case)."""
        debit, credit = NIL_ID, NIL_ID  # the hold's accounts, if there were one
        if data.draw(st.booleans(), label="name the accounts?"):
            debit, credit = data.draw(st.sampled_from(self.pairs(same_asset=True)), label="pair")
        asset = ASSETS[0] if debit == NIL_ID else self.model.accounts[debit].asset
        return NewTransfer(self.new_id(kind), debit, credit, 1, asset, 1, flag, pending_id)

    # -- rules: accounts --------------------------------------------------------------------

    @initialize(
        specs=st.lists(
            st.tuples(st.sampled_from(ASSETS), st.sampled_from(ACCOUNT_FLAGS)),
            min_size=2,
            max_size=5,
        )
    )
    def open_the_first_accounts(self, specs: list[tuple[str, AccountFlags]]) -> None:
        # At least two unconstrained AETH accounts so money can start moving at once.
        specs = [("AETH", AccountFlags.none), ("AETH", AccountFlags.none), *specs]
        commands = [NewAccount(self.new_id(1), a, 1 + i % 3, f) for i, (a, f) in enumerate(specs)]
        assert all(r is CreateAccountResult.ok for r in self.open(commands))

    @rule(
        data=st.data(),
        how=st.sampled_from(["new", "new", "same", "flags", "asset"]),
        asset=st.sampled_from(ASSETS),
        flags=st.sampled_from(ACCOUNT_FLAGS),
    )
    def open_an_account_or_reopen_one(
        self, data: st.DataObject, how: str, asset: str, flags: AccountFlags
    ) -> None:
        if how == "new":
            [result] = self.open([NewAccount(self.new_id(1), asset, 1, flags)])
            assert result is CreateAccountResult.ok
            return
        account_id = data.draw(st.sampled_from(sorted(self.model.accounts)), label="account")
        a = self.model.accounts[account_id]
        flags = a.flags if how != "flags" else ACCOUNT_FLAGS[(ACCOUNT_FLAGS.index(a.flags) + 1) % 3]
        asset = a.asset if how != "asset" else ASSETS[(ASSETS.index(a.asset) + 1) % 2]
        position = self.log_position()
        [result] = self.open([NewAccount(account_id, asset, a.code, flags)])
        assert (
            result
            is {
                "same": CreateAccountResult.ok,
                "flags": CreateAccountResult.exists_with_different_flags,
                "asset": CreateAccountResult.exists_with_different_asset,
            }[how]
        )
        assert self.log_position() == position

    # -- rules: transfers -------------------------------------------------------------------

    @precondition(lambda self: self.has_pair())
    @rule(
        data=st.data(),
        count=st.integers(1, 3),
        repeat=st.sampled_from(["no", "no", "no", "same", "different amount"]),
    )
    def make_single_phase_transfers(self, data: st.DataObject, count: int, repeat: str) -> None:
        """Independent transfers in one request; maybe the first one again at the end."""
        batch = [self.draw_plain(data, pending=False) for _ in range(count)]
        if repeat == "same":
            batch.append(batch[0])
        elif repeat == "different amount":
            batch.append(dataclasses.replace(batch[0], amount=batch[0].amount + 1))
        outcomes = self.submit(batch)
        if repeat == "same":
            assert outcomes[-1] == outcomes[0]
        elif repeat == "different amount" and outcomes[0].recorded_at is not None:
            # accepted, or refused and recorded: the id is spent
            assert outcomes[-1].result is R.exists_with_different_amount

    @precondition(lambda self: self.has_pair())
    @rule(data=st.data(), count=st.integers(1, 3))
    def make_pending_transfers(self, data: st.DataObject, count: int) -> None:
        self.submit([self.draw_plain(data, pending=True) for _ in range(count)])

    @precondition(lambda self: bool(self.open_holds()))
    @rule(data=st.data())
    def post_a_pending_transfer(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(self.open_holds()), label="open hold")
        self.submit([self.draw_resolve(data, POST, target)])

    @precondition(lambda self: bool(self.open_holds()))
    @rule(data=st.data())
    def void_a_pending_transfer(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(self.open_holds()), label="open hold")
        self.submit([self.draw_resolve(data, VOID, target)])

    @precondition(lambda self: bool(self.pending_ids))
    @rule(data=st.data(), flag=st.sampled_from([POST, VOID]))
    def post_or_void_any_earlier_transfer(self, data: st.DataObject, flag: TransferFlags) -> None:
        """Resolved, expired, rejected, not pending at all, or never sent."""
        self.submit([self.draw_resolve(data, flag)])

    @precondition(lambda self: self.has_pair())
    @rule(data=st.data())
    def submit_a_linked_chain(self, data: st.DataObject) -> None:
        size = data.draw(st.integers(2, 4), label="chain size")
        # About a third of the chains get one member that must fail, anywhere in the chain.
        poison_at = data.draw(st.integers(0, 3 * size - 1), label="poison at")
        chain: list[NewTransfer] = []
        for i in range(size):
            if i == poison_at:
                chain.append(self.draw_poison(data))
                continue
            kinds = ["plain", "plain", "pending", "pending"]
            if self.pending_ids:
                kinds += ["post", "void"]
            if any(c.flags & PENDING for c in chain):
                kinds += ["resolve_own", "resolve_own"]
            kind = data.draw(st.sampled_from(kinds), label="member")
            if kind == "plain":
                chain.append(self.draw_plain(data, pending=False))
            elif kind == "pending":
                chain.append(self.draw_plain(data, pending=True))
            elif kind in ("post", "void"):
                chain.append(self.draw_resolve(data, POST if kind == "post" else VOID))
            else:
                own = [c for c in chain if c.flags & PENDING]
                target = data.draw(st.sampled_from(own), label="own hold")
                flag = data.draw(st.sampled_from([POST, VOID]), label="resolve")
                amount = target.amount if flag & POST else 0
                chain.append(
                    NewTransfer(
                        self.new_id(3),
                        NIL_ID,
                        NIL_ID,
                        amount,
                        target.asset,
                        target.code,
                        flag,
                        target.id,
                    )
                )
        open_end = data.draw(st.integers(0, 14), label="open end?") == 14
        chain = [
            dataclasses.replace(c, flags=c.flags | LINKED) if i < size - 1 or open_end else c
            for i, c in enumerate(chain)
        ]
        before = [self.draw_plain(data, pending=False)] if data.draw(st.booleans()) else []
        # A transfer after an open chain would close it: only a closed chain gets one.
        after = (
            [self.draw_plain(data, pending=False)]
            if not open_end and data.draw(st.booleans())
            else []
        )
        outcomes = self.submit(before + chain + after)
        inner = outcomes[len(before) : len(before) + size]
        # All or nothing, whatever the model says.
        assert all(o.ok for o in inner) or not any(o.ok for o in inner)
        if open_end:
            assert not any(o.ok for o in inner)

    @precondition(lambda self: self.has_pair())
    @rule(data=st.data(), count=st.integers(2, 4))
    def submit_several_requests_at_once_through_the_pipeline(
        self, data: st.DataObject, count: int
    ) -> None:
        """The writer's decider and committer threads group requests in flight into batches;
        each request still gets exactly the answer it would get on its own, in order."""
        requests: list[list[NewTransfer]] = []
        for _ in range(count):
            kinds = ["plain", "pending"]
            kinds += ["hold"] * bool(self.open_holds()) + ["again"] * bool(self.sent)
            kind = data.draw(st.sampled_from(kinds), label="request")
            if kind == "hold":
                target = data.draw(st.sampled_from(self.open_holds()), label="open hold")
                flag = data.draw(st.sampled_from([POST, VOID]), label="resolve")
                requests.append([self.draw_resolve(data, flag, target)])
            elif kind == "again":
                requests.append(list(data.draw(st.sampled_from(self.sent), label="sent").commands))
            else:
                size = data.draw(st.integers(1, 2), label="size")
                requests.append(
                    [self.draw_plain(data, pending=kind == "pending") for _ in range(size)]
                )
        note(f"at {self.clock.now.isoformat()} pipeline {requests}")
        position, facts = self.log_position(), self.model.facts
        expected = [self.model.create(r, self.clock.now) for r in requests]
        self.writer.start()
        try:
            futures = [self.writer.submit(r) for r in requests]
            answers = [f.result(timeout=60) for f in futures]
        finally:
            self.writer.stop()
        for commands, outcomes, wanted in zip(requests, answers, expected, strict=True):
            self.check_answer(commands, outcomes, wanted)
        written = self.app.recorder.select_notifications(
            start=position, limit=10_000, inclusive_of_start=False
        )
        batches = sum(n.topic.endswith(BatchCommitted.__qualname__) for n in written)
        assert len(written) - batches == self.model.facts - facts
        assert (batches == 0) == (self.model.facts == facts)
        assert batches <= count

    # -- rules: time ------------------------------------------------------------------------

    @rule(seconds=st.sampled_from([1, 2, 3, 5, 10, 30, 61, 3600, -1, -5]))
    def move_the_clock_forward_or_a_little_back(self, seconds: int) -> None:
        self.clock.now += timedelta(seconds=seconds)

    def timeouts(self) -> list[datetime]:
        holds = self.model.holds.values()
        return sorted(
            h.expires_at for h in holds if h.expires_at and h.status is PendingStatus.pending
        )

    @precondition(lambda self: bool(self.timeouts()))
    @rule(data=st.data(), early=st.booleans(), expire=st.booleans())
    def set_the_clock_to_the_edge_of_a_timeout(
        self, data: st.DataObject, early: bool, expire: bool
    ) -> None:
        """Exactly when a hold expires (it expires), or a microsecond before (it does not)."""
        edge = data.draw(st.sampled_from(self.timeouts()), label="expires_at")
        self.clock.now = edge - TICK if early else edge
        if expire:
            self.expire_pending_transfers()

    @rule()
    def expire_pending_transfers(self) -> None:
        due = self.due_expiries()
        position = self.log_position()
        assert self.submit([]) == []
        assert self.writer.expire_pending() == []  # nothing left due
        assert self.events_since(position) == (due + 1 if due else 0)

    # -- rules: restarts and retries --------------------------------------------------------

    @rule()
    def restart_the_writer(self) -> None:
        self.writer = LedgerWriter(self.app, clock=self.clock)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), settled=st.booleans(), without_effective_at=st.booleans())
    def resend_an_earlier_request_unchanged(
        self, data: st.DataObject, settled: bool, without_effective_at: bool
    ) -> None:
        """A request whose every transfer was accepted (or refused, and the refusal recorded)
        is answered exactly as before, original recorded_at included, and writes nothing,
        also when the retry leaves effective_at out; any other is decided again (the model
        says how)."""
        done = [s for s in self.sent if s.settled]
        sent = data.draw(st.sampled_from(done if settled and done else self.sent), label="request")
        commands = list(sent.commands)
        if without_effective_at:
            commands = [dataclasses.replace(c, effective_at=None) for c in commands]
        due = self.due_expiries()
        position = self.log_position()
        outcomes = self.submit(commands)
        if sent.settled:
            assert outcomes == list(sent.outcomes)
            assert self.events_since(position) == (due + 1 if due else 0)

    @precondition(lambda self: any(s.settled for s in self.sent))
    @rule(data=st.data(), delta=st.integers(1, 50))
    def retry_a_settled_transfer_with_a_different_amount(
        self, data: st.DataObject, delta: int
    ) -> None:
        """Its id is spent, accepted or refused: exists_with_different_amount, nothing written."""
        sent = data.draw(st.sampled_from([s for s in self.sent if s.settled]), label="request")
        index = data.draw(st.integers(0, len(sent.commands) - 1), label="member")
        original = sent.commands[index]
        accepted = self.model.transfers.get(original.id)
        stored = original.amount if accepted is None else accepted.amount
        changed = dataclasses.replace(original, amount=max(stored, original.amount) + delta)
        batch = [changed]
        if changed.flags & LINKED:  # close the chain with its (identical) last member
            batch.append(next(c for c in sent.commands[index:] if not c.flags & LINKED))
        due = self.due_expiries()
        position = self.log_position()
        outcomes = self.submit(batch)
        assert outcomes[0].result is R.exists_with_different_amount
        assert outcomes[0].recorded_at is None
        assert all(o.result is R.linked_event_failed for o in outcomes[1:])
        assert self.events_since(position) == (due + 1 if due else 0)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def every_asset_balances(self) -> None:
        sums: dict[str, list[int]] = {}
        for a in self.writer.state.accounts.values():
            s = sums.setdefault(a.asset, [0, 0, 0, 0])
            for k, v in enumerate(a.balances()):
                s[k] += v
        for asset, (dp, dpo, cp, cpo) in sums.items():
            assert dpo == cpo, f"{asset}: debits_posted {dpo} != credits_posted {cpo}"
            assert dp == cp, f"{asset}: debits_pending {dp} != credits_pending {cp}"
        for asset, (d, c) in self.writer.state.trial_balance().items():
            assert d == c, asset

    @invariant()
    def no_account_breaks_its_balance_constraint(self) -> None:
        for a in self.writer.state.accounts.values():
            assert min(a.balances()) >= 0, a
            if a.flags & DMNEC:
                assert a.debits_pending + a.debits_posted <= a.credits_posted, a
            if a.flags & CMNED:
                assert a.credits_pending + a.credits_posted <= a.debits_posted, a

    @invariant()
    def the_writer_agrees_with_the_independent_model(self) -> None:
        state = self.writer.state
        assert state.accounts.keys() == self.model.accounts.keys()
        for account_id, m in self.model.accounts.items():
            a = state.accounts[account_id]
            assert (a.asset, a.code, a.flags) == (m.asset, m.code, m.flags)
            assert a.balances() == m.balances(), (account_id, a, m)
        assert state.transfers.keys() == self.model.transfers.keys()
        for transfer_id, mt in self.model.transfers.items():
            t = state.transfers[transfer_id]
            assert (t.debit_account_id, t.credit_account_id, t.amount, t.recorded_at) == (
                mt.debit,
                mt.credit,
                mt.amount,
                mt.recorded_at,
            )
        for hold_id, hold in self.model.holds.items():
            assert state.pending_status(hold_id) is hold.status, hold_id
        assert {i: (r.transfer, r.result, r.recorded_at) for i, r in state.rejected.items()} == (
            self.model.rejected
        )
        assert state.last_recorded_at == self.model.last

    @invariant()
    def the_stored_events_rebuild_exactly_the_live_state(self) -> None:
        live = self.writer.state
        for rebuilt in (replay(read_facts(self.app)), LedgerWriter(self.app).state):
            assert rebuilt.accounts == live.accounts
            assert balances_of(rebuilt) == balances_of(live)
            assert rebuilt.transfers == live.transfers
            assert rebuilt.rejected == live.rejected
            assert {i: rebuilt.pending_status(i) for i in live.transfers} == {
                i: live.pending_status(i) for i in live.transfers
            }
            assert {t.id for t in rebuilt.pending_holds()} == {t.id for t in live.pending_holds()}
            assert rebuilt.last_recorded_at == live.last_recorded_at
        fresh = LedgerWriter(self.app)
        position = self.log_position()
        assert (fresh.batch_number, fresh.position) == (self.writer.batch_number, position)
        assert self.writer.position == position


def test_random_ledger_histories_keep_the_books_balanced_and_replay_exactly(
    database_url: str,
) -> None:
    LedgerMachine.database_url = database_url
    run_state_machine_as_test(LedgerMachine, settings=SETTINGS)


def test_a_recorded_refusal_of_a_transfer_naming_no_debit_account_survives_a_restart(
    ledger_app: LedgerApplication,
) -> None:
    """Found by the machine above: such refusals were dropped on replay, and a retry after a
    restart collided with the stored refusal and wedged the writer (WriterRaceLostError)."""
    clock = Clock()
    writer = LedgerWriter(ledger_app, clock=clock)
    a, b, hold, post_id, unknown, transfer_id = (UUID(int=i) for i in range(1, 7))
    writer.open_accounts([NewAccount(a, "AETH", 1), NewAccount(b, "AETH", 1)])
    post = NewTransfer(post_id, NIL_ID, NIL_ID, 5, "AETH", 1, POST, hold)  # accounts: the hold's
    stray = NewTransfer(transfer_id, unknown, b, 5, "AETH", 1)
    first = writer.create_transfers([post, stray])
    assert [o.result for o in first] == [R.pending_transfer_not_found, R.debit_account_not_found]
    assert all(o.recorded_at is not None for o in first)  # recorded: the ids are spent
    assert writer.create_transfers([post, stray]) == first

    assert replay(read_facts(ledger_app)).rejected == writer.state.rejected
    restarted = LedgerWriter(ledger_app, clock=clock)
    assert restarted.state.rejected == writer.state.rejected
    assert restarted.create_transfers([post, stray]) == first
