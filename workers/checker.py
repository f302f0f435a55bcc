"""The checker worker: judges each node per verdict window from what the node itself
reports, and produces verdicts to Kafka.

It reads the heartbeat and usage topics (every partition, from where it was told to start),
and per node and window (aligned as `domain.verdicts` aligns them, by the reports' own
times, so a replay of the topics judges the same) it observes:

- liveness: the heartbeats received, against the window's length / heartbeat interval, as
  uptime in parts per million (capped at 1,000,000);
- latency: how late each heartbeat arrived (Kafka's timestamp of the record minus the
  heartbeat's `at`), the window's p99 in milliseconds (nearest-rank);
- throughput: samples (or tokens) per second of the window from the usage reports (single
  ones and each report of a node's usage batch), in thousandths (`throughput_milli_per_s`).

- work: with a spot checker (`workers.spotcheck`), a deterministic sample of the usage
  reports is re-run (one step of the named workload under the FLOP counter): a report whose
  FLOPs its steps do not explain is a mismatch.

When the newest report time seen passes `window_end + close_delay_s`, the window is judged:
it fails for fraud when a spot check found a mismatch, for downtime when uptime is below
`uptime_ppm_min`, and otherwise passes. The
verdict's evidence hash is sha256 of the canonical JSON of the observations, and its id is
derived from (checker, node, window), so a restarted checker that judges a window again
sends the same verdict id (the marketplace takes a retry with equal fields as a no-op).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID, uuid5

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from domain.verdicts import VerdictRules, window_containing, window_end_of
from workers.broker import HEARTBEATS, USAGE, VERDICTS
from workers.messages import (
    HEARTBEAT_TYPE,
    USAGE_BATCH_TYPE,
    USAGE_TYPE,
    VERDICT_TYPE,
    HeartbeatReport,
    MessageRejectedError,
    UsageReport,
    VerdictReport,
    batch_reports,
    decode_envelope,
    encode,
    envelope,
    payload,
)
from workers.spotcheck import SpotChecker, SpotResult

log = logging.getLogger(__name__)

VERDICT_ID_NAMESPACE = UUID("3f1e2d4c-5b6a-5789-8c9d-0e1f2a3b4c5d")
"""Namespace of the verdict ids a checker derives. Never change."""
UPTIME_PPM_MAX = 1_000_000
BATCH_RECORDS_MAX = 5_000
"""Most records read from Kafka at a time."""
OPEN_WINDOWS_MAX = 100_000
"""Most (node, window) observations held in memory; the oldest are judged first."""


@dataclass(frozen=True, slots=True)
class CheckerRules:
    """What a checker expects of a node."""

    heartbeat_interval_s: int = 60
    uptime_ppm_min: int = 900_000
    """Below 90% of the expected heartbeats, the window fails for downtime."""
    close_delay_s: int = 5
    """How long after a window's end (in report time) the checker waits for late reports."""


@dataclass(slots=True)
class Observations:
    """What a checker saw of one node in one window."""

    node_id: UUID
    provider_id: UUID
    window_start: datetime
    heartbeats: int = 0
    delays_ms: list[int] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    spot_checked: int = 0
    """Reports of the window re-run by the spot checker (`workers.spotcheck`)."""
    spot_mismatches: list[str] = field(default_factory=list)
    """"<lease>:<sequence>" of each re-run report whose FLOPs its steps do not explain."""

    def evidence(self) -> bytes:
        return orjson.dumps(
            {
                "node_id": str(self.node_id),
                "window_start": self.window_start.isoformat(),
                "heartbeats": self.heartbeats,
                "delays_ms": sorted(self.delays_ms),
                "samples": self.samples,
                "tokens": self.tokens,
                "spot_checked": self.spot_checked,
                "spot_mismatches": sorted(self.spot_mismatches),
            },
            option=orjson.OPT_SORT_KEYS,
        )


def p99_ms(delays_ms: Iterable[int]) -> int:
    """Nearest-rank 99th percentile (0 for no values)."""
    ordered = sorted(delays_ms)
    if not ordered:
        return 0
    rank = -(-99 * len(ordered) // 100)  # ceil(0.99 n), at least 1
    return ordered[max(rank, 1) - 1]


def judge(
    seen: Observations,
    checker_id: UUID,
    rules: CheckerRules,
    verdict_rules: VerdictRules,
) -> VerdictReport:
    """The verdict on a node-window from what was observed (pure)."""
    window_s = verdict_rules.verdict_window_s
    expected = max(1, window_s // rules.heartbeat_interval_s)
    uptime_ppm = min(UPTIME_PPM_MAX, seen.heartbeats * UPTIME_PPM_MAX // expected)
    work = seen.samples or seen.tokens
    throughput_milli_per_s = work * 1_000 // window_s
    fraud = bool(seen.spot_mismatches)
    passed = uptime_ppm >= rules.uptime_ppm_min and not fraud
    kind: Literal["none", "downtime", "fraud"] = (
        "none" if passed else ("fraud" if fraud else "downtime")
    )
    window_end = window_end_of(seen.window_start, verdict_rules)
    return VerdictReport(
        verdict_id=uuid5(
            VERDICT_ID_NAMESPACE, f"{checker_id}:{seen.node_id}:{seen.window_start.isoformat()}"
        ),
        checker_id=checker_id,
        node_id=seen.node_id,
        provider_id=seen.provider_id,
        window_start=seen.window_start,
        window_end=window_end,
        latency_ms_p99=p99_ms(seen.delays_ms),
        throughput_milli_per_s=throughput_milli_per_s,
        uptime_ppm=uptime_ppm,
        passed=passed,
        failure_kind=kind,
        evidence_hash=hashlib.sha256(seen.evidence()).hexdigest(),
    )


class Checker:
    """Observes nodes from the report topics and produces verdicts (see the module
    docstring). `node_providers` maps each node to judge to its provider."""

    def __init__(
        self,
        checker_id: UUID,
        node_providers: dict[UUID, UUID],
        bootstrap_servers: str,
        *,
        rules: CheckerRules | None = None,
        verdict_rules: VerdictRules | None = None,
        heartbeat_topic: str = HEARTBEATS.name,
        usage_topic: str = USAGE.name,
        verdict_topic: str = VERDICTS.name,
        spot_checker: SpotChecker | None = None,
    ) -> None:
        self.topics = (heartbeat_topic, usage_topic)
        self.spot_checker = spot_checker
        self.verdict_topic = verdict_topic
        self.checker_id = checker_id
        self.node_providers = dict(node_providers)
        self.bootstrap_servers = bootstrap_servers
        self.rules = rules or CheckerRules()
        self.verdict_rules = verdict_rules or VerdictRules()
        self.open: dict[tuple[UUID, datetime], Observations] = {}
        self.watermark: datetime | None = None
        """The newest report time seen."""
        self.sent: list[VerdictReport] = []

    def observe(self, kind: str, report: HeartbeatReport | UsageReport, received_ms: int) -> None:
        node_id = report.node_id
        provider_id = self.node_providers.get(node_id)
        if provider_id is None:
            return  # not a node this checker judges
        at = report.at if isinstance(report, HeartbeatReport) else report.interval_end
        window = window_containing(at, self.verdict_rules)
        key = (node_id, window)
        seen = self.open.get(key)
        if seen is None:
            if len(self.open) >= OPEN_WINDOWS_MAX:
                return
            seen = self.open[key] = Observations(node_id, provider_id, window)
        if isinstance(report, HeartbeatReport):
            seen.heartbeats += 1
            at_ms = int(report.at.timestamp() * 1_000)
            seen.delays_ms.append(max(0, received_ms - at_ms))
        else:
            seen.samples += report.samples
            seen.tokens += report.tokens
            spot = self.spot_checker
            if spot is not None and spot.sampled(report):
                found = spot.check(report)
                if found.result is not SpotResult.unverifiable:
                    seen.spot_checked += 1
                if found.result is SpotResult.mismatch:
                    seen.spot_mismatches.append(f"{report.lease_id}:{report.sequence}")
                    log.warning(
                        "node %s: lease %s report %d claims %d FLOPs, its %d steps did %s",
                        node_id,
                        report.lease_id,
                        report.sequence,
                        report.flops,
                        report.steps,
                        found.expected_flops,
                    )
        if self.watermark is None or at > self.watermark:
            self.watermark = at

    def due(self) -> list[Observations]:
        """Windows whose end (plus the close delay) the watermark passed, oldest first;
        nodes that sent nothing in a window the watermark passed are judged too (zero
        heartbeats: downtime)."""
        if self.watermark is None:
            return []
        delay = timedelta(seconds=self.rules.close_delay_s)
        closed_before = self.watermark - delay
        windows = {w for _, w in self.open}
        for window in windows:
            for node_id, provider_id in self.node_providers.items():
                self.open.setdefault((node_id, window), Observations(node_id, provider_id, window))
        due = [
            key for key in self.open if window_end_of(key[1], self.verdict_rules) <= closed_before
        ]
        due.sort(key=lambda k: (k[1], str(k[0])))
        return [self.open.pop(key) for key in due]

    async def run(
        self, *, start_at: datetime | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """Read the report topics from `start_at` (default: now) and send verdicts until
        `stop` is set."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            enable_auto_commit=False,
            max_poll_records=BATCH_RECORDS_MAX,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, acks="all", enable_idempotence=False
        )
        await consumer.start()
        await producer.start()
        try:
            await consumer.topics()  # fetches the topics' metadata
            partitions = [
                TopicPartition(topic, p)
                for topic in self.topics
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            consumer.assign(partitions)
            since_ms = int((start_at or datetime.now(UTC)).timestamp() * 1_000)
            offsets = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
            for tp in partitions:
                found = offsets.get(tp)
                if found is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, found.offset)
            while stop is None or not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=BATCH_RECORDS_MAX)
                for records in batch.values():
                    for record in records:
                        self._read(record.value, record.timestamp)
                for seen in self.due():
                    await self._send(producer, seen)
        finally:
            await consumer.stop()
            await producer.stop()

    def _read(self, value: bytes | None, received_ms: int) -> None:
        try:
            env = decode_envelope(value)
            if env.type == HEARTBEAT_TYPE:
                self.observe(env.type, payload(HeartbeatReport, env), received_ms)
            elif env.type == USAGE_TYPE:
                self.observe(env.type, payload(UsageReport, env), received_ms)
            elif env.type == USAGE_BATCH_TYPE:
                for report in batch_reports(env):
                    self.observe(USAGE_TYPE, report, received_ms)
        except MessageRejectedError as e:
            log.debug("checker: skipped a message: %s", e)

    async def _send(self, producer: AIOKafkaProducer, seen: Observations) -> None:
        verdict = judge(seen, self.checker_id, self.rules, self.verdict_rules)
        message = envelope(
            verdict.verdict_id,
            VERDICT_TYPE,
            f"checker/{self.checker_id}",
            str(verdict.node_id),
            datetime.now(UTC),
            verdict,
        )
        await producer.send_and_wait(
            self.verdict_topic, encode(message), key=str(verdict.node_id).encode()
        )
        self.sent.append(verdict)
        log.info(
            "checker %s: node %s window %s %s (uptime %d ppm)",
            self.checker_id,
            verdict.node_id,
            verdict.window_start.isoformat(),
            "pass" if verdict.passed else "FAIL",
            verdict.uptime_ppm,
        )
