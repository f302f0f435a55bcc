# ruff: noqa: F811  (the fixtures imported from test_ingest are the test arguments)
"""Usage batches (``aether.usage_batch.v1``: one signed message per node and interval(s))
through the real broker into the real store: a valid batch is recorded report by report;
a forged, altered or unsigned batch is dead-lettered whole; one bad report in a good batch
is dead-lettered alone; a redelivered batch is counted once; an oversized batch is turned
away; what `NodeReporter` (the GPU worker's) sends is what ingest records.

One ingest run (one group join) covers all of it.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from ledger.market.service import Marketplace
from ledger.usage import UsageApplication, state_of
from tests.integration.test_ingest import (  # noqa: F401 (the fixtures)
    Kafka,
    ingest_service,
    iso,
    kafka,
    market,
    node_key,
    open_leases,
    run_ingest,
    stored_rows,
    usage,
    usage_value,
)
from tests.market import Market, uid
from workers.gpu_worker import NodeReporter
from workers.ingest import Ingest, _Batch
from workers.messages import (
    BATCH_REPORTS_MAX,
    MESSAGE_BYTES_MAX,
    USAGE_BATCH_TYPE,
    DecodedUsage,
    UsageReport,
    decode_usage,
)
from workers.signing import canonical_bytes, public_key, verify_bytes


def report(lease_id: UUID, sequence: int, start: datetime, length_s: int = 10, **changes: Any):
    """One lease's report in a batch (JSON, without node id and signature)."""
    data: dict[str, Any] = {
        "lease_id": str(lease_id),
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
    return data


def batch_value(
    node: str,
    reports: list[dict[str, Any]],
    *,
    signer: str | None = None,
    signed: bool = True,
    envelope_id: UUID | None = None,
    alter: dict[str, Any] | None = None,
) -> bytes:
    """A node's usage batch, signed by `signer`'s key (default: the node's); `alter`
    changes the first report after signing."""
    data: dict[str, Any] = {"node_id": str(uid(node)), "reports": reports}
    if signed:
        data["signature"] = node_key(signer or node).sign(data)
    if alter:
        data["reports"] = [{**reports[0], **alter}, *reports[1:]]
    return orjson.dumps(
        {
            "id": str(envelope_id or uuid4()),
            "type": USAGE_BATCH_TYPE,
            "source": f"node/{uid(node)}",
            "subject": str(uid(node)),
            "time": "2026-12-01T12:00:00+00:00",
            "data": data,
        }
    )


def by_node(node: str, value: bytes) -> tuple[bytes, bytes]:
    return (str(uid(node)).encode(), value)


async def send_with_reporter(
    kafka: Kafka, node: str, leases: list[UUID], start: datetime
) -> NodeReporter:
    """Two intervals of each lease, through the node's reporter, one batch per interval."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=False
    )
    await producer.start()
    try:
        reporter = NodeReporter(uid(node), node_key(node), producer, topic=kafka.topics.usage.name)
        for lease_id in leases:
            reporter.register(lease_id, 10.0)
        for sequence in (1, 2):
            begins = start + timedelta(seconds=10 * (sequence - 1))
            for lease_id in leases:
                fields = report(lease_id, sequence, begins)
                await reporter.add(
                    UsageReport.model_validate({**fields, "node_id": str(uid(node))})
                )
        for lease_id in leases:
            await reporter.done(lease_id)
        return reporter
    finally:
        await producer.stop()


@pytest.mark.parametrize("decode_processes", [1, 0], ids=["decode-process", "in-loop"])
def test_batches_are_verified_whole_and_decided_report_by_report(
    kafka: Kafka,
    market: Market,
    usage: UsageApplication,
    ingest_service: Marketplace,
    decode_processes: int,
) -> None:
    """Through a decode process (signatures checked there, rows through shared memory) and
    without one (all in the event loop's thread): the same events and dead letters."""
    start = market.clock.now
    l1, l2 = open_leases(market, "p1", "n1", 2)
    l3, l4, l5 = open_leases(market, "p2", "n2", 3)
    (l6,) = open_leases(market, "p3", "n3", 1)
    market.clock.advance(600)
    t = [start + timedelta(seconds=10 * i) for i in range(8)]

    valid = batch_value(
        "n1", [report(l1, 1, t[0]), report(l2, 1, t[0]), report(l1, 2, t[1]), report(l2, 2, t[1])]
    )
    forged = batch_value("n1", [report(l1, 3, t[2]), report(l2, 3, t[2])], signer="thief")
    altered = batch_value("n1", [report(l1, 3, t[2])], alter={"samples": 10**9})
    unsigned = batch_value("n1", [report(l1, 3, t[2])], signed=False)
    unknown_lease = uuid4()
    mixed_reports = [
        report(l1, 3, t[2]),  # good
        report(unknown_lease, 1, t[0]),  # unknown_lease
        report(l2, 3, t[1] + timedelta(seconds=5)),  # overlapping_interval
        report(l2, 3, t[2], device_time_us=11_000_000),  # impossible_device_time
        report(l2, 3, t[2]),  # good (the bad ones above recorded nothing)
    ]
    mixed = batch_value("n1", mixed_reports)
    too_many = batch_value("n1", [report(l1, 4, t[3])] * (BATCH_REPORTS_MAX + 1), signed=False)
    too_big = batch_value(
        "n1", [report(l1, 4, t[3], workload="w" * 128, device="d" * 128)] * BATCH_REPORTS_MAX
    )
    assert len(too_big) > MESSAGE_BYTES_MAX
    single = usage_value(l6, "n3", 1, t[0])  # the one-report format, beside batches

    kafka.usage(
        [
            by_node("n1", valid),
            by_node("n1", valid),  # redelivered: the very same message again
            by_node("n1", forged),
            by_node("n1", altered),
            by_node("n1", unsigned),
            by_node("n1", mixed),
            by_node("n1", too_many),
            by_node("n1", too_big),
            (str(l6).encode(), single),
        ]
    )
    reporter = asyncio.run(send_with_reporter(kafka, "n2", [l3, l4, l5], start))
    assert (reporter.batches_sent, reporter.reports_sent) == (2, 6)

    stats = run_ingest(kafka, f"g-{uuid4()}", usage, ingest_service, market.clock, decode_processes)

    stored = sorted((str(lease), seq) for lease, seq, _ in stored_rows(usage))
    expected = [(l1, s) for s in (1, 2, 3)] + [(l2, s) for s in (1, 2, 3)] + [(l6, 1)]
    expected += [(lease, s) for lease in (l3, l4, l5) for s in (1, 2)]
    assert stored == sorted((str(lease), s) for lease, s in expected)
    assert stats.recorded == len(expected)

    letters = [d["data"] for d in kafka.dead_letters()]
    whole = sorted(d["reason"] for d in letters if "report_index" not in d)
    assert whole == sorted(
        ["signature_invalid", "signature_invalid", "unsigned", "oversized", "oversized"]
    )
    per_report = {
        (d["reason"], d["report_index"], d["envelope_id"]) for d in letters if "report_index" in d
    }
    valid_id = orjson.loads(valid)["id"]
    mixed_id = orjson.loads(mixed)["id"]
    # The redelivered batch: each of its reports is already recorded, nothing twice.
    assert {(r, i) for r, i, e in per_report if e == valid_id} == {
        ("replayed", 0),
        ("replayed", 1),
        ("duplicate", 2),
        ("duplicate", 3),
    }
    assert {(r, i) for r, i, e in per_report if e == mixed_id} == {
        ("unknown_lease", 1),
        ("overlapping_interval", 2),
        ("impossible_device_time", 3),
    }
    unknown = next(d for d in letters if d["reason"] == "unknown_lease")
    assert orjson.loads(unknown["value"]) == mixed_reports[1]
    assert unknown["key"] == str(uid("n1"))
    assert len(letters) == 5 + 4 + 3

    # Every report of a batch carries the batch's envelope id; the states are the codec's.
    facts = {(f.lease_id, f.sequence): f for _, _, f in stored_rows(usage)}
    assert str(facts[(l1, 3)].envelope_id) == mixed_id
    assert str(facts[(l2, 1)].envelope_id) == valid_id
    assert facts[(l2, 3)].interval_start == t[2]
    for lease_id, sequence, stored_state in [
        (n.originator_id, n.originator_version, n.state)
        for n in usage.recorder.select_notifications(start=1, limit=100)
    ]:
        assert stored_state == state_of(facts[(lease_id, sequence)])


def test_a_signature_checked_in_a_decode_process_counts_only_under_the_nodes_key_now(
    market, usage, ingest_service
):
    """The ingest process hands a decode process the node's key as of the fetch; at the
    decision the verdict counts only if that is still the node's key (a stale one: the
    signed bytes are made again and checked here, against the key the node has now)."""
    (lease_id,) = open_leases(market, "p-keys", "n-keys", 1)
    ingest_service.refresh()
    ingest = Ingest("127.0.0.1:9", "g-keys", usage, ingest_service)
    topic = ingest.topics.usage.name
    start = market.clock.now
    batch = _Batch(0)

    def record(value: bytes) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(
            topic, 0, 0, 1_764_590_400_000, 0, b"k", value, None, 1, len(value), []
        )

    def decoded(value: bytes, key_of: str | None) -> DecodedUsage:
        keys = None if key_of is None else {uid("n-keys").int: node_key(key_of).public_key_hex}
        (answer,), _ = decode_usage(topic, [(value, 1_764_590_400_000)], keys)
        assert isinstance(answer, DecodedUsage)
        return answer

    genuine = batch_value("n-keys", [report(lease_id, 1, start)])
    forged = batch_value("n-keys", [report(lease_id, 1, start)], signer="someone-else")
    covered = canonical_bytes(orjson.loads(genuine)["data"])
    # Checked there against the node's key: taken as it is.
    assert ingest._checked_signature(batch, decoded(genuine, "n-keys"), record(genuine)) == (
        b"",
        True,
    )
    assert ingest._checked_signature(batch, decoded(forged, "n-keys"), record(forged)) is None
    # No key given: the bytes come back, for this process to check.
    assert ingest._checked_signature(batch, decoded(genuine, None), record(genuine)) == (
        covered,
        False,
    )
    # Checked against a key the node no longer has (signed by it, and so "valid" there):
    # not taken; checked again here, where the node's key refuses it.
    stale = decoded(forged, "someone-else")
    assert stale.verified is True
    signed, verified = ingest._checked_signature(batch, stale, record(forged)) or (b"", True)
    assert not verified and signed == canonical_bytes(orjson.loads(forged)["data"])
    assert not verify_bytes(public_key(node_key("n-keys").public_key_hex), signed, stale.signature)
