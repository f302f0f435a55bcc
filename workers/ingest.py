"""Ingest: Kafka messages in, validated, verified, deduplicated events out, effectively once.

One `Ingest` is one member of a Kafka consumer group (aiokafka, no auto-commit) reading the
usage, heartbeat and verdict topics. For each batch (`getmany`, at most
BATCH_RECORDS_MAX records):

1. every message is decoded (`workers.messages.decode_envelope`: oversized, malformed),
   routed by its type (a type the topic does not carry is `unknown_type`; the usage topic
   carries single reports, ``aether.usage.v1``, and node batches, ``aether.usage_batch.v1``)
   and its payload validated (malformed; a batch's reports in one pydantic-core call).
   Usage messages are decoded in a decode process (DECODE_PROCESSES), DECODE_AHEAD batches
   ahead of the one being decided: the messages go there, and their events (binary COPY
   rows) come back, through a shared-memory segment this process owns
   (`workers.segments`; the pipe where there is none), the rules' fields packed;
2. usage messages (a batch as a whole) and heartbeats must be signed (`unsigned`), by the
   key registered for the reporting node (`signature_invalid`; an unregistered node's
   message cannot be verified either). The nodes' keys are loaded once and kept
   (`workers.signing.public_key`). A usage message's signature is checked in the decode
   process, against the key this process hands it for the node (read off the message's
   bytes, `messages.node_id_text`); the verdict counts only if that is still the node's
   key when the batch is decided, else (and for heartbeats, and nodes without a key
   then) it is checked here, in a thread pool (VERIFY_THREADS; the verifier releases the
   GIL);
3. each usage report (each report of a verified batch on its own) is decided by
   `domain.usage.check_report` against the marketplace's lease and the lease's last
   recorded report (read from the store once per lease, then kept in memory); a lease or
   node the marketplace does not know makes ingest re-read the marketplace log first (at
   most once per batch: it may have opened the lease since). A report a rule refuses is
   dead-lettered alone; the rest of its batch is recorded;
4. heartbeats and verdicts become `RecordHeartbeat` / `SubmitVerdict` commands of the
   marketplace service, with command_id = uuid5(COMMAND_NAMESPACE, envelope id): a
   redelivered message is an idempotent retry. A command the service refuses is
   dead-lettered as `refused`, with the `MarketError` code in its detail;
5. every rejected message is produced to the dead-letter topic (an envelope of type
   `aether.dead_letter.v1`: reason, detail, topic, partition, offset, the original key and
   value as text) and ingest goes on with the next one. A report refused inside a batch
   has its own dead letter: `value` is that report's JSON, `report_index` its place in the
   batch and `envelope_id` the batch's id;
6. the dead letters are produced and acknowledged (acks="all") BEFORE the batch commits;
7. ONE Postgres transaction appends the accepted usage events (binary COPY) and advances
   the group's offsets of every partition of the batch (`ledger.usage`), whatever each
   message became. A fetch asks for at most BATCH_RECORDS_MAX messages and about
   BATCH_EVENTS_MAX usage reports (from the reports per message seen so far).

Guarantees. On (re)assignment of partitions the consumer seeks each one to the offset
stored in Postgres (or the beginning when none is stored), so a restart, a crash or a
rebalance resumes exactly after the last committed batch: each usage report is recorded at
most once (also by the events' unique (lease, sequence) key) and, being re-read until its
batch commits, at least once. Dead letters are at least once: a crash after they were
produced and before the commit re-reads the batch and produces them again (with the same
envelope id, uuid5 of group, topic, partition and offset (and the report's index in a
batch), so readers can drop the repeat);
a dead letter is never lost. Commands sent to the marketplace before a crash are retried
with the same command id (idempotent). The next batch is decided while the previous one
commits; if a commit is refused (another consumer moved the offsets: a rebalance zombie)
ingest drops what it decided since, re-reads the stored offsets and seeks to them.

Start-up waits for the broker: "waiting for Kafka at <servers>: <error>; retrying in N s",
at most CONNECT_ATTEMPTS_MAX times.

Run as a process: ``python -m workers.ingest`` (DATABASE_URL, POSTGRES_SCHEMA,
KAFKA_BOOTSTRAP_SERVERS, each unset meaning the embedded default; see ``--help``); SIGTERM
or SIGINT finish the batch in flight and leave the group.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.shared_memory import SharedMemory
from typing import Any
from uuid import UUID, uuid5

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from domain.usage import (
    DEFAULT_USAGE_RULES,
    LastUsage,
    LeaseTerms,
    UsageRules,
    check_report,
    epoch_us,
)
from domain.verdicts import FailureKind, Verdict
from ledger.market.service import MarketError, Marketplace, RecordHeartbeat, SubmitVerdict
from ledger.usage import RULE_FIELDS, OffsetAdvance, UsageApplication, UsageConflictError
from workers import messages
from workers.broker import DEAD_LETTER, HEARTBEATS, USAGE, VERDICTS, Topic, embedded_broker
from workers.messages import (
    DEAD_LETTER_TYPE,
    HEARTBEAT_TYPE,
    MESSAGE_BYTES_MAX,
    VERDICT_TYPE,
    DecodedUsage,
    Envelope,
    HeartbeatReport,
    MessageRejectedError,
    RejectReason,
    UsageRejection,
    VerdictReport,
    decode_usage,
    decode_worker_init,
    node_id_text,
)
from workers.segments import Segments
from workers.signing import canonical_bytes, public_key, verify_bytes

log = logging.getLogger(__name__)

BATCH_RECORDS_MAX = 4_000
"""Most messages decided and committed together (one Postgres transaction)."""
BATCH_EVENTS_MAX = 8_192
"""About the most usage reports decided and committed together: a fetch asks for this many
divided by the reports per usage message seen so far (batches carry many)."""
FETCH_TIMEOUT_MS = 200
"""Longest wait of one fetch for messages."""
CONNECT_ATTEMPTS_MAX = 120
"""Most tries at reaching the broker at start-up."""
CONNECT_BACKOFF_S = 0.5
"""First pause between two tries; it doubles up to CONNECT_BACKOFF_S_MAX."""
CONNECT_BACKOFF_S_MAX = 5.0
CONFLICTS_IN_A_ROW_MAX = 32
"""Most refused commits in a row (offsets moved by another consumer) before ingest stops."""
VERIFY_THREADS = 1
"""Threads verifying signatures (the verifier releases the GIL: one thread runs beside the
event loop; on 2 cores the other is Postgres's)."""
DECODE_PROCESSES = 1
"""Processes decoding and validating usage messages (`workers.messages.decode_usage`),
beside the event loop's: a batch is decoded there while the one before it is decided here
(0: decode in the event loop's thread)."""
DECODE_PROCESSES_MAX = 8
DECODE_AHEAD = 2
"""Batches fetched and being decoded while the one before them is decided (so a decode
process always has the next batch to work on while the loop waits for a commit)."""
ROWS_PER_VALUE_BYTE = 2
"""Bytes of usage rows a decode task's shared-memory segment holds per byte of the messages
it decodes (a row is about 1.6 times its report's text; rows that do not fit come back
through the pipe)."""
NODE_TEXTS_CACHED_MAX = 1 << 16
"""Most node id texts ingest remembers the node id of."""
VERIFY_CHUNK_MAX = 512
"""Most signatures one verifier task checks."""
VERIFY_CHUNK_REPORTS_MAX = 512
"""A verifier task starts once its messages carry this many usage reports (small tasks:
the rules of one chunk run while the next one is verified)."""
LEASES_CACHED_MAX = 1_000_000
"""Most leases whose last usage ingest remembers; beyond, it forgets them all and reads
them again from the store."""
DEAD_LETTER_VALUE_CHARS_MAX = MESSAGE_BYTES_MAX
"""Most characters of a rejected message's value copied into its dead letter."""
SESSION_TIMEOUT_MS = 10_000
"""How long the group waits for a silent member (a crashed process) before handing its
partitions to the others; a group join also waits about this long on some brokers."""
HEARTBEAT_INTERVAL_MS = 3_000
"""How often the consumer tells the group it is alive (a third of the session timeout)."""
CAUGHT_UP_TIMEOUT_S = 120.0
"""Longest `run_until_caught_up` waits by default."""

COMMAND_NAMESPACE = UUID("1f7d7c3e-4b8a-5d0e-9c1a-7a3b2c4d5e6f")
"""Namespace of the command ids derived from envelope ids. Never change."""
DEAD_LETTER_NAMESPACE = UUID("6a2e9f10-3c5b-5e7d-8f40-b1c2d3e4f5a6")
"""Namespace of the dead letters' envelope ids. Never change."""

Clock = Callable[[], datetime]
Verifier = Callable[[Ed25519PublicKey, bytes, bytes], bool]
"""(the node's loaded public key, the canonical bytes of the message's data without the
signature, the 64-byte signature) -> whether the node signed them
(`workers.signing.verify_bytes`, the default). Called from the verify threads."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class IngestError(Exception):
    """Base of ingest's errors."""


class BrokerUnavailableError(IngestError):
    """The broker did not answer within CONNECT_ATTEMPTS_MAX tries."""


@dataclass(frozen=True, slots=True)
class IngestTopics:
    """The topics ingest reads and the one it dead-letters to."""

    usage: Topic = USAGE
    heartbeats: Topic = HEARTBEATS
    verdicts: Topic = VERDICTS
    dead_letter: Topic = DEAD_LETTER

    def suffixed(self, suffix: str) -> IngestTopics:
        """The same topics named "<name>.<suffix>" (tests and benchmarks isolate by it)."""

        def named(topic: Topic) -> Topic:
            return replace(topic, name=f"{topic.name}.{suffix}")

        return IngestTopics(
            named(self.usage), named(self.heartbeats), named(self.verdicts), named(self.dead_letter)
        )

    def all(self) -> tuple[Topic, Topic, Topic, Topic]:
        return (self.usage, self.heartbeats, self.verdicts, self.dead_letter)

    def read(self) -> tuple[str, str, str]:
        return (self.usage.name, self.heartbeats.name, self.verdicts.name)


@dataclass
class IngestStats:
    """What one ingest did (counters since start; times from time.perf_counter())."""

    consumed: int = 0
    recorded: int = 0
    """Usage events committed."""
    commands: int = 0
    """Heartbeats and verdicts the marketplace accepted (or had accepted before)."""
    dead_lettered: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    conflicts: int = 0
    first_consumed_at: float | None = None
    last_committed_at: float | None = None
    usage_messages: int = 0
    """Usage messages (single reports and batches) that passed decoding."""
    usage_reports: int = 0
    """Usage reports those carried."""
    fetch_s: float = 0.0
    """Time in the consumer's fetch (getmany), after the first messages came."""
    verify_wait_s: float = 0.0
    """Time decisions waited for signatures (verification overlaps parsing)."""
    decide_s: float = 0.0
    """Time deciding batches (parse, validate, verify, rules), the waits included."""
    parse_s: float = 0.0
    """Of decide: CPU time of the event loop's thread decoding and validating messages
    (heartbeats, verdicts; usage too without decode processes) and taking over the decode
    processes' results (thread time: on a busy machine, wall time counts other processes
    too)."""
    decode_cpu_s: float = 0.0
    """CPU time of the decode processes decoding, validating and making rows of the usage
    messages (0 without decode processes)."""
    decode_wait_s: float = 0.0
    """Of decide: time waiting for the decode processes (they decode a batch while the one
    before it is decided)."""
    rules_s: float = 0.0
    """Of decide: CPU time of the usage rules and the facts."""
    commit_s: float = 0.0
    """Time of the commits (in a thread, overlapping the next batch's decide)."""
    record_cpu_s: float = 0.0
    """Of commit: CPU time of the commit thread writing (COPY rows, the driver)."""
    dead_letter_s: float = 0.0
    """Time producing dead letters."""


@dataclass(slots=True)
class _Pending:
    """A message that passed decoding, waiting for its signature and rules."""

    record: ConsumerRecord[bytes, bytes]
    envelope_id: UUID
    node_id: UUID | None
    """The signing node (None: a verdict, which is not signed)."""
    report: HeartbeatReport | VerdictReport | None = None
    """A heartbeat or a verdict (None: usage)."""
    usage: bytes | bytearray | list[tuple[int, int, int, int, int, int, int]] = b""
    """The usage reports' rule fields (`messages.DecodedUsage.reports`: packed
    `RULE_FIELDS`, or tuples)."""
    leases: Sequence[int] = ()
    """The leases (`UUID.int`) the fields' lease indexes point at."""
    rows: bytes | bytearray | memoryview = b""
    """The usage reports' events (`messages.DecodedUsage.rows`, or a view of them in a
    shared-memory segment)."""
    ends: Sequence[int] = ()
    """Where each report's event ends in `rows`."""
    batched: bool = False
    """Whether `usage` came in a batch."""
    signed: bytes = b""
    """What the signature covers (canonical bytes of the data without the signature)."""
    signature: bytes = b""
    key: Ed25519PublicKey | None = None
    """The node's registered key, loaded."""
    verified: bool = False


@dataclass
class _Batch:
    """What one batch decided: facts to store, dead letters to send, offsets to advance."""

    generation: int
    rows: list[bytes | bytearray | memoryview] = field(default_factory=list)
    """The accepted usage events, as binary COPY rows (`ledger.usage.copy_row`), a
    message's at a time (or one by one where some of its reports were refused)."""
    events: int = 0
    """How many usage events `rows` holds."""
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    offsets: list[OffsetAdvance] = field(default_factory=list)
    consumed: int = 0
    commands: int = 0
    refreshed: bool = False
    """Whether this batch already re-read the marketplace log."""
    leases: dict[int, LeaseTerms] = field(default_factory=dict)
    """The marketplace's leases looked up in this batch (by the id's integer), forgotten
    whenever the marketplace state may have changed (a command, a refresh)."""
    segments: list[SharedMemory] = field(default_factory=list)
    """The shared-memory segments `rows` views, given back once the batch committed."""
    keys: dict[int, str | None] = field(default_factory=dict)
    """The nodes' registered keys (hex) looked up in this batch (by the id's integer),
    forgotten with `leases`."""


@dataclass
class _Fetched:
    """A fetched batch, its usage messages being decoded (in the decode processes), not
    decided yet."""

    generation: int
    records: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]
    offsets: list[OffsetAdvance]
    consumed: int
    decoding: list[asyncio.Future[tuple[list[DecodedUsage | UsageRejection], float]]]
    """The decode processes' answers for the usage topic's records, in record order (empty
    without decode processes: decided in the event loop's thread)."""
    segments: list[SharedMemory | None] = field(default_factory=list)
    """Per decode task, the shared-memory segment its values and rows are written into
    (None: they go through the pipe)."""
    parts: list[list[tuple[bytes | None, int]]] = field(default_factory=list)
    """Per decode task, its records (value, timestamp)."""


@dataclass
class _Chunk:
    """Up to VERIFY_CHUNK_MAX parsed messages and the verification of their signatures."""

    pending: list[_Pending]
    signed: list[_Pending]
    """Those that carry a signature to check."""
    checkable: list[_Pending]
    """Those of `signed` whose node has a registered key (the others fail)."""
    future: asyncio.Future[list[bool]] | None
    """Whether each of `checkable` is signed by its node's key."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ingest: Ingest) -> None:
        self._ingest = ingest

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._ingest._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._ingest._on_assigned(assigned)


class Ingest:
    """One ingest consumer (see the module docstring). Use as ``async with``."""

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        usage: UsageApplication,
        market: Marketplace,
        *,
        topics: IngestTopics | None = None,
        rules: UsageRules = DEFAULT_USAGE_RULES,
        clock: Clock = utc_now,
        batch_records_max: int = BATCH_RECORDS_MAX,
        verify_threads: int = VERIFY_THREADS,
        verifier: Verifier = verify_bytes,
        batch_events_max: int = BATCH_EVENTS_MAX,
        decode_processes: int = DECODE_PROCESSES,
        connect_attempts_max: int = CONNECT_ATTEMPTS_MAX,
        session_timeout_ms: int = SESSION_TIMEOUT_MS,
        client_id: str = "aether-ingest",
    ) -> None:
        if not 1 <= batch_records_max <= 100_000:
            raise ValueError(f"batch_records_max must be within 1..100000: {batch_records_max}")
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.usage = usage
        self.market = market
        self.topics = topics or IngestTopics()
        self.rules = rules
        self.clock = clock
        self.batch_records_max = batch_records_max
        if not 1 <= batch_events_max <= 1_000_000:
            raise ValueError(f"batch_events_max must be within 1..1000000: {batch_events_max}")
        self.batch_events_max = batch_events_max
        self._reports_per_message = 1.0
        """Usage reports per usage message in the last batch that had any."""
        self.connect_attempts_max = connect_attempts_max
        self.session_timeout_ms = session_timeout_ms
        self.client_id = client_id
        self.stats = IngestStats()
        self.verifier = verifier
        if not 0 <= decode_processes <= DECODE_PROCESSES_MAX:
            raise ValueError(
                f"decode_processes must be within 0..{DECODE_PROCESSES_MAX}: {decode_processes}"
            )
        self.decode_processes = decode_processes
        self._decode_pool: Executor | None = None
        self._segments = Segments()
        """Where the decode processes write the rows (`workers.segments`)."""
        self._node_texts: dict[bytes, UUID | None] = {}
        """The node id of each node id text seen in a usage message (None: not a UUID)."""
        self._fetched: deque[_Fetched] = deque()
        """The batches fetched and being decoded, oldest first (at most DECODE_AHEAD: the
        oldest is decided once another is fetched)."""
        self._verify_pool = ThreadPoolExecutor(verify_threads, thread_name_prefix="verify")
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._last: dict[int, LastUsage | None] = {}
        """Per lease (keyed by the id's integer: a UUID's hash and equality are Python
        code): its last recorded report (None: none), including the batch decided and not
        committed yet."""
        self._stored: dict[TopicPartition, int | None] = {}
        """Per assigned partition: the stored next offset as of our last commit (decided
        batches included)."""
        self._inflight: asyncio.Task[None] | None = None
        self._generation = 0
        """Bumped whenever the assignment changes or positions are reset: a batch decided
        in an older generation is dropped, not committed."""
        self._conflicts_in_a_row = 0
        self._positions: dict[TopicPartition, int] = {}
        """Per assigned partition: the offset the last reset sought it to."""
        self._resetting = 0
        """Resets (reads of the stored offsets and seeks) under way."""

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Ingest:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the decode processes, connect to the broker (waiting for it, see
        CONNECT_ATTEMPTS_MAX) and join the group."""
        if self.decode_processes and self._decode_pool is None:
            self._decode_pool = _decode_pool(self.decode_processes)
            # Started (and their imports done) now, not on the first batch.
            await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, decode_usage, self.topics.usage.name, ()
            )
        delay_s = CONNECT_BACKOFF_S
        for attempt in range(1, self.connect_attempts_max + 1):
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=False,
                linger_ms=5,
                request_timeout_ms=30_000,
            )
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                client_id=self.client_id,
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_uncommitted",
                max_partition_fetch_bytes=4 * 1024 * 1024,
                fetch_max_bytes=64 * 1024 * 1024,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=min(HEARTBEAT_INTERVAL_MS, self.session_timeout_ms // 3),
            )
            try:
                await producer.start()
                await consumer.start()
            except (KafkaConnectionError, KafkaError, OSError) as e:
                with suppress(Exception):
                    await consumer.stop()
                with suppress(Exception):
                    await producer.stop()
                if attempt == self.connect_attempts_max:
                    raise BrokerUnavailableError(
                        f"Kafka at {self.bootstrap_servers} did not answer in {attempt} tries: {e}"
                    ) from e
                log.warning(
                    "waiting for Kafka at %s: %s; retrying in %s s",
                    self.bootstrap_servers,
                    e,
                    delay_s,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, CONNECT_BACKOFF_S_MAX)
                continue
            self._producer, self._consumer = producer, consumer
            break
        assert self._consumer is not None
        await self._wait_for_topics(self._consumer, CONNECT_BACKOFF_S)
        self._consumer.subscribe(topics=list(self.topics.read()), listener=_Listener(self))
        log.info(
            "ingest %s reading %s from %s",
            self.group_id,
            ", ".join(self.topics.read()),
            self.bootstrap_servers,
        )

    async def _wait_for_topics(self, consumer: AIOKafkaConsumer, delay_s: float) -> None:
        """Wait until the broker has every topic ingest reads (a broker just started may
        not have created them yet; a group joined without them would wait for the next
        metadata refresh)."""
        for attempt in range(1, self.connect_attempts_max + 1):
            missing = sorted(set(self.topics.read()) - set(await consumer.topics()))
            if not missing:
                return
            if attempt == self.connect_attempts_max:
                raise BrokerUnavailableError(
                    f"Kafka at {self.bootstrap_servers} has no topic {', '.join(missing)}"
                )
            log.warning(
                "waiting for Kafka at %s: topics %s do not exist yet; retrying in %s s",
                self.bootstrap_servers,
                ", ".join(missing),
                delay_s,
            )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, CONNECT_BACKOFF_S_MAX)

    async def stop(self) -> None:
        """Finish the commit in flight, leave the group, close the clients."""
        try:
            await self._finish_inflight()
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._producer is not None:
                await self._producer.stop()
            self._consumer = self._producer = None
            self._fetched.clear()
            self._verify_pool.shutdown(wait=False)
            if self._decode_pool is not None:
                self._decode_pool.shutdown(wait=True, cancel_futures=True)
                self._decode_pool = None
            self._segments.close()

    async def run(self, stop: asyncio.Event) -> IngestStats:
        """Ingest until `stop` is set."""
        while not stop.is_set():
            await self.step()
        await self._decide_fetched()
        await self._finish_inflight()
        return self.stats

    async def run_until_caught_up(self, timeout_s: float = CAUGHT_UP_TIMEOUT_S) -> IngestStats:
        """Ingest until every partition assigned to this consumer is committed up to its end
        (as of the moment it is checked); TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            consumed = await self.step()
            if consumed == 0 and await self.caught_up():
                return self.stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingest {self.group_id} not caught up after {timeout_s} s")

    async def caught_up(self) -> bool:
        """Whether nothing is in flight and each assigned partition is read to its end."""
        await self._decide_fetched()
        await self._finish_inflight()
        consumer = self._require_consumer()
        assigned = consumer.assignment()
        if not assigned:
            return False
        ends = await consumer.end_offsets(list(assigned))
        for tp in assigned:
            # The fetches' high watermark where known: some brokers (Tansu) answer the
            # latest offset of ListOffsets with the last record batch's base offset + 1.
            end = max(ends[tp], consumer.highwater(tp) or 0)
            if await consumer.position(tp) < end:
                return False
        return True

    # -- one batch -------------------------------------------------------------------------

    async def step(self, timeout_ms: int = FETCH_TIMEOUT_MS) -> int:
        """Fetch a batch and hand it to the decode processes, then decide the oldest batch
        fetched before (decoded meanwhile) if DECODE_AHEAD are being decoded, and hand it
        to the committer; returns the messages read (with nothing new to read: those of
        the oldest batch, decided then; 0 when there was none)."""
        consumer = self._require_consumer()
        max_records = max(
            1,
            min(self.batch_records_max, int(self.batch_events_max / self._reports_per_message)),
        )
        queue = self._fetched
        fetching = time.perf_counter()
        # With batches being decoded, only what the consumer already holds: when nothing
        # more came, the oldest is decided now, not after a wait.
        records = await consumer.getmany(
            timeout_ms=0 if queue else timeout_ms, max_records=max_records
        )
        started = time.perf_counter()
        if self._resetting:
            # Fetched while the positions were being reset: maybe from before the seek.
            records = await self._after_reset(records)
        if not records:
            if not queue:
                return 0
            oldest = queue.popleft()
            await self._process(oldest)
            return oldest.consumed
        if self.stats.first_consumed_at is None:
            self.stats.first_consumed_at = started
        else:
            self.stats.fetch_s += started - fetching
        fetched = self._fetch(records)
        queue.append(fetched)
        while len(queue) > DECODE_AHEAD:
            await self._process(queue.popleft())
        if self._decode_pool is None:
            await self._decide_fetched()
        return fetched.consumed

    def _fetch(self, records: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> _Fetched:
        """Note the batch's offsets and start decoding its usage messages."""
        offsets = []
        consumed = 0
        usage_topic = self.topics.usage.name
        usage: list[tuple[bytes | None, int]] = []
        for tp, tp_records in records.items():
            expected = self._stored.get(tp)
            if expected is not None and tp_records and tp_records[0].offset < expected:
                # Read again by the consumer (never decided twice in one generation).
                tp_records = [r for r in tp_records if r.offset >= expected]
                records[tp] = tp_records
            if not tp_records:
                continue
            consumed += len(tp_records)
            next_offset = tp_records[-1].offset + 1
            offsets.append(OffsetAdvance(tp.topic, tp.partition, expected, next_offset))
            self._stored[tp] = next_offset
            if tp.topic == usage_topic:
                usage.extend((r.value, r.timestamp) for r in tp_records)
        decoding = []
        segments: list[SharedMemory | None] = []
        parts: list[list[tuple[bytes | None, int]]] = []
        pool = self._decode_pool
        if pool is not None and usage:
            loop = asyncio.get_running_loop()
            share = -(-len(usage) // self.decode_processes)
            for i in range(0, len(usage), share):
                part = usage[i : i + share]
                size = 0
                keys: dict[int, str] = {}
                for value, _ in part:
                    if value is None:
                        continue
                    size += len(value)
                    node_id = self._node_of_text(node_id_text(value))
                    if node_id is not None and node_id.int not in keys:
                        key_hex = self._key_hex(node_id)
                        if key_hex is not None:
                            keys[node_id.int] = key_hex
                segment = self._segments.acquire((1 + ROWS_PER_VALUE_BYTE) * size + 65_536)
                segments.append(segment)
                parts.append(part)
                if segment is None:
                    decoding.append(
                        loop.run_in_executor(pool, decode_usage, usage_topic, part, keys)
                    )
                    continue
                # The values go to the decode process through the segment too; its rows
                # are written after them.
                view = segment.buf
                assert view is not None
                spans = []
                at = 0
                for value, timestamp_ms in part:
                    if value is None:
                        spans.append((0, -1, timestamp_ms))
                        continue
                    end = at + len(value)
                    view[at:end] = value
                    spans.append((at, len(value), timestamp_ms))
                    at = end
                decoding.append(
                    loop.run_in_executor(
                        pool,
                        decode_usage,
                        usage_topic,
                        (),
                        keys,
                        (segment.name, segment.size),
                        spans,
                        at,
                    )
                )
        return _Fetched(self._generation, records, offsets, consumed, decoding, segments, parts)

    async def _after_reset(
        self, records: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]
    ) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        """Once the reset under way is done, the records that continue from the positions
        it set; a partition whose records do not is sought there again (read anew)."""
        while self._resetting:
            await asyncio.sleep(0.01)
        consumer = self._require_consumer()
        kept = {}
        for tp, tp_records in records.items():
            target = self._positions.get(tp)
            if target is None:
                continue  # no longer assigned
            tail = [r for r in tp_records if r.offset >= target]
            if tail and tail[0].offset == target:
                kept[tp] = tail
            elif tail:
                consumer.seek(tp, target)
        return kept

    async def _decide_fetched(self) -> int:
        """Decide and hand to the committer the batches fetched and not decided, in order;
        their messages."""
        consumed = 0
        queue = self._fetched
        while queue:
            fetched = queue.popleft()
            await self._process(fetched)
            consumed += fetched.consumed
        return consumed

    async def _process(self, fetched: _Fetched) -> None:
        started = time.perf_counter()
        if fetched.generation != self._generation:
            # Its decode tasks write into its segments: they are given back once done.
            await asyncio.gather(*fetched.decoding, return_exceptions=True)
            self._release(fetched.segments)
            log.info("dropping a batch fetched before the assignment changed")
            return
        try:
            batch = await self._decide(fetched)
        except BaseException:
            await asyncio.gather(*fetched.decoding, return_exceptions=True)
            self._release(fetched.segments)
            raise
        self.stats.decide_s += time.perf_counter() - started
        if batch.generation != self._generation:
            self._release(batch.segments)
            log.info("dropping a batch decided before the assignment changed")
            return
        try:
            sending = time.perf_counter()
            await self._send_dead_letters(batch)
            self.stats.dead_letter_s += time.perf_counter() - sending
            await self._finish_inflight()
        except BaseException:
            self._release(batch.segments)
            raise
        if batch.generation != self._generation:
            self._release(batch.segments)
            log.info("dropping a batch decided before the offsets were reset")
            return
        self._inflight = asyncio.create_task(self._commit(batch))

    def _release(self, segments: Iterable[SharedMemory | None]) -> None:
        for segment in segments:
            if segment is not None:
                self._segments.release(segment)

    async def _decoded_usage(self, fetched: _Fetched) -> list[DecodedUsage | UsageRejection]:
        """The decode processes' answers for the batch's usage messages (or, without decode
        processes, the decoding done here)."""
        if not fetched.decoding:
            parsing = time.thread_time()
            usage_topic = self.topics.usage.name
            decoded, _ = decode_usage(
                usage_topic,
                [
                    (r.value, r.timestamp)
                    for tp, tp_records in fetched.records.items()
                    if tp.topic == usage_topic
                    for r in tp_records
                ],
            )
            self.stats.parse_s += time.thread_time() - parsing
            return decoded
        waiting = time.perf_counter()
        answers = await asyncio.gather(*fetched.decoding)
        self.stats.decode_wait_s += time.perf_counter() - waiting
        decoded = []
        for (part, cpu_s), segment, records in zip(
            answers, fetched.segments, fetched.parts, strict=True
        ):
            if cpu_s < 0:  # the decode process could not map the segment: decoded here
                parsing = time.thread_time()
                part, _ = decode_usage(self.topics.usage.name, records)
                self.stats.parse_s += time.thread_time() - parsing
                decoded.extend(part)
                continue
            self.stats.decode_cpu_s += cpu_s
            if segment is None:
                decoded.extend(part)
                continue
            view = segment.buf
            assert view is not None
            for answer in part:
                if isinstance(answer, DecodedUsage) and answer.rows_at >= 0:
                    at = answer.rows_at
                    answer = answer._replace(
                        rows=view[at : at + answer.ends[-1]] if answer.ends else b""
                    )
                decoded.append(answer)
        return decoded

    async def _decide(self, fetched: _Fetched) -> _Batch:
        """Take over the decoded messages (parsing the heartbeats and verdicts), verifying
        signatures a chunk at a time in the thread pool while the next chunk is taken over;
        then apply the rules chunk by chunk, in record order."""
        batch = _Batch(
            fetched.generation,
            offsets=fetched.offsets,
            consumed=fetched.consumed,
            segments=[segment for segment in fetched.segments if segment is not None],
        )
        decoded = iter(await self._decoded_usage(fetched))
        now = self.clock()
        chunks: list[_Chunk] = []
        current: list[_Pending] = []
        current_reports = 0
        usage_messages = usage_reports = 0
        usage_topic = self.topics.usage.name
        parsing = time.thread_time()
        for tp, tp_records in fetched.records.items():
            usage = tp.topic == usage_topic
            for record in tp_records:
                pending: _Pending
                if usage:
                    answer = next(decoded)
                    if not isinstance(answer, DecodedUsage):
                        reason, detail = answer
                        self._dead_letter(batch, record, RejectReason(reason), detail, now)
                        continue
                    envelope_id, node_id = UUID(int=answer.envelope), UUID(int=answer.node)
                    checked = self._checked_signature(batch, answer, record)
                    if checked is None:
                        self._dead_letter(
                            batch,
                            record,
                            RejectReason.signature_invalid,
                            f"message {envelope_id}: not signed by node {node_id}'s key",
                            now,
                        )
                        continue
                    signed, verified = checked
                    pending = _Pending(
                        record,
                        envelope_id,
                        node_id,
                        usage=answer.reports,
                        leases=answer.leases,
                        rows=answer.rows,
                        ends=answer.ends,
                        batched=answer.batched,
                        signed=signed,
                        signature=answer.signature,
                        verified=verified,
                    )
                    usage_messages += 1
                    usage_reports += len(answer.ends)
                    current_reports += len(answer.ends)
                else:
                    try:
                        pending = self._parse(record)
                    except MessageRejectedError as e:
                        self._dead_letter(batch, record, e.reason, e.detail, now)
                        continue
                current.append(pending)
                if len(current) >= VERIFY_CHUNK_MAX or current_reports >= VERIFY_CHUNK_REPORTS_MAX:
                    self.stats.parse_s += time.thread_time() - parsing
                    chunks.append(self._start_verify(batch, current))
                    parsing = time.thread_time()
                    current = []
                    current_reports = 0
        self.stats.parse_s += time.thread_time() - parsing
        if current:
            chunks.append(self._start_verify(batch, current))
        if usage_messages:
            self._reports_per_message = usage_reports / usage_messages
            self.stats.usage_messages += usage_messages
            self.stats.usage_reports += usage_reports
        await self._load_last_usage(
            {key for chunk in chunks for p in chunk.pending for key in p.leases}
        )
        for chunk in chunks:
            await self._finish_verify(batch, chunk, now)
            deciding = time.thread_time()
            for p in chunk.pending:
                if not p.verified:
                    continue
                if p.report is None:
                    self._decide_usage(batch, p, now)
                else:
                    self.stats.rules_s += time.thread_time() - deciding
                    await self._send_command(batch, p, now)
                    deciding = time.thread_time()
            self.stats.rules_s += time.thread_time() - deciding
        return batch

    def _parse(self, record: ConsumerRecord[Any, Any]) -> _Pending:
        """A heartbeat or a verdict, decoded and validated (usage is decoded by
        `messages.decode_usage`)."""
        envelope = messages.decode_envelope(record.value)
        topic = record.topic
        type_ = envelope.type
        if topic == self.topics.heartbeats.name:
            if type_ != HEARTBEAT_TYPE:
                raise self._unknown_type(envelope, topic, HEARTBEAT_TYPE)
            beat = messages.payload(HeartbeatReport, envelope)
            if beat.signature is None:
                raise MessageRejectedError(
                    RejectReason.unsigned, f"message {envelope.id} from node {beat.node_id}"
                )
            return _Pending(
                record,
                envelope.id,
                beat.node_id,
                report=beat,
                signed=canonical_bytes(envelope.data),
                signature=bytes.fromhex(beat.signature),
            )
        if type_ != VERDICT_TYPE:
            raise self._unknown_type(envelope, topic, VERDICT_TYPE)
        verdict = messages.payload(VerdictReport, envelope)
        return _Pending(record, envelope.id, None, report=verdict, verified=True)

    @staticmethod
    def _unknown_type(envelope: Envelope, topic: str, carried: str) -> MessageRejectedError:
        return MessageRejectedError(
            RejectReason.unknown_type,
            f"message {envelope.id}: type {envelope.type!r} on topic {topic} "
            f"(which carries {carried})",
        )

    def _start_verify(self, batch: _Batch, pending: list[_Pending]) -> _Chunk:
        """Resolve the node key of each signed message of `pending` and start verifying
        their signatures in the thread pool."""
        signed = [p for p in pending if not p.verified]
        node_ids = {p.node_id for p in signed if p.node_id is not None}
        keys = self._node_keys(batch, node_ids) if signed else {}
        for p in signed:
            p.key = None if p.node_id is None else keys.get(p.node_id)
        checkable = [p for p in signed if p.key is not None]
        future = (
            asyncio.get_running_loop().run_in_executor(
                self._verify_pool, _verify_chunk, self.verifier, checkable
            )
            if checkable
            else None
        )
        return _Chunk(pending, signed, checkable, future)

    async def _finish_verify(self, batch: _Batch, chunk: _Chunk, now: datetime) -> None:
        """Wait for the chunk's signatures; dead-letter each report that fails."""
        if chunk.future is not None:
            started = time.perf_counter()
            results = await chunk.future
            self.stats.verify_wait_s += time.perf_counter() - started
            for p, ok in zip(chunk.checkable, results, strict=True):
                p.verified = ok
        for p in chunk.signed:
            if p.verified:
                continue
            detail = (
                f"message {p.envelope_id}: no key is registered for node {p.node_id}"
                if p.key is None
                else f"message {p.envelope_id}: not signed by node {p.node_id}'s key"
            )
            self._dead_letter(batch, p.record, RejectReason.signature_invalid, detail, now)

    def _node_keys(self, batch: _Batch, node_ids: set[UUID]) -> dict[UUID, Ed25519PublicKey]:
        """The registered public key of each node that has one; re-reads the marketplace
        log first if some node is unknown."""
        keys = self._known_keys(node_ids)
        if len(keys) < len(node_ids) and not batch.refreshed:
            self._refresh_market(batch)
            keys = self._known_keys(node_ids)
        return keys

    def _known_keys(self, node_ids: set[UUID]) -> dict[UUID, Ed25519PublicKey]:
        """The loaded key of each node the marketplace knows (a key that does not load is
        as good as none: nothing verifies against it)."""
        state = self.market.state
        keys: dict[UUID, Ed25519PublicKey] = {}
        for node_id in node_ids:
            provider_id = state.node_provider.get(node_id)
            provider = None if provider_id is None else state.providers.get(provider_id)
            node = None if provider is None else provider.node(node_id)
            key = None if node is None else public_key(node.public_key)
            if key is not None:
                keys[node_id] = key
        return keys

    def _checked_signature(
        self, batch: _Batch, answer: DecodedUsage, record: ConsumerRecord[Any, Any]
    ) -> tuple[bytes, bool] | None:
        """What a decode process found of a usage message's signature: (what it covers,
        True) where it checked it against the key the node still has; None where that key
        did not sign it; (what it covers, False) where it is for this process to check (no
        key was given, or the node's key changed since: the bytes are made again here)."""
        if answer.verified is None:
            return answer.signed, False
        keys = batch.keys
        if answer.node not in keys:
            keys[answer.node] = self._key_hex(UUID(int=answer.node))
        if keys[answer.node] != answer.key:
            return canonical_bytes(messages.decode_envelope(record.value).data), False
        return (answer.signed, True) if answer.verified else None

    def _key_hex(self, node_id: UUID) -> str | None:
        """The public key (hex) the marketplace registered for the node, if it has one that
        loads."""
        state = self.market.state
        provider_id = state.node_provider.get(node_id)
        provider = None if provider_id is None else state.providers.get(provider_id)
        node = None if provider is None else provider.node(node_id)
        if node is None or public_key(node.public_key) is None:
            return None
        return node.public_key

    def _node_of_text(self, text: bytes | None) -> UUID | None:
        """The node id of a node id text (`messages.node_id_text`), remembered."""
        if text is None:
            return None
        known = self._node_texts
        if text in known:
            return known[text]
        try:
            node_id: UUID | None = UUID(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            node_id = None
        if len(known) >= NODE_TEXTS_CACHED_MAX:
            known.clear()
        known[text] = node_id
        return node_id

    def _refresh_market(self, batch: _Batch) -> None:
        """Read what the marketplace log holds since the service's last look (at most once
        per batch: unknown ids in a flood of bad messages cost one indexed read each batch)."""
        batch.refreshed = True
        batch.leases.clear()
        batch.keys.clear()
        # The service has no public read-only catch-up: the one `handle` starts with.
        self.market.refresh()

    async def _load_last_usage(self, lease_keys: Iterable[int]) -> None:
        """Read the last recorded report of each lease (by its id's integer) not in memory."""
        known = self._last
        missing = [key for key in lease_keys if key not in known]
        if not missing:
            return
        if len(known) + len(missing) > LEASES_CACHED_MAX:
            known.clear()
        found = await asyncio.to_thread(self.usage.last_usages, [UUID(int=k) for k in missing])
        by_key = {lease_id.int: last for lease_id, last in found.items()}
        for key in missing:
            known[key] = by_key.get(key)

    def _decide_usage(self, batch: _Batch, p: _Pending, now: datetime) -> None:
        """Each report of a verified usage message, by the rules, in order: the accepted
        become rows to append, each refused one a dead letter of its own."""
        envelope_id = p.envelope_id
        envelope = envelope_id.int
        node_id = p.node_id
        assert node_id is not None
        node = node_id.int
        leases = batch.leases
        last_of = self._last
        rules = self.rules
        latest_end_us = epoch_us(now) + rules.future_tolerance_s * 1_000_000
        refused: list[int] = []
        usage = p.usage
        lease_keys = p.leases
        new_last = tuple.__new__  # a LastUsage without its Python-level __new__
        for index, (li, sequence, start_us, end_us, gpus, wall_us, device_us) in enumerate(
            RULE_FIELDS.iter_unpack(usage) if isinstance(usage, bytes | bytearray) else usage
        ):
            key = lease_keys[li]
            lease = leases.get(key)
            if lease is None:
                lease = self._lease(batch, key)
            rejected = check_report(
                lease,
                last_of.get(key),
                envelope,
                key,
                node,
                sequence,
                start_us,
                end_us,
                gpus,
                wall_us,
                device_us,
                latest_end_us,
                rules,
            )
            if rejected is not None:
                self._reject_report(batch, p, index, rejected.reason, rejected.detail, now)
                refused.append(index)
                continue
            last_of[key] = new_last(LastUsage, (sequence, envelope, end_us))
        ends = p.ends
        batch.events += len(ends) - len(refused)
        if not refused:
            batch.rows.append(p.rows)
            return
        rows = memoryview(p.rows)
        skip = set(refused)
        batch.rows.extend(
            rows[0 if i == 0 else ends[i - 1] : end] for i, end in enumerate(ends) if i not in skip
        )

    def _reject_report(
        self, batch: _Batch, p: _Pending, index: int, reason: RejectReason, detail: str,
        now: datetime,
    ) -> None:  # fmt: skip
        """Dead-letter one report of a usage message (the whole message if not a batch)."""
        report = None
        if p.batched:
            # The report's JSON as sent (read again: refusals are rare).
            report = (index, orjson.loads(p.record.value)["data"]["reports"][index])
        self._dead_letter(
            batch,
            p.record,
            reason,
            f"{detail} (message {p.envelope_id}" + (f", report {index})" if p.batched else ")"),
            now,
            report=report,
            envelope_id=p.envelope_id,
        )

    def _lease(self, batch: _Batch, key: int) -> LeaseTerms | None:
        """The marketplace's lease of the id whose integer is `key` (re-reading its log once
        per batch for one it does not know), remembered for the batch (until a command or a
        refresh changes the state)."""
        lease_id = UUID(int=key)
        lease = self.market.state.leases.get(lease_id)
        if lease is None and not batch.refreshed:
            self._refresh_market(batch)
            lease = self.market.state.leases.get(lease_id)
        if lease is None:
            return None
        terms = LeaseTerms.of(lease)
        batch.leases[key] = terms
        return terms

    async def _send_command(self, batch: _Batch, p: _Pending, now: datetime) -> None:
        command_id = uuid5(COMMAND_NAMESPACE, str(p.envelope_id))
        report = p.report
        command: RecordHeartbeat | SubmitVerdict
        if isinstance(report, HeartbeatReport):
            command = RecordHeartbeat(
                command_id, report.lease_id, report.node_id, report.sequence, report.at
            )
        else:
            assert isinstance(report, VerdictReport)
            command = SubmitVerdict(
                command_id,
                Verdict(
                    report.verdict_id,
                    report.checker_id,
                    report.node_id,
                    report.provider_id,
                    report.window_start,
                    report.window_end,
                    report.latency_ms_p99,
                    report.throughput_milli_per_s,
                    report.uptime_ppm,
                    report.passed,
                    FailureKind[report.failure_kind],
                    report.evidence_hash,
                ),
            )
        batch.leases.clear()
        batch.keys.clear()
        try:
            await asyncio.to_thread(self.market.handle, command)
        except MarketError as e:
            self._dead_letter(
                batch,
                p.record,
                RejectReason.refused,
                f"{e.code}: {e} (message {p.envelope_id})",
                now,
            )
            return
        batch.commands += 1

    def _dead_letter(
        self,
        batch: _Batch,
        record: ConsumerRecord[Any, Any],
        reason: RejectReason,
        detail: str,
        now: datetime,
        *,
        report: tuple[int, Any] | None = None,
        envelope_id: UUID | None = None,
    ) -> None:
        batch.dead_letters.append(
            dead_letter(
                record, reason, detail, self.group_id, now, report=report, envelope_id=envelope_id
            )
        )
        self.stats.reasons[reason.value] += 1

    async def _send_dead_letters(self, batch: _Batch) -> None:
        """Produce the batch's dead letters and wait until the broker has them all."""
        if not batch.dead_letters:
            return
        producer = self._producer
        assert producer is not None
        topic = self.topics.dead_letter.name
        sent = [await producer.send(topic, value, key=key) for key, value in batch.dead_letters]
        await asyncio.gather(*sent)
        self.stats.dead_lettered += len(batch.dead_letters)

    async def _commit(self, batch: _Batch) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()

        def record() -> None:
            try:
                self._record(batch)
            finally:
                # Given back once the driver is done with the rows (not on a cancel of
                # this task, which does not stop the thread).
                batch.rows.clear()
                with suppress(RuntimeError):  # the loop is closed: stop() removed them
                    loop.call_soon_threadsafe(self._release, batch.segments)

        await asyncio.to_thread(record)
        finished = time.perf_counter()
        self.stats.commit_s += finished - started
        self.stats.last_committed_at = finished
        self.stats.batches += 1
        self.stats.consumed += batch.consumed
        self.stats.recorded += batch.events
        self.stats.commands += batch.commands

    def _record(self, batch: _Batch) -> None:
        """Append the batch's rows and advance its offsets (in the commit thread)."""
        started = time.thread_time()
        try:
            self.usage.record_copy(batch.rows, batch.events, self.group_id, batch.offsets)
        finally:
            self.stats.record_cpu_s += time.thread_time() - started

    async def _finish_inflight(self, *, reset_on_conflict: bool = True) -> None:
        """Wait for the commit in flight; a refused one resets to the stored offsets (or,
        during a rebalance, leaves that to the assignment that follows). Whoever waits
        returns only once it has landed (a rebalance and the loop may wait together)."""
        task = self._inflight
        if task is None:
            return
        await asyncio.wait([task])
        if self._inflight is not task:  # the other waiter took it over
            return
        self._inflight = None
        try:
            task.result()
        except UsageConflictError as e:
            self._conflicts_in_a_row += 1
            self.stats.conflicts += 1
            if self._conflicts_in_a_row > CONFLICTS_IN_A_ROW_MAX:
                raise
            log.warning("commit refused, resuming from the stored offsets: %s", e)
            self._generation += 1
            self._last.clear()
            if reset_on_conflict:
                await self._reset(self._require_consumer().assignment())
        else:
            self._conflicts_in_a_row = 0

    # -- assignment ------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # The next owner reads the offsets we stored: let the commit in flight land first.
        self._generation += 1
        await self._finish_inflight(reset_on_conflict=False)
        for tp in revoked:
            self._stored.pop(tp, None)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        # The stored offsets are read next: a commit still in flight must land first, or
        # they would be read stale (a rebalance with no revocation before it, as a broker
        # whose first group generation is 0 sends, found by the ingest benchmark in CI).
        await self._finish_inflight(reset_on_conflict=False)
        await self._reset(assigned)
        log.info("ingest %s assigned %d partitions", self.group_id, len(assigned))

    async def _reset(self, partitions: set[TopicPartition]) -> None:
        """Forget what was fetched or decided and not committed; seek to the stored
        offsets."""
        self._generation += 1
        self._last.clear()
        consumer = self._require_consumer()
        self._resetting += 1
        try:
            stored = await asyncio.to_thread(
                self.usage.stored_offsets,
                self.group_id,
                [(tp.topic, tp.partition) for tp in partitions],
            )
            await self._seek(consumer, partitions, stored)
        finally:
            self._resetting -= 1

    async def _seek(
        self,
        consumer: AIOKafkaConsumer,
        partitions: set[TopicPartition],
        stored: dict[tuple[str, int], int],
    ) -> None:
        """Seek each partition to its stored offset (the beginning when none is stored)
        and take those as the positions the next batches advance from."""
        beginning = []
        positions: dict[TopicPartition, int | None] = {}
        for tp in partitions:
            offset = stored.get((tp.topic, tp.partition))
            positions[tp] = offset
            if offset is None:
                beginning.append(tp)
            else:
                consumer.seek(tp, offset)
        if beginning:
            await consumer.seek_to_beginning(*beginning)
        sought = {tp: await consumer.position(tp) for tp in partitions}
        # A batch fetched (or decided) while this ran is from before the seek: a fetch can
        # return while the assignment is being handled. Dropped, and forgotten.
        self._generation += 1
        self._last.clear()
        self._stored = positions
        self._positions = sought

    def _require_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise IngestError("ingest is not started")
        return self._consumer


def _decode_pool(processes: int) -> ProcessPoolExecutor:
    """The decode processes: spawned (not forked from this process, whose threads a fork
    would cut); each exits by itself when this process dies, even by kill -9
    (`messages.decode_worker_init`)."""
    return ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=decode_worker_init,
        initargs=(os.getpid(),),
    )


def _verify_chunk(verifier: Verifier, chunk: Sequence[_Pending]) -> list[bool]:
    results = []
    for p in chunk:
        assert p.key is not None
        results.append(verifier(p.key, p.signed, p.signature))
    return results


def dead_letter(
    record: ConsumerRecord[Any, Any],
    reason: RejectReason,
    detail: str,
    group_id: str,
    now: datetime,
    *,
    report: tuple[int, Any] | None = None,
    envelope_id: UUID | None = None,
) -> tuple[bytes | None, bytes]:
    """The (key, value) of the dead letter of a rejected message, or of one report of a
    batch, `report` = (its index, its JSON as sent) (see the module docstring)."""
    raw_value: bytes = record.value or b""
    raw_key: bytes | None = record.key
    report_index = None if report is None else report[0]
    if report is None:
        value = raw_value.decode("utf-8", errors="backslashreplace")
    else:
        value = orjson.dumps(report[1]).decode()
    key = None if raw_key is None else raw_key.decode("utf-8", errors="backslashreplace")
    where = f"{record.topic}/{record.partition}/{record.offset}"
    if report_index is not None:
        where = f"{where}/{report_index}"
    subject = (
        key if key and len(key) <= messages.TEXT_LENGTH_MAX else where[-messages.TEXT_LENGTH_MAX :]
    )
    envelope = Envelope(
        id=uuid5(DEAD_LETTER_NAMESPACE, f"{group_id}:{where}"),
        type=DEAD_LETTER_TYPE,
        source=f"ingest/{group_id}"[: messages.TEXT_LENGTH_MAX],
        subject=subject,
        time=now,
        data={
            "reason": reason.value,
            "detail": detail,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key": key,
            "value": value[:DEAD_LETTER_VALUE_CHARS_MAX],
            "value_bytes": len(raw_value),
            "value_truncated": len(value) > DEAD_LETTER_VALUE_CHARS_MAX,
            **({} if envelope_id is None else {"envelope_id": str(envelope_id)}),
            **({} if report_index is None else {"report_index": report_index}),
        },
    )
    return raw_key, messages.encode(envelope)


# -- the process ---------------------------------------------------------------------------


async def _serve(args: argparse.Namespace, servers: str) -> None:
    from ledger.config import Settings
    from workers.bootstrap import open_market

    settings = Settings()
    topics = IngestTopics().suffixed(args.topics_suffix) if args.topics_suffix else IngestTopics()
    with open_market(settings) as market:
        usage = UsageApplication(
            market.ledger.app.app_recorder.datastore, env=market.ledger.app.env
        )
        ingest = Ingest(
            servers,
            args.group_id,
            usage,
            market.service,
            topics=topics,
            batch_records_max=args.batch_records_max,
            session_timeout_ms=args.session_timeout_ms,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with ingest:
            if args.until_caught_up:
                stats = await ingest.run_until_caught_up()
            else:
                stats = await ingest.run(stop)
        log.info(
            "ingest %s done: consumed=%d recorded=%d commands=%d dead_lettered=%d",
            args.group_id,
            stats.consumed,
            stats.recorded,
            stats.commands,
            stats.dead_lettered,
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="aether worker ingest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--group-id", default="aether-ingest")
    parser.add_argument("--topics-suffix", default="", help="read <topic>.<suffix> (tests)")
    parser.add_argument("--batch-records-max", type=int, default=BATCH_RECORDS_MAX)
    parser.add_argument("--session-timeout-ms", type=int, default=SESSION_TIMEOUT_MS)
    parser.add_argument(
        "--until-caught-up", action="store_true", help="exit once every partition is read"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    from ledger.config import Settings

    with ExitStack() as stack:
        servers = Settings().kafka_bootstrap_servers
        if servers is None:
            servers = stack.enter_context(embedded_broker())
            log.warning(
                "KAFKA_BOOTSTRAP_SERVERS is unset; embedded broker on %s "
                "(its messages end with this process)",
                servers,
            )
        asyncio.run(_serve(args, servers))


if __name__ == "__main__":
    main()
