"""The checker worker: judges nodes from their heartbeats on the real broker and produces
verdicts; the pure judging rules."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from domain.verdicts import VerdictRules, window_containing
from workers.broker import HEARTBEATS, VERDICTS
from workers.checker import Checker, CheckerRules, Observations, judge, p99_ms
from workers.messages import HEARTBEAT_TYPE, HeartbeatReport, VerdictReport, encode, envelope

RULES = CheckerRules(heartbeat_interval_s=1, uptime_ppm_min=900_000, close_delay_s=1)
WINDOWS = VerdictRules(verdict_window_s=10, verdict_grace_s=5)


def test_p99_is_the_nearest_rank():
    assert p99_ms([]) == 0
    assert p99_ms([5]) == 5
    assert p99_ms(range(1, 101)) == 99
    assert p99_ms(range(1, 201)) == 198


def test_a_node_that_sent_too_few_heartbeats_fails_for_downtime_and_evidence_is_stable():
    start = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    checker = uuid.uuid4()
    alive = Observations(uuid.uuid4(), uuid.uuid4(), start, heartbeats=10, delays_ms=[3, 1, 2])
    dying = Observations(uuid.uuid4(), uuid.uuid4(), start, heartbeats=4, delays_ms=[1])
    ok, bad = judge(alive, checker, RULES, WINDOWS), judge(dying, checker, RULES, WINDOWS)
    assert ok.passed and ok.uptime_ppm == 1_000_000 and ok.failure_kind == "none"
    assert not bad.passed and bad.uptime_ppm == 400_000 and bad.failure_kind == "downtime"
    assert judge(alive, checker, RULES, WINDOWS) == ok  # same id, same evidence hash
    assert ok.window_end - ok.window_start == timedelta(seconds=10)


def test_the_checker_judges_each_node_from_the_topic_and_produces_verdicts(kafka_bootstrap):
    checker_id, alive, dying, provider = (uuid.uuid4() for _ in range(4))
    lease_a, lease_b = uuid.uuid4(), uuid.uuid4()
    window = window_containing(datetime.now(UTC) - timedelta(seconds=40), WINDOWS)

    def beat(lease: uuid.UUID, node: uuid.UUID, seq: int, at: datetime) -> bytes:
        report = HeartbeatReport(lease_id=lease, node_id=node, sequence=seq, at=at)
        return encode(
            envelope(uuid.uuid4(), HEARTBEAT_TYPE, f"node/{node}", str(lease), at, report)
        )

    async def scenario() -> list[VerdictReport]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(10):
                at = window + timedelta(seconds=i)
                await producer.send(
                    HEARTBEATS.name, beat(lease_a, alive, i + 1, at), key=str(lease_a).encode()
                )
                if i < 4:
                    await producer.send(
                        HEARTBEATS.name, beat(lease_b, dying, i + 1, at), key=str(lease_b).encode()
                    )
            # a later heartbeat moves the checker's clock past the window's end
            later = window + timedelta(seconds=25)
            await producer.send_and_wait(
                HEARTBEATS.name, beat(lease_a, alive, 11, later), key=str(lease_a).encode()
            )
        finally:
            await producer.stop()
        checker = Checker(
            checker_id,
            {alive: provider, dying: provider},
            kafka_bootstrap,
            rules=RULES,
            verdict_rules=WINDOWS,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(
            checker.run(start_at=datetime.now(UTC) - timedelta(minutes=1), stop=stop)
        )
        for _ in range(200):
            if len([v for v in checker.sent if v.window_start == window]) >= 2:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        return [v for v in checker.sent if v.window_start == window]

    verdicts = {v.node_id: v for v in asyncio.run(scenario())}
    assert verdicts[alive].passed and verdicts[alive].uptime_ppm == 1_000_000
    assert not verdicts[dying].passed and verdicts[dying].uptime_ppm == 400_000

    async def read_back() -> set[uuid.UUID]:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [TopicPartition(VERDICTS.name, p) for p in range(VERDICTS.partitions)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            found: set[uuid.UUID] = set()
            for _ in range(50):
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        data = orjson.loads(r.value)["data"]
                        if data["checker_id"] == str(checker_id):
                            found.add(uuid.UUID(data["node_id"]))
                if found == {alive, dying}:
                    break
            return found
        finally:
            await consumer.stop()

    assert asyncio.run(read_back()) == {alive, dying}
