"""The write path: one writer per ledger shard, with group commit.

A `LedgerWriter` keeps the shard's `LedgerState` in memory, decides each request against
it, and commits the resulting events for many requests in one Postgres transaction (group
commit). Every commit also appends the next `BatchCommitted` event to the shard's stream;
the events table's unique (originator_id, originator_version) key lets exactly one of two
writers that decided on the same view of the shard commit. The loser rolls its decisions
back, reads what the winner wrote, and decides again. So two processes racing to spend the
same funds can never both succeed, and nothing is half-written.

Concurrent clients call `submit()` (thread-safe, bounded queue); one committer thread drains
the queue into batches of at most BATCH_SIZE_MAX transfers.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from ledger.errors import WriterRaceLostError, WriterStoppedError
from ledger.events import BatchCommitted, LedgerEvent, shard_stream_id
from ledger.limits import BATCH_SIZE_MAX, CATCH_UP_PAGE_SIZE, COMMIT_RETRIES_MAX, QUEUE_DEPTH_MAX
from ledger.model import (
    Account,
    CreateAccountResult,
    Fact,
    LedgerState,
    NewAccount,
    NewTransfer,
    Transfer,
    TransferOutcome,
)
from ledger.queries import read_events
from ledger.store import LedgerApplication

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Request:
    accounts: Sequence[NewAccount] | None
    transfers: Sequence[NewTransfer] | None
    future: Future[Any]

    @property
    def size(self) -> int:
        return len(self.accounts or ()) + len(self.transfers or ())


class LedgerWriter:
    """The single writer of one ledger shard. See the module docstring."""

    def __init__(self, app: LedgerApplication, *, shard: int = 0, clock: Clock = utc_now) -> None:
        self.app = app
        self.shard = shard
        self.clock = clock
        self.state = LedgerState()
        self.position = 0
        """Notification id of the last event applied to `state`."""
        self.batch_number = 0
        """Version of the shard stream's last BatchCommitted event."""
        self.races_lost = 0
        self._stream_id = shard_stream_id(shard)
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=QUEUE_DEPTH_MAX)
        self._thread: threading.Thread | None = None
        with self._lock:
            self._catch_up()

    # -- synchronous API ---------------------------------------------------------------

    def open_accounts(self, accounts: Sequence[NewAccount]) -> list[CreateAccountResult]:
        with self._lock:
            request = _Request(accounts, None, Future())
            self._commit([request])
            result: list[CreateAccountResult] = request.future.result()
            return result

    def create_transfers(self, transfers: Sequence[NewTransfer]) -> list[TransferOutcome]:
        with self._lock:
            request = _Request(None, transfers, Future())
            self._commit([request])
            result: list[TransferOutcome] = request.future.result()
            return result

    def expire_pending(self) -> list[TransferOutcome]:
        """Record the expiry of every pending transfer whose timeout has passed."""
        return self.create_transfers(())

    def refresh(self) -> None:
        """Read what other writers committed since our last look."""
        with self._lock:
            self._catch_up()

    # -- group commit ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the committer thread that serves `submit()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, transfers: Sequence[NewTransfer]) -> Future[list[TransferOutcome]]:
        """Queue transfers for the next group commit; blocks while the queue is full."""
        if len(transfers) > BATCH_SIZE_MAX:
            raise ValueError(
                f"at most {BATCH_SIZE_MAX} transfers per request, got {len(transfers)}"
            )
        if self._thread is None:
            raise WriterStoppedError("the writer's committer thread is not running; call start()")
        future: Future[list[TransferOutcome]] = Future()
        self._queue.put(_Request(None, transfers, future))
        return future

    def _run(self) -> None:
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
                    self._commit_safely(batch)
                    batch, size = [], 0
                batch.append(nxt)
                size += nxt.size
            self._commit_safely(batch)
        # Fail whatever is still queued: nothing is silently dropped.
        while True:
            try:
                leftover = self._queue.get_nowait()
            except queue.Empty:
                break
            if leftover is not None:
                leftover.future.set_exception(WriterStoppedError("the writer stopped"))

    def _commit_safely(self, batch: list[_Request]) -> None:
        if not batch:
            return
        with self._lock:
            try:
                self._commit(batch)
            except Exception as e:  # every waiting client hears of the failure
                log.exception("ledger batch failed")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(e)

    # -- the commit itself -------------------------------------------------------------

    def _commit(self, batch: list[_Request]) -> None:
        for _attempt in range(COMMIT_RETRIES_MAX):
            # Decide on the newest state: another process may have written since our last
            # look (one indexed read per batch). A commit that still races is caught below.
            if self._head_batch_number() > self.batch_number:
                self._catch_up()
            now = self.clock()
            answers: list[Any] = []
            facts: list[Fact] = []
            for request in batch:
                if request.accounts is not None:
                    results, opened = self.state.open_accounts(request.accounts, now)
                    answers.append(results)
                    facts.extend(opened)
                else:
                    outcomes, new_facts = self.state.create_transfers(request.transfers or (), now)
                    answers.append(outcomes)
                    facts.extend(new_facts)
            if not facts:
                self.state.commit()
                for request, answer in zip(batch, answers, strict=True):
                    request.future.set_result(answer)
                return
            mapper = self.app.ledger_mapper
            stored = [mapper.fact_to_stored_event(f) for f in facts]
            stored.append(
                mapper.to_stored_event(
                    BatchCommitted.make(
                        self.shard, self.batch_number + 1, len(facts), self.state.clock(now)
                    )
                )
            )
            try:
                notification_ids = self.app.recorder.insert_events(stored)
            except IntegrityError:
                # Another writer committed first: undo our decisions, read theirs, retry.
                self.state.rollback()
                self.races_lost += 1
                self._catch_up()
                continue
            except BaseException:
                self.state.rollback()
                raise
            self.state.commit()
            # The state is long-lived by design: keep the cyclic GC from rescanning it on
            # every collection (the hot path creates no reference cycles).
            gc.freeze()
            self.batch_number += 1
            if notification_ids:
                self.position = max(notification_ids)
            for request, answer in zip(batch, answers, strict=True):
                request.future.set_result(answer)
            return
        raise WriterRaceLostError(
            f"shard {self.shard}: lost the race to other writers {COMMIT_RETRIES_MAX} times"
        )

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
        gc.freeze()

    def _apply_event(self, event: Any) -> None:
        if isinstance(event, BatchCommitted):
            if event.originator_id == self._stream_id:
                self.batch_number = event.originator_version
            return
        if isinstance(event, LedgerEvent):
            fact = event.to_fact()
            if fact is None or not self._owns(fact):
                return
            self.state.apply(fact)

    def _owns(self, fact: Fact) -> bool:
        if isinstance(fact, Account):
            return fact.shard == self.shard
        if isinstance(fact, Transfer):
            return fact.debit_account_id in self.state.accounts
        return fact.pending_id in self.state.transfers

    # -- reads ------------------------------------------------------------------------------

    def account(self, account_id: UUID) -> Account | None:
        with self._lock:
            return self.state.accounts.get(account_id)
