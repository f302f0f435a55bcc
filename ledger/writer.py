"""The write path: one writer per ledger shard, with group commit.

A `LedgerWriter` keeps the shard's `LedgerState` in memory, decides each request against
it, and commits the resulting events for many requests in one Postgres transaction (group
commit). Every commit also appends the next `BatchCommitted` event to the shard's stream;
the events table's unique (originator_id, originator_version) key lets exactly one of two
writers that decided on the same view of the shard commit. The loser rolls its decisions
back, reads what the winner wrote, and decides again. So two processes racing to spend the
same funds can never both succeed, and nothing is half-written.

Concurrent clients call `submit()` (thread-safe, bounded queue). Two threads then form a
pipeline: the decider drains the queue into batches of at most BATCH_SIZE_MAX requests'
commands and decides them; the committer writes each decided batch while the decider
already decides the next one on top of it (at most PIPELINE_DEPTH_MAX batches decided and not
yet committed). Answers are released only after their batch committed, in order. If a commit
fails, that batch and every batch decided after it are rolled back and decided again.
"""

from __future__ import annotations

import gc
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent

from ledger.errors import WriterRaceLostError, WriterStateError, WriterStoppedError
from ledger.events import BatchCommitted, LedgerEvent, shard_stream_id
from ledger.limits import (
    BATCH_SIZE_MAX,
    CATCH_UP_PAGE_SIZE,
    COMMIT_RETRIES_MAX,
    PIPELINE_DEPTH_MAX,
    QUEUE_DEPTH_MAX,
    RACE_BACKOFF_S_MAX,
)
from ledger.model import (
    Account,
    CreateAccountResult,
    CreateTransferResult,
    Fact,
    LedgerState,
    NewAccount,
    NewTransfer,
    TransferOutcome,
)
from ledger.queries import read_events
from ledger.store import AppendOnlyRecorder, LedgerApplication

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class AtomicOutcome:
    """The answer to `LedgerWriter.execute`: every account and transfer result, and whether
    all of it (and the events that came with it) was applied. When not, nothing was."""

    accounts: list[CreateAccountResult]
    transfers: list[TransferOutcome]
    applied: bool

    def first_failure(self) -> CreateAccountResult | TransferOutcome | None:
        """The first result that is not ok, skipping the linked_event_failed that a failing
        link causes in the rest of its chain; None when everything applied."""
        for result in self.accounts:
            if result is not CreateAccountResult.ok:
                return result
        failed = [o for o in self.transfers if not o.ok]
        for outcome in failed:
            if outcome.result is not CreateTransferResult.linked_event_failed:
                return outcome
        return failed[0] if failed else None


@dataclass(slots=True)
class _Decided:
    """A batch decided against the in-memory state, not yet committed."""

    requests: list[_Request]
    answers: list[Any]
    stored: list[StoredEvent]
    """Its events, ending with the shard stream's BatchCommitted; empty if nothing changed."""
    batch_number: int
    """The batch number it claims (only meaningful when stored is not empty)."""
    undo_start: int
    undo_end: int
    also: list[tuple[AppendOnlyRecorder, list[StoredEvent]]]
    """Events of other tables that atomic requests brought, committed in the same
    transaction."""

    @property
    def writes(self) -> bool:
        return bool(self.stored) or bool(self.also)


@dataclass(frozen=True, slots=True)
class _Request:
    accounts: Sequence[NewAccount] | None
    transfers: Sequence[NewTransfer] | None
    future: Future[Any]
    atomic: bool = False
    """All of it or nothing: its accounts, its transfers and `events`."""
    events: Sequence[StoredEvent] = ()
    events_recorder: AppendOnlyRecorder | None = None

    @property
    def size(self) -> int:
        return len(self.accounts or ()) + len(self.transfers or ())


class LedgerWriter:
    """The single writer of one ledger shard. See the module docstring."""

    def __init__(self, app: LedgerApplication, *, shard: int = 0, clock: Clock = utc_now) -> None:
        self.app = app
        self.shard = shard
        self.clock = clock
        self.state = LedgerState(shard)
        self.position = 0
        """Notification id of the last event applied to `state` and committed."""
        self.batch_number = 0
        """Version of the shard stream's last committed BatchCommitted event."""
        self.races_lost = 0
        self._decided_batch_number = 0
        """Last batch number claimed by a decided batch (>= batch_number)."""
        self._stream_id = shard_stream_id(shard)
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=QUEUE_DEPTH_MAX)
        # Decided batches wait here for the committer. A batch is decided and queued under
        # the lock, so a recovery (also under the lock) always sees every decided batch. The
        # slots bound how many are decided and not yet committed.
        self._decided: queue.Queue[_Decided | None] = queue.Queue()
        self._slots = threading.Semaphore(PIPELINE_DEPTH_MAX)
        self._in_flight = 0
        self._threads: list[threading.Thread] = []
        with self._lock:
            self._catch_up()

    # -- synchronous API ---------------------------------------------------------------

    def open_accounts(self, accounts: Sequence[NewAccount]) -> list[CreateAccountResult]:
        result: list[CreateAccountResult] = self._call(_Request(accounts, None, Future()))
        return result

    def create_transfers(self, transfers: Sequence[NewTransfer]) -> list[TransferOutcome]:
        result: list[TransferOutcome] = self._call(_Request(None, transfers, Future()))
        return result

    def execute(
        self,
        accounts: Sequence[NewAccount],
        transfers: Sequence[NewTransfer],
        *,
        events: Sequence[StoredEvent] = (),
        events_recorder: AppendOnlyRecorder | None = None,
    ) -> AtomicOutcome:
        """Open `accounts`, create `transfers` and append `events` (stored events of another
        application's table on the same database, e.g. the marketplace's) all together, in
        one Postgres transaction, or nothing at all: when any account or transfer is not
        ok, nothing of the request is applied or recorded (not even the rejection; a retry
        is decided again), and the outcome says why. Waits until it is committed."""
        if events and events_recorder is None:
            raise ValueError("events need the recorder of the table they belong to")
        request = _Request(
            accounts,
            transfers,
            Future(),
            atomic=True,
            events=events,
            events_recorder=events_recorder,
        )
        result: AtomicOutcome = self._call(request)
        return result

    def expire_pending(self) -> list[TransferOutcome]:
        """Record the expiry of every pending transfer whose timeout has passed."""
        return self.create_transfers(())

    def refresh(self) -> None:
        """Read what other writers committed since our last look."""
        with self._lock:
            if self._in_flight == 0:
                self._catch_up()

    def _call(self, request: _Request) -> Any:
        if self._threads:  # the pipeline owns the state: go through it
            self._enqueue(request)
        else:
            with self._lock:
                self._commit_now([request])
        return request.future.result()

    # -- group commit ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the decider and committer threads that serve `submit()`."""
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._decide_loop, name="ledger-decider", daemon=True),
                threading.Thread(target=self._commit_loop, name="ledger-committer", daemon=True),
            ]
            for thread in self._threads:
                thread.start()

    def stop(self) -> None:
        """Finish what was submitted, then stop the threads."""
        if self._threads:
            self._queue.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []

    def submit(self, transfers: Sequence[NewTransfer]) -> Future[list[TransferOutcome]]:
        """Queue transfers for the next group commit; blocks while the queue is full."""
        if not self._threads:
            raise WriterStoppedError("the writer's threads are not running; call start()")
        request = _Request(None, transfers, Future())
        self._enqueue(request)
        future: Future[list[TransferOutcome]] = request.future
        return future

    def _enqueue(self, request: _Request) -> None:
        if request.size > BATCH_SIZE_MAX:
            raise ValueError(f"at most {BATCH_SIZE_MAX} commands per request, got {request.size}")
        self._queue.put(request)

    def _decide_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            size = first.size
            while size < BATCH_SIZE_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if size + nxt.size > BATCH_SIZE_MAX:
                    self._decide_and_hand_over(batch)
                    batch, size = [], 0
                batch.append(nxt)
                size += nxt.size
            self._decide_and_hand_over(batch)
        self._decided.put(None)
        # Fail whatever is still queued: nothing is silently dropped.
        while True:
            try:
                leftover = self._queue.get_nowait()
            except queue.Empty:
                break
            if leftover is not None:
                leftover.future.set_exception(WriterStoppedError("the writer stopped"))

    def _decide_and_hand_over(self, batch: list[_Request]) -> None:
        if not batch:
            return
        self._slots.acquire()
        with self._lock:
            try:
                if self._in_flight == 0:
                    self._catch_up_if_behind()
                decided = self._decide(batch)
            except Exception as e:
                self._slots.release()
                self._fail(batch, e)
                return
            self._in_flight += 1
            self._decided.put_nowait(decided)

    def _commit_loop(self) -> None:
        while True:
            decided = self._decided.get()
            if decided is None:
                return
            try:
                ids = self._insert(decided)
            except Exception as e:
                self._recover(decided, e)
                continue
            with self._lock:
                self._committed(decided, ids)
                self._in_flight -= 1
            self._slots.release()

    def _recover(self, failed: _Decided, error: Exception) -> None:
        """A commit failed: roll back it and every batch decided after it (all of them are in
        the queue: deciding and queueing happen under the lock), then redo or fail them."""
        with self._lock:
            batches = [failed]
            stop = False
            while True:
                try:
                    item = self._decided.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batches.append(item)
            self.state.rollback(failed.undo_start)
            self._decided_batch_number = self.batch_number
            self._in_flight = 0
            if isinstance(error, IntegrityError):
                self.races_lost += 1
            for item in batches:
                if isinstance(error, IntegrityError):
                    try:
                        self._commit_now(item.requests)
                    except Exception as e:
                        self._fail(item.requests, e)
                else:
                    log.error("ledger batch failed: %s", error)
                    self._fail(item.requests, error)
                self._slots.release()
            if stop:
                self._decided.put(None)

    @staticmethod
    def _fail(requests: list[_Request], error: Exception) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    # -- deciding and committing ----------------------------------------------------------

    def _decide(self, batch: list[_Request]) -> _Decided:
        """Decide a batch on the current state (which keeps the decisions, undoably)."""
        undo_start = self.state.mark()
        try:
            return self._decide_on_top(batch, undo_start)
        except BaseException:
            self.state.rollback(undo_start)  # nothing half-decided stays in the state
            raise

    def _decide_on_top(self, batch: list[_Request], undo_start: int) -> _Decided:
        now = self.clock()
        answers: list[Any] = []
        facts: list[Fact] = []
        also: dict[int, tuple[AppendOnlyRecorder, list[StoredEvent]]] = {}
        for request in batch:
            if request.atomic:
                mark = self.state.mark()
                results, opened = self.state.open_accounts(request.accounts or (), now)
                outcomes, new_facts = self.state.create_transfers(request.transfers or (), now)
                applied = all(r is CreateAccountResult.ok for r in results) and all(
                    o.ok for o in outcomes
                )
                if applied:
                    facts.extend(opened)
                    facts.extend(new_facts)
                    if request.events:
                        recorder = request.events_recorder
                        assert recorder is not None
                        also.setdefault(id(recorder), (recorder, []))[1].extend(request.events)
                else:
                    self.state.rollback(mark)
                answers.append(AtomicOutcome(results, outcomes, applied))
            elif request.accounts is not None:
                results, opened = self.state.open_accounts(request.accounts, now)
                answers.append(results)
                facts.extend(opened)
            else:
                outcomes, new_facts = self.state.create_transfers(request.transfers or (), now)
                answers.append(outcomes)
                facts.extend(new_facts)
        stored: list[StoredEvent] = []
        batch_number = self._decided_batch_number
        if facts:
            batch_number += 1
            mapper = self.app.ledger_mapper
            stored = [mapper.fact_to_stored_event(f) for f in facts]
            stored.append(
                mapper.to_stored_event(
                    BatchCommitted.make(self.shard, batch_number, len(facts), self.state.clock(now))
                )
            )
            self._decided_batch_number = batch_number
        return _Decided(
            batch, answers, stored, batch_number, undo_start, self.state.mark(), list(also.values())
        )

    def _insert(self, decided: _Decided) -> Sequence[int] | None:
        if not decided.writes:
            return []
        ids: Sequence[int] | None = self.app.app_recorder.insert_events(
            decided.stored, also=decided.also
        )
        return ids

    def _committed(self, decided: _Decided, notification_ids: Sequence[int] | None) -> None:
        self.state.release(decided.undo_end)
        # The state is long-lived by design: keep the cyclic GC from rescanning it on
        # every collection (the hot path creates no reference cycles).
        gc.freeze()
        if decided.stored:
            self.batch_number = decided.batch_number
        if notification_ids:
            self.position = max(notification_ids)
        for request, answer in zip(decided.requests, decided.answers, strict=True):
            request.future.set_result(answer)

    def _commit_now(self, batch: list[_Request]) -> None:
        """Decide and commit one batch in the caller's thread (nothing else in flight)."""
        for attempt in range(COMMIT_RETRIES_MAX):
            self._catch_up_if_behind()
            decided = self._decide(batch)
            try:
                ids = self._insert(decided)
            except IntegrityError as e:
                # Another writer committed first: undo our decisions, read theirs, retry.
                self.state.rollback(decided.undo_start)
                self._decided_batch_number = self.batch_number
                if self._head_batch_number() == self.batch_number:
                    # Nobody else wrote: the log holds an event our state does not know.
                    raise WriterStateError(
                        f"shard {self.shard}: an event of this batch (or of another table's "
                        "events brought with it) is already stored but unknown to the writer "
                        f"at position {self.position}: {e}"
                    ) from e
                self.races_lost += 1
                # Back off a little (with jitter) so that a writer with a big batch gets a
                # window against one that commits small batches back to back.
                time.sleep(
                    random.uniform(0, RACE_BACKOFF_S_MAX * (attempt + 1) / COMMIT_RETRIES_MAX)  # noqa: S311
                )
                self._catch_up()
                continue
            except BaseException:
                self.state.rollback(decided.undo_start)
                self._decided_batch_number = self.batch_number
                raise
            self._committed(decided, ids)
            return
        raise WriterRaceLostError(
            f"shard {self.shard}: lost the race to other writers {COMMIT_RETRIES_MAX} times"
        )

    def _catch_up_if_behind(self) -> None:
        # Decide on the newest state: another process may have written since our last look
        # (one indexed read per batch). A commit that still races fails on the unique key.
        if self._head_batch_number() > self.batch_number:
            self._catch_up()

    def _head_batch_number(self) -> int:
        head = self.app.recorder.select_events(self._stream_id, desc=True, limit=1)
        return head[0].originator_version if head else 0

    def _catch_up(self) -> None:
        """Apply every event committed after `position` (by us before a restart, or by others)."""
        for count, (position, event) in enumerate(read_events(self.app, after=self.position), 1):
            self._apply_event(event)
            self.position = position
            if count % CATCH_UP_PAGE_SIZE == 0:
                self.state.commit()  # keep the undo log short: replayed facts stay
        self.state.commit()
        self._decided_batch_number = self.batch_number
        gc.freeze()

    def _apply_event(self, event: Any) -> None:
        if isinstance(event, BatchCommitted):
            if event.originator_id == self._stream_id:
                self.batch_number = event.originator_version
            return
        if isinstance(event, LedgerEvent):
            fact = event.to_fact()
            if fact is None or not self.state.owns(fact):
                return
            self.state.apply(fact)

    # -- reads ------------------------------------------------------------------------------

    def account(self, account_id: UUID) -> Account | None:
        with self._lock:
            return self.state.accounts.get(account_id)
