"""What a node's `NodeReporter` sends: ONE signed usage batch per interval (or per
`intervals` intervals) with the reports of all the node's leases, keyed by the node, that
verifies against the node's key and fails when any report is changed; split when it would
be oversized; the same reports keep the same envelope id."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest

from workers.gpu_worker import NodeReporter
from workers.messages import (
    BATCH_REPORTS_MAX,
    MESSAGE_BYTES_MAX,
    USAGE_BATCH_TYPE,
    Envelope,
    UsageReport,
    batch_reports,
    decode_envelope,
    usage_batch,
)
from workers.signing import NodeKey, canonical_bytes, public_key, verify, verify_bytes

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class FakeProducer:
    """An in-memory twin of AIOKafkaProducer.send: delivered at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[Any]:
        self.sent.append((topic, value, key))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def report(lease_id: UUID, node_id: UUID, sequence: int, **changes: Any) -> UsageReport:
    start = START + timedelta(seconds=10 * (sequence - 1))
    fields: dict[str, Any] = {
        "lease_id": lease_id, "node_id": node_id, "sequence": sequence,
        "interval_start": start, "interval_end": start + timedelta(seconds=10),
        "gpu_count": 1, "wall_time_us": 10_000_000, "device_time_us": 9_000_000,
        "flops": 2**70, "samples": 640, "tokens": 0, "steps": 10,
        "peak_memory_bytes": 2**33, "workload": "train", "device": "cuda",
    }  # fmt: skip
    return UsageReport.model_validate({**fields, **changes})


async def run(
    node_id: UUID, key: NodeKey, leases: list[UUID], intervals: int, sequences: int
) -> tuple[FakeProducer, NodeReporter]:
    producer = FakeProducer()
    reporter = NodeReporter(node_id, key, producer, intervals=intervals)
    for lease_id in leases:
        reporter.register(lease_id, 10.0)
    for sequence in range(1, sequences + 1):
        for lease_id in leases:
            await reporter.add(report(lease_id, node_id, sequence))
    for lease_id in leases:
        await reporter.done(lease_id)
    return producer, reporter


def test_one_signed_batch_per_intervals_carries_every_lease_of_the_node() -> None:
    node_id, key = uuid4(), NodeKey.from_seed(bytes(range(32)))
    leases = [uuid4() for _ in range(8)]
    producer, reporter = asyncio.run(run(node_id, key, leases, intervals=2, sequences=5))
    # 5 intervals, 2 per batch: 2 full batches and the last interval at the end.
    assert [len(usage_batch(decode_envelope(v))["reports"]) for _, v, _ in producer.sent] == [
        16,
        16,
        8,
    ]
    assert (reporter.batches_sent, reporter.reports_sent) == (3, 40)
    seen: list[UsageReport] = []
    for topic, value, message_key in producer.sent:
        message = decode_envelope(value)
        assert topic == "aether.usage" and message_key == str(node_id).encode()
        assert message.type == USAGE_BATCH_TYPE and message.subject == str(node_id)
        assert message.source == f"node/{node_id}"
        data = message.data
        assert verify(key.public_key_hex, data, data["signature"])
        loaded = public_key(key.public_key_hex)
        assert loaded is not None
        assert verify_bytes(loaded, canonical_bytes(data), bytes.fromhex(data["signature"]))
        seen.extend(batch_reports(message))
    assert sorted((str(r.lease_id), r.sequence) for r in seen) == sorted(
        (str(lease_id), s) for lease_id in leases for s in range(1, 6)
    )
    assert all(r.flops == 2**70 for r in seen)  # past 2**64: sent as a decimal string
    assert b'"flops":"1180591620717411303424"' in producer.sent[0][1]


def test_a_changed_report_or_another_key_does_not_verify() -> None:
    node_id, key = uuid4(), NodeKey.from_seed(bytes(32))
    producer, _ = asyncio.run(run(node_id, key, [uuid4(), uuid4()], intervals=1, sequences=1))
    data = orjson.loads(producer.sent[0][1])["data"]
    signature = data["signature"]
    assert verify(key.public_key_hex, data, signature)
    for name, value in data["reports"][1].items():
        changed = value + 1 if isinstance(value, int) else f"{value}x"
        reports = [data["reports"][0], {**data["reports"][1], name: changed}]
        assert not verify(key.public_key_hex, {**data, "reports": reports}, signature), name
    assert not verify(key.public_key_hex, {**data, "reports": data["reports"][::-1]}, signature)
    assert not verify(NodeKey.from_seed(b"\x01" * 32).public_key_hex, data, signature)


def test_a_batch_that_would_be_oversized_is_split_and_keeps_its_ids_when_resent() -> None:
    node_id, key = uuid4(), NodeKey.from_seed(bytes(range(32)))
    leases = [uuid4() for _ in range(8)]
    long_text = {"workload": "w" * 128, "device": "d" * 128}

    async def go() -> FakeProducer:
        producer = FakeProducer()
        reporter = NodeReporter(node_id, key, producer, intervals=BATCH_REPORTS_MAX)
        for lease_id in leases:
            reporter.register(lease_id, 10.0)
        for sequence in range(1, 21):
            for lease_id in leases:
                await reporter.add(report(lease_id, node_id, sequence, **long_text))
        await reporter.close()
        return producer

    first, again = asyncio.run(go()), asyncio.run(go())
    sizes = [len(v) for _, v, _ in first.sent]
    assert len(sizes) >= 3 and all(size <= MESSAGE_BYTES_MAX for size in sizes)
    counts = [len(usage_batch(decode_envelope(v))["reports"]) for _, v, _ in first.sent]
    assert sum(counts) == 160 and all(c <= BATCH_REPORTS_MAX for c in counts)
    ids = [Envelope.model_validate_json(v).id for _, v, _ in first.sent]
    assert ids == [Envelope.model_validate_json(v).id for _, v, _ in again.sent]
    assert len(set(ids)) == len(ids)


def test_a_reporter_refuses_reports_of_leases_it_does_not_serve() -> None:
    node_id = uuid4()

    async def go() -> None:
        reporter = NodeReporter(node_id, NodeKey.from_seed(bytes(32)), FakeProducer())
        lease_id = uuid4()
        reporter.register(lease_id, 10.0)
        with pytest.raises(ValueError, match="already reported"):
            reporter.register(lease_id, 10.0)
        with pytest.raises(ValueError, match="not served"):
            await reporter.add(report(uuid4(), node_id, 1))
        with pytest.raises(ValueError, match="not served"):
            await reporter.add(report(lease_id, uuid4(), 1))

    asyncio.run(go())
    with pytest.raises(ValueError, match="intervals"):
        NodeReporter(node_id, NodeKey.from_seed(bytes(32)), FakeProducer(), intervals=0)
