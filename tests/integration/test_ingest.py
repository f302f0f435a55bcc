"""Ingest against real PostgreSQL and a real Kafka-protocol broker: usage reports become
usage events with their offsets in the same transaction; every bad message lands in the
dead-letter topic with its reason; restarts, crashes and a late broker lose nothing and
count nothing twice.

Each test has its own topics (suffixed names) and consumer group; group joins cost about
5 s on the embedded broker, so the tests keep them few.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import orjson
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from eventsourcing.persistence import StoredEvent
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from domain.lease import CloseReason
from domain.providers import Node
from domain.usage import UsageRecorded
from ledger.market import service as m
from ledger.market.codec import encode
from ledger.market.service import Marketplace
from ledger.money import units
from ledger.store import LedgerApplication
from ledger.usage import (
    OffsetAdvance,
    UsageApplication,
    UsageConflictError,
    state_of,
    usage_of_state,
)
from tests.market import Clock, Market, build_market, uid
from workers.broker import Topic, create_topics, embedded_broker, free_port
from workers.ingest import DECODE_PROCESSES, Ingest, IngestStats, IngestTopics
from workers.messages import (
    HEARTBEAT_TYPE,
    MESSAGE_BYTES_MAX,
    USAGE_TYPE,
    VERDICT_TYPE,
)
from workers.signing import NodeKey

ROOT = Path(__file__).resolve().parents[2]
PRICE = units(2)
GPUS_PER_NODE = 8
JOIN_TIMEOUT_S = 60.0
SESSION_TIMEOUT_MS = 3_000
"""Short, so that group joins (and a crashed member's eviction) take seconds, not ten."""


# -- the market ---------------------------------------------------------------------------


def node_key(name: str) -> NodeKey:
    return NodeKey.from_seed(hashlib.sha256(b"seed:" + name.encode()).digest())


def signed_node(name: str) -> Node:
    return Node(uid(name), "H100", GPUS_PER_NODE, 81_920, "eu-west", node_key(name).public_key_hex)


def open_leases(market: Market, provider: str, node: str, count: int) -> list[UUID]:
    """`provider` lists `node` (signed reports), asks for `count` GPUs; consumer c-<provider>
    bids for one GPU `count` times: `count` leases on the node."""
    assert count <= GPUS_PER_NODE
    market.provider(provider, signed_node(node), bond=units(100 * GPUS_PER_NODE))
    consumer = f"c-{provider}"
    market.deposit(consumer, units(1_000))
    market.ask(f"ask-{provider}", provider, node, PRICE, gpu_count=count)
    leases = []
    for i in range(count):
        handled = market.bid(f"bid-{provider}-{i}", consumer, units(3), gpu_count=1)
        leases.extend(handled.lease_ids)
    return leases


# -- messages -----------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.isoformat()


def usage_value(
    lease_id: UUID,
    node: str,
    sequence: int,
    start: datetime,
    length_s: int = 10,
    *,
    signer: str | None = None,
    envelope_id: UUID | None = None,
    signed: bool = True,
    **changes: Any,
) -> bytes:
    """A usage report envelope, signed by `signer`'s key (default: the node's own)."""
    data: dict[str, Any] = {
        "lease_id": str(lease_id),
        "node_id": str(uid(node)),
        "sequence": sequence,
        "interval_start": iso(start),
        "interval_end": iso(start + timedelta(seconds=length_s)),
        "gpu_count": 1,
        "wall_time_us": length_s * 1_000_000,
        "device_time_us": length_s * 900_000,
        "flops": 10**15 + sequence,
        "samples": 64 * sequence,
        "tokens": 0,
        "steps": sequence,
        "peak_memory_bytes": 2**33,
        "workload": "train",
        "device": "cuda",
    }
    data.update(changes)
    if signed:
        data["signature"] = node_key(signer or node).sign(data)
    return envelope_value(USAGE_TYPE, f"node/{uid(node)}", str(lease_id), data, envelope_id)


def envelope_value(
    type_: str, source: str, subject: str, data: dict[str, Any], envelope_id: UUID | None = None
) -> bytes:
    return orjson.dumps(
        {
            "id": str(envelope_id or uuid4()),
            "type": type_,
            "source": source,
            "subject": subject,
            "time": "2026-12-01T12:00:00+00:00",
            "data": data,
        }
    )


def heartbeat_value(
    lease_id: UUID, node: str, sequence: int, at: datetime, signed: bool = True
) -> bytes:
    data: dict[str, Any] = {
        "lease_id": str(lease_id),
        "node_id": str(uid(node)),
        "sequence": sequence,
        "at": iso(at),
    }
    if signed:
        data["signature"] = node_key(node).sign(data)
    return envelope_value(HEARTBEAT_TYPE, f"node/{uid(node)}", str(lease_id), data)


@dataclass
class Kafka:
    bootstrap: str
    topics: IngestTopics
    suffix: str
    produced: dict[tuple[str, int], int] = field(default_factory=dict)

    def produce(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> list[Any]:
        """Produce in order; the records' metadata."""
        return asyncio.run(self.aproduce(topic, messages))

    async def aproduce(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> list[Any]:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=False,
            max_request_size=4 * 1024 * 1024,
        )
        await producer.start()
        try:
            sent = [await producer.send(topic, value, key=key) for key, value in messages]
            records = list(await asyncio.gather(*sent))
        finally:
            await producer.stop()
        for r in records:
            tp = (r.topic, r.partition)
            self.produced[tp] = max(self.produced.get(tp, 0), r.offset + 1)
        return records

    def usage(self, messages: list[tuple[UUID | bytes | None, bytes]]) -> list[Any]:
        """Produce usage messages; a UUID key is a lease id, sent as its text."""
        return self.produce(self.topics.usage.name, keyed(messages))

    def records(self, topic: Topic) -> list[Any]:
        """Every record of the topic, as a consumer reads it."""
        return asyncio.run(self.arecords(topic))

    async def arecords(self, topic: Topic) -> list[Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            found: list[Any] = []
            while batch := await consumer.getmany(*tps, timeout_ms=1_000):
                found.extend(r for records in batch.values() for r in records)
            return found
        finally:
            await consumer.stop()

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter's envelope, in order."""

        async def go() -> list[dict[str, Any]]:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
            await consumer.start()
            try:
                tp = TopicPartition(self.topics.dead_letter.name, 0)
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                found: list[dict[str, Any]] = []
                while batch := await consumer.getmany(tp, timeout_ms=1_000):
                    found.extend(orjson.loads(r.value) for r in batch.get(tp, []))
                return found
            finally:
                await consumer.stop()

        return asyncio.run(go())

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """The next offset of every partition produced to (from the records' metadata: the
        embedded broker's ListOffsets answers a batch's base offset + 1)."""
        return dict(self.produced)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def kafka(kafka_bootstrap: str) -> Kafka:
    suffix = uuid4().hex[:10]
    topics = IngestTopics().suffixed(suffix)
    asyncio.run(create_topics(kafka_bootstrap, topics.all()))
    return Kafka(kafka_bootstrap, topics, suffix)


@pytest.fixture
def market(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> Market:
    return build_market(ledger_app, ledger_env)


@pytest.fixture
def usage(ledger_app: LedgerApplication, ledger_env: dict[str, str]) -> UsageApplication:
    return UsageApplication(ledger_app.app_recorder.datastore, env=ledger_env)


@pytest.fixture
def ingest_service(ledger_env: dict[str, str], market: Market) -> Iterator[Marketplace]:
    """A second marketplace service (its own pool and writer), as an ingest process has:
    it learns what the test's service records only by reading the log."""
    app = LedgerApplication(env=ledger_env)
    service = build_market(app, ledger_env).service
    service.clock = market.clock
    yield service
    app.close()


def run_ingest(
    kafka: Kafka,
    group_id: str,
    usage: UsageApplication,
    service: Marketplace,
    clock: Clock,
    decode_processes: int = DECODE_PROCESSES,
) -> IngestStats:
    async def go() -> IngestStats:
        ingest = Ingest(
            kafka.bootstrap,
            group_id,
            usage,
            service,
            topics=kafka.topics,
            clock=clock,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            decode_processes=decode_processes,
        )
        async with ingest:
            return await ingest.run_until_caught_up(timeout_s=JOIN_TIMEOUT_S)

    return asyncio.run(go())


def stored_rows(usage: UsageApplication) -> list[tuple[UUID, int, UsageRecorded]]:
    """(lease, sequence, fact) of every usage event, in log order."""
    return [(f.lease_id, f.sequence, f) for _, f in usage.read()]


# -- the recorder -------------------------------------------------------------------------


def fact(lease_id: UUID, sequence: int) -> UsageRecorded:
    start = datetime(2026, 12, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=10 * sequence)
    return UsageRecorded(
        uuid4(), lease_id, uuid4(), sequence, start, start + timedelta(seconds=10), 1,
        10_000_000, 9_000_000, 10**20, 1, 2, 3, 4, "train", "cpu", start,
    )  # fmt: skip


def test_events_and_offsets_are_written_together_and_a_conflict_writes_neither(usage):
    lease_id = uuid4()
    usage.record([fact(lease_id, 1)], "g", [OffsetAdvance("t", 0, None, 5)])
    assert usage.stored_offsets("g", [("t", 0), ("t", 1)]) == {("t", 0): 5}
    assert usage.last_usage(lease_id) is not None

    # The same sequence again: the unique key refuses it, and the offset did not move.
    with pytest.raises(UsageConflictError, match="already stored"):
        usage.record([fact(lease_id, 2), fact(lease_id, 1)], "g", [OffsetAdvance("t", 0, 5, 9)])
    assert usage.stored_offsets("g", [("t", 0)]) == {("t", 0): 5}
    assert [s for _, s, _ in stored_rows(usage)] == [1]

    # An offset that someone else moved: refused, and the events are not written either.
    with pytest.raises(UsageConflictError, match="no longer at offset 4"):
        usage.record([fact(lease_id, 2)], "g", [OffsetAdvance("t", 0, 4, 9)])
    with pytest.raises(UsageConflictError, match="no longer at offset None"):
        usage.record([], "g", [OffsetAdvance("t", 0, None, 9)])
    assert [s for _, s, _ in stored_rows(usage)] == [1]

    # Offsets alone (a batch of rejected messages) advance too.
    usage.record([], "g", [OffsetAdvance("t", 0, 5, 7), OffsetAdvance("t", 1, None, 1)])
    assert usage.stored_offsets("g", [("t", 0), ("t", 1)]) == {("t", 0): 7, ("t", 1): 1}
    assert usage.stored_offsets("other group", [("t", 0)]) == {}


def test_usage_events_are_append_only_and_stored_as_plain_json(usage, database_url):
    f = fact(uuid4(), 1)
    usage.record([f], "g", [])
    schema = usage.usage_recorder.datastore.schema
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT topic, state FROM {}.usage_events").format(sql.Identifier(schema))
        ).fetchone()
        assert row is not None
        assert row[0] == "domain.usage:UsageRecorded"
        state = orjson.loads(row[1])
        assert state["flops"] == str(10**20) and state["lease_id"] == str(f.lease_id)
        assert usage_of_state(bytes(row[1])) == f
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(
                sql.SQL("UPDATE {}.usage_events SET state = %s").format(sql.Identifier(schema)),
                (b"{}",),
            )
    assert usage.usage_recorder.insert_events(
        [StoredEvent(uuid4(), 1, "x", b"{}")]
    )  # the library's own path still works beside ours


# -- ingest end to end --------------------------------------------------------------------


def test_valid_reports_are_stored_and_each_bad_message_is_dead_lettered_with_its_reason(
    kafka, market, usage, ingest_service
):
    start = market.clock.now
    l1, l2 = open_leases(market, "p1", "n1", 2)
    open_leases(market, "p2", "n2", 1)
    market.clock.advance(5)
    market.send(m.CloseLease(uuid4(), l2, CloseReason.consumer, uid("c-p1")))
    # Opened after the ingest's service read the log: ingest must look again.
    (l3,) = open_leases(market, "p3", "n3", 1)
    market.clock.advance(120)
    now = market.clock.now

    valid_2 = usage_value(l1, "n1", 2, start + timedelta(seconds=10))
    bad_l1 = {
        "duplicate": valid_2,
        "replayed": usage_value(l1, "n1", 2, start + timedelta(seconds=20)),
        "out_of_order": usage_value(l1, "n1", 20, start + timedelta(seconds=20)),
        "overlapping_interval": usage_value(l1, "n1", 3, start + timedelta(seconds=15)),
        "impossible_interval": usage_value(l1, "n1", 3, start + timedelta(seconds=20), 0),
        "impossible_device_time": usage_value(
            l1, "n1", 3, start + timedelta(seconds=20), device_time_us=20_000_000
        ),
        "unsigned": usage_value(l1, "n1", 3, start + timedelta(seconds=20), signed=False),
        "signature_invalid": usage_value(
            l1, "n1", 3, start + timedelta(seconds=20), signer="someone else"
        ),
        "node_mismatch": usage_value(l1, "n2", 3, start + timedelta(seconds=20)),
    }
    unknown_lease = uuid4()
    bad_other: dict[str, tuple[bytes, bytes]] = {
        "malformed": (b"junk", b"{not json"),
        "oversized": (b"big", b"x" * (MESSAGE_BYTES_MAX + 1)),
        "unknown_type": (
            str(l1).encode(),
            envelope_value("aether.other.v1", "node/x", str(l1), {"what": 1}),
        ),
        "unknown_lease": (
            str(unknown_lease).encode(),
            usage_value(unknown_lease, "n1", 1, start),
        ),
        "lease_closed": (str(l2).encode(), usage_value(l2, "n1", 1, start)),
    }
    kafka.usage(
        [
            (l1, usage_value(l1, "n1", 1, start)),
            (l1, valid_2),
            *[(l1, value) for value in bad_l1.values()],
            (l1, usage_value(l1, "n1", 3, start + timedelta(seconds=20))),
            *bad_other.values(),
            (l3, usage_value(l3, "n3", 1, start + timedelta(seconds=100), 5)),
        ]
    )
    kafka.produce(
        kafka.topics.heartbeats.name,
        [
            (str(l1).encode(), heartbeat_value(l1, "n1", 1, now)),
            (str(l1).encode(), heartbeat_value(l1, "n1", 1, now)),  # a new message, same beat
            (str(l1).encode(), heartbeat_value(l1, "n1", 2, now, signed=False)),
        ],
    )
    verdict = {
        "verdict_id": str(uuid4()),
        "checker_id": str(uuid4()),
        "node_id": str(uid("n1")),
        "provider_id": str(uid("p1")),
        "window_start": "2026-12-01T12:00:00+00:00",
        "window_end": "2026-12-01T12:15:00+00:00",
        "latency_ms_p99": 100,
        "throughput_milli_per_s": 1000,
        "uptime_ppm": 1_000_000,
        "passed": True,
        "failure_kind": "none",
        "evidence_hash": "ab" * 32,
    }
    kafka.produce(
        kafka.topics.verdicts.name,
        [(str(uid("n1")).encode(), envelope_value(VERDICT_TYPE, "checker/x", "n1", verdict))],
    )

    group_id = f"g-{uuid4()}"
    stats = run_ingest(kafka, group_id, usage, ingest_service, market.clock)

    assert sorted((str(lease), seq) for lease, seq, _ in stored_rows(usage)) == sorted(
        [(str(l1), 1), (str(l1), 2), (str(l1), 3), (str(l3), 1)]
    )
    letters = kafka.dead_letters()
    reasons = [d["data"]["reason"] for d in letters]
    expected = [*bad_l1, *bad_other, "refused", "unsigned", "refused"]
    assert sorted(reasons) == sorted(expected)
    by_reason = {d["data"]["reason"]: d for d in letters}
    assert by_reason["duplicate"]["data"]["value"] == valid_2.decode()
    assert by_reason["oversized"]["data"]["value_bytes"] == MESSAGE_BYTES_MAX + 1
    assert by_reason["malformed"]["data"]["key"] == "junk"
    refusals = sorted(
        d["data"]["detail"].split(":")[0] for d in letters if d["data"]["reason"] == "refused"
    )
    assert refusals == ["sequence_already_recorded", "verdict_from_unregistered_checker"]
    assert all(d["type"] == "aether.dead_letter.v1" for d in letters)
    assert stats.recorded == 4 and stats.commands == 1

    # The heartbeat went through the marketplace; every partition's offset is stored.
    lease = market.service.lease(l1)
    assert lease is not None and lease.heartbeat_sequence == 0  # the test's service...
    market.send(m.Tick(uuid4()))  # ...reads the log before a command
    lease = market.service.lease(l1)
    assert lease is not None and lease.heartbeat_sequence == 1
    ends = kafka.end_offsets()
    assert usage.stored_offsets(group_id, ends) == ends


def reports(
    leases: list[UUID], node: str, start: datetime, sequences: range, length_s: int = 10
) -> list[tuple[UUID | bytes | None, bytes]]:
    """Valid consecutive reports of each lease (interval i starts (i-1) x length_s in)."""
    return [
        (
            lease,
            usage_value(lease, node, s, start + timedelta(seconds=length_s * (s - 1)), length_s),
        )
        for s in sequences
        for lease in leases
    ]


def test_a_restart_resumes_from_the_stored_offsets_and_counts_nothing_twice(
    kafka, market, usage, ingest_service
):
    start = market.clock.now
    leases = open_leases(market, "p1", "n1", 4)
    market.clock.advance(600)
    group_id = f"g-{uuid4()}"
    kafka.usage(reports(leases, "n1", start, range(1, 6)))
    first = run_ingest(kafka, group_id, usage, ingest_service, market.clock)
    assert (first.consumed, first.recorded) == (20, 20)

    kafka.usage(reports(leases, "n1", start, range(6, 9)))
    second = run_ingest(kafka, group_id, usage, ingest_service, market.clock)

    # Only the new messages were read: the old ones would have come back as duplicates.
    assert (second.consumed, second.recorded, second.dead_lettered) == (12, 12, 0)
    stored = sorted((str(lease), seq) for lease, seq, _ in stored_rows(usage))
    assert stored == sorted((str(lease), s) for lease in leases for s in range(1, 9))
    assert kafka.dead_letters() == []
    assert usage.stored_offsets(group_id, kafka.end_offsets()) == kafka.end_offsets()


def expected_fact(record: Any) -> UsageRecorded:
    """The fact a valid usage record records (received_at: the record's timestamp)."""
    envelope = orjson.loads(record.value)
    d = envelope["data"]
    return UsageRecorded(
        UUID(envelope["id"]), UUID(d["lease_id"]), UUID(d["node_id"]), d["sequence"],
        datetime.fromisoformat(d["interval_start"]), datetime.fromisoformat(d["interval_end"]),
        d["gpu_count"], d["wall_time_us"], d["device_time_us"], d["flops"], d["samples"],
        d["tokens"], d["steps"], d["peak_memory_bytes"], d["workload"], d["device"],
        datetime.fromtimestamp(record.timestamp // 1000, UTC)
        + timedelta(milliseconds=record.timestamp % 1000),
    )  # fmt: skip


def ingest_process(
    kafka: Kafka, group_id: str, schema: str, database_url: str, *args: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "POSTGRES_SCHEMA": schema,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
    }
    return subprocess.Popen(
        [
            sys.executable, "-m", "workers.ingest", "--group-id", group_id,
            "--topics-suffix", kafka.suffix, "--session-timeout-ms", str(SESSION_TIMEOUT_MS), *args,
        ],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def count_usage(database_url: str, schema: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.usage_events").format(sql.Identifier(schema))
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_kill_9_mid_batch_then_a_restart_stores_exactly_what_a_run_without_the_crash_stores(
    kafka, market, usage, schema, database_url
):
    # The ingest processes run on the real clock: the leases opened an hour ago.
    market.clock.now = datetime.now(UTC) - timedelta(hours=1)
    start = market.clock.now
    leases = open_leases(market, "p1", "n1", 8)
    messages = reports(leases, "n1", start, range(1, 1_001), length_s=1)
    kafka.usage(messages)
    expected = sorted(
        (expected_fact(r) for r in kafka.records(kafka.topics.usage)),
        key=lambda f: (str(f.lease_id), f.sequence),
    )
    assert len(expected) == len(messages)
    group_id = f"g-{uuid4()}"

    crashing = ingest_process(kafka, group_id, schema, database_url, "--batch-records-max", "100")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while (stored_at_kill := count_usage(database_url, schema)) < 500:
        assert crashing.poll() is None, crashing.communicate()[0].decode()
        assert time.monotonic() < deadline, "the ingest process stored nothing"
        time.sleep(0.005)
    crashing.send_signal(signal.SIGKILL)
    crashing.wait(10)
    assert stored_at_kill < len(messages), "the ingest was not killed in the middle"

    restarted = ingest_process(kafka, group_id, schema, database_url, "--until-caught-up")
    output = restarted.communicate(timeout=JOIN_TIMEOUT_S)[0].decode()
    assert restarted.returncode == 0, output

    stored = sorted(
        (f for _, _, f in stored_rows(usage)), key=lambda f: (str(f.lease_id), f.sequence)
    )
    assert stored == expected
    assert kafka.dead_letters() == []
    assert usage.stored_offsets(group_id, kafka.end_offsets()) == kafka.end_offsets()


def test_ingest_started_before_the_broker_waits_for_it_and_then_works(
    market, usage, ingest_service, caplog
):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    suffix = uuid4().hex[:10]
    topics = IngestTopics().suffixed(suffix)
    kafka = Kafka(bootstrap, topics, suffix)
    stop_broker = threading.Event()

    def late_broker() -> None:
        time.sleep(2.0)
        with embedded_broker(port) as servers:
            asyncio.run(create_topics(servers, topics.all()))
            stop_broker.wait(JOIN_TIMEOUT_S)

    start = market.clock.now
    (lease,) = open_leases(market, "p1", "n1", 1)
    market.clock.advance(60)
    broker = threading.Thread(target=late_broker, daemon=True)
    broker.start()
    caplog.set_level(logging.WARNING, logger="workers.ingest")
    try:

        async def go() -> IngestStats:
            ingest = Ingest(
                bootstrap,
                f"g-{uuid4()}",
                usage,
                ingest_service,
                topics=topics,
                clock=market.clock,
                session_timeout_ms=SESSION_TIMEOUT_MS,
            )
            async with ingest:
                await kafka.aproduce(
                    topics.usage.name, [(str(lease).encode(), usage_value(lease, "n1", 1, start))]
                )
                return await ingest.run_until_caught_up(timeout_s=JOIN_TIMEOUT_S)

        stats = asyncio.run(go())
    finally:
        stop_broker.set()
        broker.join(15)
    assert stats.recorded == 1
    assert [(lease_id, seq) for lease_id, seq, _ in stored_rows(usage)] == [(lease, 1)]
    waits = [r.getMessage() for r in caplog.records if "waiting for Kafka" in r.getMessage()]
    assert waits and waits[0].startswith(f"waiting for Kafka at {bootstrap}: ")
    assert "; retrying in " in waits[0]


@given(st.integers(0, 2**127), st.integers(1, 2**63 - 1), st.datetimes(timezones=st.just(UTC)))
def test_the_stored_state_of_a_usage_fact_is_exactly_the_codecs_json(flops, sequence, moment):
    f = replace(fact(uuid4(), 1), flops=flops, sequence=sequence, received_at=moment)
    assert state_of(f) == orjson.dumps(encode(f))
    assert usage_of_state(state_of(f)) == f


ASSIGNED = re.compile(r"ingest \S+ assigned (\d+) partitions")


class Lines:
    """Collects a process's output lines in a thread (so it never blocks on a full pipe)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        stdout = process.stdout
        self._thread = threading.Thread(
            target=lambda: self.lines.extend(line.decode() for line in stdout), daemon=True
        )
        self._thread.start()

    def assigned(self) -> int | None:
        """How many partitions the latest assignment gave the process."""
        found = [m for line in self.lines if (m := ASSIGNED.search(line))]
        return int(found[-1].group(1)) if found else None

    def text(self) -> str:
        self._thread.join(10)
        return "".join(self.lines)


def test_two_ingest_processes_in_one_group_share_the_partitions_and_count_nothing_twice(
    kafka, market, usage, schema, database_url
):
    market.clock.now = datetime.now(UTC) - timedelta(hours=1)
    start = market.clock.now
    leases = open_leases(market, "p1", "n1", 8)
    group_id = f"g-{uuid4()}"
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    processes = [ingest_process(kafka, group_id, schema, database_url)]
    outputs = [Lines(processes[0])]
    # One after the other: two processes creating the event tables at the same moment can
    # collide on the schema's shared insert function ("tuple concurrently updated").
    while not any(" reading " in line for line in outputs[0].lines):
        assert processes[0].poll() is None and time.monotonic() < deadline, outputs[0].text()
        time.sleep(0.02)
    processes.append(ingest_process(kafka, group_id, schema, database_url))
    outputs.append(Lines(processes[1]))
    try:
        while (
            not all((o.assigned() or 0) in range(1, 20) for o in outputs)
            or sum(o.assigned() or 0 for o in outputs) != 20
        ):
            assert all(p.poll() is None for p in processes), [o.text() for o in outputs]
            assert time.monotonic() < deadline, [o.text() for o in outputs]
            time.sleep(0.05)
        messages = reports(leases, "n1", start, range(1, 301), length_s=1)
        kafka.usage(messages)
        while count_usage(database_url, schema) < len(messages):
            assert time.monotonic() < deadline, [o.text() for o in outputs]
            time.sleep(0.05)
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            p.wait(30)
    texts = [o.text() for o in outputs]
    recorded = [int(t.split(" recorded=")[-1].split()[0]) for t in texts]
    assert all(n > 0 for n in recorded) and sum(recorded) == len(messages), texts
    stored = sorted((str(lease), seq) for lease, seq, _ in stored_rows(usage))
    assert stored == sorted((str(lease), s) for lease in leases for s in range(1, 301))
    assert kafka.dead_letters() == []
    assert usage.stored_offsets(group_id, kafka.end_offsets()) == kafka.end_offsets()


def test_a_commit_after_another_consumer_moved_the_offsets_is_refused_and_ingest_resumes_there(
    kafka, market, usage, ingest_service
):
    start = market.clock.now
    (lease,) = open_leases(market, "p1", "n1", 1)
    market.clock.advance(600)
    group_id = f"g-{uuid4()}"

    async def go() -> IngestStats:
        ingest = Ingest(
            kafka.bootstrap,
            group_id,
            usage,
            ingest_service,
            topics=kafka.topics,
            clock=market.clock,
            session_timeout_ms=SESSION_TIMEOUT_MS,
        )
        async with ingest:
            await kafka.aproduce(
                kafka.topics.usage.name, keyed(reports([lease], "n1", start, range(1, 11)))
            )
            await ingest.run_until_caught_up(timeout_s=JOIN_TIMEOUT_S)
            # Another member of the group (say, before a rebalance reached this one) reads
            # and stores 11..15 first.
            sent = await kafka.aproduce(
                kafka.topics.usage.name, keyed(reports([lease], "n1", start, range(11, 16)))
            )
            tp = (sent[0].topic, sent[0].partition)
            theirs = [
                expected_fact(r) for r in await kafka.arecords(kafka.topics.usage) if r.offset >= 10
            ]
            usage.record(theirs, group_id, [OffsetAdvance(*tp, 10, 15)])
            await kafka.aproduce(
                kafka.topics.usage.name, keyed(reports([lease], "n1", start, range(16, 17)))
            )
            return await ingest.run_until_caught_up(timeout_s=JOIN_TIMEOUT_S)

    stats = asyncio.run(go())
    assert stats.conflicts == 1
    assert [seq for _, seq, _ in sorted(stored_rows(usage), key=lambda r: r[1])] == list(
        range(1, 17)
    )
    assert kafka.dead_letters() == []
    assert usage.stored_offsets(group_id, kafka.end_offsets()) == kafka.end_offsets()


def keyed(messages: list[tuple[UUID | bytes | None, bytes]]) -> list[tuple[bytes | None, bytes]]:
    return [(str(k).encode() if isinstance(k, UUID) else k, v) for k, v in messages]
