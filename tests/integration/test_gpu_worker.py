"""A GPU worker runs a real CPU training workload against the real broker, and what it
sent is read back: valid, signed envelopes in sequence."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from workers.broker import HEARTBEATS, USAGE
from workers.gpu_worker import GpuWorker, RunSummary
from workers.messages import (
    HEARTBEAT_TYPE,
    USAGE_TYPE,
    HeartbeatReport,
    UsageReport,
    decode_envelope,
)
from workers.signing import NodeKey, verify
from workers.workloads import TrainingWorkload, WorkloadSize

RUN_SECONDS = 2.0
REPORT_INTERVAL_S = 0.5
HEARTBEAT_INTERVAL_S = 0.4
READ_TIMEOUT_S = 10.0


async def _end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic.name, p)
            for topic in (USAGE, HEARTBEATS)
            for p in range(topic.partitions)
        ]
        offsets: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return offsets
    finally:
        await consumer.stop()


async def _read_between(
    bootstrap: str, before: dict[TopicPartition, int], after: dict[TopicPartition, int]
) -> list[tuple[str, bytes, bytes]]:
    grown = [tp for tp in after if after[tp] > before[tp]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: list[tuple[str, bytes, bytes]] = []
    try:
        consumer.assign(grown)
        for tp in grown:
            consumer.seek(tp, before[tp])
        next_offset = dict(before)
        async with asyncio.timeout(READ_TIMEOUT_S):
            while any(next_offset[tp] < after[tp] for tp in grown):
                batches = await consumer.getmany(*grown, timeout_ms=200)
                for tp, batch in batches.items():
                    for r in batch:
                        if r.offset < after[tp]:
                            records.append((tp.topic, bytes(r.key), bytes(r.value)))
                        next_offset[tp] = max(next_offset[tp], r.offset + 1)
    finally:
        await consumer.stop()
    return records


async def _run_worker(bootstrap: str, worker_kwargs: dict[str, object]) -> RunSummary:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5
    )
    await producer.start()
    try:
        worker = GpuWorker(producer=producer, **worker_kwargs)  # type: ignore[arg-type]
        return await worker.run(seconds_max=RUN_SECONDS)
    finally:
        await producer.stop()


def test_a_worker_sends_signed_usage_and_heartbeats_in_sequence(kafka_bootstrap: str) -> None:
    lease_id, node_id = uuid.uuid4(), uuid.uuid4()
    key = NodeKey.from_seed(uuid.uuid4().bytes * 2)
    before = asyncio.run(_end_offsets(kafka_bootstrap))
    summary = asyncio.run(
        _run_worker(
            kafka_bootstrap,
            {
                "lease_id": lease_id,
                "node_id": node_id,
                "key": key,
                "workload": TrainingWorkload(WorkloadSize.small, 1, torch.device("cpu")),
                "gpu_count": 1,
                "report_interval_s": REPORT_INTERVAL_S,
                "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
            },
        )
    )
    after = asyncio.run(_end_offsets(kafka_bootstrap))
    records = asyncio.run(_read_between(kafka_bootstrap, before, after))

    ours = [(topic, value) for topic, k, value in records if k == str(lease_id).encode()]
    usage: list[UsageReport] = []
    beats: list[HeartbeatReport] = []
    for topic, value in ours:
        message = decode_envelope(value)
        assert message.subject == str(lease_id)
        assert message.source == f"node/{node_id}"
        assert verify(key.public_key_hex, message.data, message.data["signature"])
        if topic == USAGE.name:
            assert message.type == USAGE_TYPE
            usage.append(UsageReport.model_validate(message.data))
        else:
            assert topic == HEARTBEATS.name
            assert message.type == HEARTBEAT_TYPE
            beats.append(HeartbeatReport.model_validate(message.data))

    assert len(usage) == summary.usage_reports >= 3
    assert len(beats) == summary.heartbeats >= 3
    assert [r.sequence for r in usage] == list(range(1, len(usage) + 1))
    assert [b.sequence for b in beats] == list(range(1, len(beats) + 1))
    assert all(r.samples > 0 and r.flops > 0 and r.steps > 0 for r in usage)
    assert sum(r.steps for r in usage) == summary.steps
    assert all(r.device_time_us <= r.wall_time_us * r.gpu_count for r in usage)
    for earlier, later in itertools.pairwise(usage):
        assert earlier.interval_end == later.interval_start
