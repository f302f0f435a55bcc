"""The live part of `aether demo`: real workers through the broker, in real time.

A new provider lists a node whose key is a real Ed25519 key; its ask fills a resting bid
and opens a lease at the current time. Then, all in one process on one event loop: a GPU
worker runs a real torch training loop for the lease (CPU here, CUDA when present), meters
it and sends signed usage reports and heartbeats to Kafka; ingest consumes them, verifies
the signatures, records the usage events (with the consumed offsets, in one transaction)
and the heartbeats; a checker observes the node from the same topics. A forged, a replayed,
an unsigned and a malformed message are then injected: each lands in the dead-letter topic
with its reason, and nothing else is affected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from aiokafka import AIOKafkaProducer

from domain.lease import Lease
from domain.providers import Node
from ledger.market import service as m
from ledger.usage import UsageApplication
from workers.broker import create_topics
from workers.checker import Checker, CheckerRules, p99_ms
from workers.gpu_worker import GpuWorker, NodeReporter, sign_report
from workers.ingest import Ingest, IngestTopics
from workers.messages import USAGE_TYPE, UsageReport, encode, envelope
from workers.signing import NodeKey
from workers.spotcheck import SpotChecker
from workers.workloads import Workload, WorkloadKind, make_workload

log = logging.getLogger(__name__)

LIVE_SECONDS = 8.0
"""How long the GPU worker runs."""
REPORT_INTERVAL_S = 2.0
HEARTBEAT_INTERVAL_S = 1.0
INGEST_GROUP = "aether-demo-ingest"
CATCH_UP_POLLS_MAX = 300
CATCH_UP_POLL_S = 0.1
"""How long the demo waits for ingest to have everything: at most 30 s."""
INJECTED = ("forged", "replayed", "unsigned", "malformed")
INGEST_SESSION_TIMEOUT_MS = 3_000


def node_key(name: str) -> NodeKey:
    """The demo's deterministic Ed25519 key of a node (a real node keeps its own secret)."""
    return NodeKey.from_seed(hashlib.sha256(f"aether-demo-node:{name}".encode()).digest())


@dataclass(frozen=True, slots=True)
class LiveLease:
    """One lease of the live part and what its GPU worker runs."""

    lease_id: UUID
    node: Node
    key: NodeKey
    workload: WorkloadKind


@dataclass
class WorkerResult:
    lease: Lease
    workload: str
    device: str
    steps: int
    reports: int
    heartbeats_sent: int
    usage_recorded: int
    samples: int
    flops: int
    device_time_us: int


@dataclass
class LiveResult:
    workers: list[WorkerResult]
    dead_letters: dict[str, int]
    checker_heartbeats: int
    checker_delay_p99_ms: int
    spot_checked: int = 0
    """Usage reports the checker re-ran (one step of their workload under the FLOP counter)."""
    spot_mismatches: int = 0


class _RealClock:
    def __call__(self) -> datetime:
        return datetime.now(UTC)


async def run_live(
    service: m.Marketplace,
    usage: UsageApplication,
    kafka: str,
    *,
    leases: Sequence[LiveLease],
    checker_id: UUID,
    say: Any,
) -> LiveResult:
    """Run one GPU worker per lease (each node signs its own usage batches), ingest and a
    checker concurrently, then inject bad messages."""
    opened = []
    for live in leases:
        lease = service.lease(live.lease_id)
        assert lease is not None
        opened.append(lease)
    # Topics of this run's own ("aether.usage.<run>", ...): a shared broker may hold other
    # markets' messages (with the demo's deterministic ids), which are not this market's.
    run = uuid4().hex[:8]
    topics = IngestTopics().suffixed(run)
    await create_topics(kafka, topics.all())
    ingest = Ingest(
        kafka,
        f"{INGEST_GROUP}-{run}",
        usage,
        service,
        topics=topics,
        session_timeout_ms=INGEST_SESSION_TIMEOUT_MS,
    )
    nodes = {
        live.node.node_id: lease.provider_id for live, lease in zip(leases, opened, strict=True)
    }
    checker = Checker(
        checker_id,
        nodes,
        kafka,
        rules=CheckerRules(heartbeat_interval_s=int(HEARTBEAT_INTERVAL_S)),
        verdict_rules=service.rules.verdicts,
        heartbeat_topic=topics.heartbeats.name,
        usage_topic=topics.usage.name,
        verdict_topic=topics.verdicts.name,
        spot_checker=SpotChecker(sample_ppm=1_000_000),
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=False)
    await producer.start()
    stop = asyncio.Event()
    started = datetime.now(UTC)
    await ingest.start()
    ingest_task = asyncio.create_task(ingest.run(stop))
    checker_task = asyncio.create_task(
        checker.run(start_at=started - timedelta(seconds=5), stop=stop)
    )
    workloads: list[Workload] = []
    try:
        workers = []
        for i, (live, lease) in enumerate(zip(leases, opened, strict=True)):
            workload = make_workload(live.workload, seed=7 + i)
            workloads.append(workload)
            workers.append(
                GpuWorker(
                    lease.id,
                    live.node.node_id,
                    live.key,
                    workload,
                    producer,
                    gpu_count=lease.gpu_count,
                    report_interval_s=REPORT_INTERVAL_S,
                    heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                    usage_topic=topics.usage.name,
                    heartbeat_topic=topics.heartbeats.name,
                    reporter=NodeReporter(
                        live.node.node_id, live.key, producer, topic=topics.usage.name
                    ),
                )
            )
            say(
                f"GPU worker on {live.node.gpu_model} node {str(live.node.node_id)[:8]}: "
                f"torch {workload.name} on {workload.device} for {LIVE_SECONDS:.0f} s, the "
                f"node's signed usage batch every {REPORT_INTERVAL_S:.0f} s, a heartbeat "
                f"every {HEARTBEAT_INTERVAL_S:.0f} s"
            )
        summaries = await asyncio.gather(
            *(worker.run(seconds_max=LIVE_SECONDS) for worker in workers)
        )
        for live, summary in zip(leases, summaries, strict=True):
            what = "training" if live.workload is WorkloadKind.train else "inference"
            say(
                f"worker done: {summary.steps:,} {what} steps, {summary.usage_reports} usage "
                f"reports, {summary.heartbeats} heartbeats sent"
            )
        first = leases[0]
        await _inject(producer, topics.usage.name, opened[0], first.node, first.key, say)
        for _ in range(CATCH_UP_POLLS_MAX):
            done = ingest.stats.dead_lettered >= len(INJECTED)
            for live, summary in zip(leases, summaries, strict=True):
                recorded = len(usage.usage_of_lease(live.lease_id))
                beating = service.lease(live.lease_id)
                beats = 0 if beating is None else beating.heartbeat_sequence
                done = done and recorded >= summary.usage_reports and beats >= summary.heartbeats
            if done:
                break
            await asyncio.sleep(CATCH_UP_POLL_S)
    finally:
        stop.set()
        await asyncio.gather(ingest_task, checker_task, return_exceptions=True)
        await ingest.stop()
        await producer.stop()
    service.refresh()
    results = []
    for live, summary, workload in zip(leases, summaries, workloads, strict=True):
        events = usage.usage_of_lease(live.lease_id)
        current = service.lease(live.lease_id)
        assert current is not None
        results.append(
            WorkerResult(
                lease=current,
                workload=workload.name,
                device=str(workload.device),
                steps=summary.steps,
                reports=summary.usage_reports,
                heartbeats_sent=summary.heartbeats,
                usage_recorded=len(events),
                samples=sum(e.samples for e in events),
                flops=sum(e.flops for e in events),
                device_time_us=sum(e.device_time_us for e in events),
            )
        )
    seen = [o for (n, _), o in checker.open.items() if n in nodes]
    return LiveResult(
        workers=results,
        dead_letters=dict(ingest.stats.reasons),
        checker_heartbeats=sum(o.heartbeats for o in seen),
        checker_delay_p99_ms=p99_ms([d for o in seen for d in o.delays_ms]),
        spot_checked=sum(o.spot_checked for o in seen),
        spot_mismatches=sum(len(o.spot_mismatches) for o in seen),
    )


async def _inject(
    producer: AIOKafkaProducer, topic: str, lease: Lease, node: Node, key: NodeKey, say: Any
) -> None:
    """A forged, a replayed, an unsigned and a malformed message on the usage topic."""
    now = datetime.now(UTC)
    report = UsageReport(
        lease_id=lease.id,
        node_id=node.node_id,
        sequence=1,
        interval_start=now - timedelta(seconds=1),
        interval_end=now,
        gpu_count=lease.gpu_count,
        wall_time_us=1_000_000,
        device_time_us=1_000_000,
        flops=10**12,
        samples=1_000,
        tokens=0,
        steps=10,
        peak_memory_bytes=1 << 20,
        workload="forged",
        device="cpu",
    )
    thief = NodeKey.from_seed(b"\x01" * 32)
    bad: list[tuple[str, bytes]] = [
        (
            "forged: signed by a key the provider never registered",
            _message(sign_report(report, thief), lease, node),
        ),
        (
            "replayed: sequence 1 again, under a new id",
            _message(sign_report(report, key), lease, node),
        ),
        ("unsigned", _message(report, lease, node)),
        ("malformed: not JSON", b"{this is not json"),
    ]
    for what, value in bad:
        await producer.send_and_wait(topic, value, key=str(lease.id).encode())
        say(f"injected a bad usage message ({what})")


def _message(report: UsageReport, lease: Lease, node: Node) -> bytes:
    return encode(
        envelope(
            uuid4(), USAGE_TYPE, f"node/{node.node_id}", str(lease.id), datetime.now(UTC), report
        )
    )


def describe(result: LiveResult, say: Any) -> None:
    for w in result.workers:
        say(
            f"ingest recorded {w.usage_recorded} of {w.reports} usage reports of the "
            f"{w.workload} lease (exactly once, with their Kafka offsets): {w.samples:,} "
            f"samples, {w.flops:,} FLOPs, {w.device_time_us / 1e6:.2f} device-seconds"
        )
        say(
            f"heartbeats recorded on that lease: {w.lease.heartbeat_sequence} "
            f"(of {w.heartbeats_sent} sent)"
        )
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.dead_letters.items())) or "none"
    say(f"dead-lettered with their reasons: {reasons}")
    say(
        f"the checker saw {result.checker_heartbeats} heartbeats of the nodes this window, "
        f"p99 arrival delay {result.checker_delay_p99_ms} ms; its verdicts come when the "
        "window closes"
    )
    say(
        f"spot checks: the checker re-ran {result.spot_checked} of the nodes' usage reports "
        "(one step of their workload under the FLOP counter): "
        + (
            f"{result.spot_mismatches} claim FLOPs their steps do not explain"
            if result.spot_mismatches
            else "every one's FLOPs match its steps"
        )
    )
