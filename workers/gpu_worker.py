"""The GPU worker: runs a lease's torch workload, meters it, and reports to Kafka.

Every `report_interval_s` it closes the meter's interval (`workers.metering.Meter`) into a
usage report, and every `heartbeat_interval_s` it sends a heartbeat (the first at start).

Usage of a node's leases goes through the node's `NodeReporter` (pass `reporter=`): ONE
signed ``aether.usage_batch.v1`` message per report interval (or per `intervals`
intervals) carries the reports of every lease the node serves, keyed by the node (see
`workers.messages`); its envelope id is uuid5(node id, the (lease, sequence) pairs it
carries), so a resent batch keeps its id. A batch goes when every lease registered with
the reporter has given it `intervals` reports, when a lease's worker ends, or when the
oldest report waited `intervals` x the slowest lease's interval; one that would exceed
BATCH_REPORTS_MAX reports or MESSAGE_BYTES_MAX bytes is split.

Without a reporter (one lease alone, the former format, still accepted), each report and
each heartbeat is signed by the node's key and sent as an envelope keyed by the lease, so
one lease's messages stay ordered on one partition:

- topic `USAGE.name`, type `USAGE_TYPE`, data a `UsageReport`;
- topic `HEARTBEATS.name`, type `HEARTBEAT_TYPE`, data a `HeartbeatReport`;
- source `node/<node id>`, subject the lease id, key the subject's UTF-8 bytes;
- envelope id `uuid5(lease id, "<type>/<sequence>")`, so a resent report keeps its id;
- `data.signature` = `NodeKey.sign` of the exact JSON dict sent without the signature
  (`model_dump(mode="json", exclude_none=True)`), which is what ingest verifies.

Sends do not wait for the broker between steps: delivery is checked as it completes (at
most `PENDING_SENDS_MAX` in flight) and awaited in full when the run ends. A stop (the
step or time limit, `stop()`, SIGINT or SIGTERM under `main`) closes the last partial
interval and flushes it.

`main(argv)` is the command line, for `aether worker gpu`::

    aether worker gpu --lease UUID --node UUID --key-seed-hex HEX64 \\
        --workload train|infer --seconds N
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar
from uuid import UUID, uuid5

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.broker import HEARTBEATS, USAGE
from workers.messages import (
    BATCH_REPORTS_MAX,
    GPU_COUNT_MAX,
    HEARTBEAT_TYPE,
    MESSAGE_BYTES_MAX,
    SEQUENCE_MAX,
    USAGE_BATCH_TYPE,
    USAGE_TYPE,
    Envelope,
    HeartbeatReport,
    UsageReport,
    batch_data,
    encode,
    envelope,
)
from workers.metering import Clock, Meter, MeteringError, utc_now
from workers.signing import NodeKey
from workers.workloads import Workload, WorkloadKind, WorkloadSize, make_workload

REPORT_INTERVAL_S_MIN = 0.05
REPORT_INTERVAL_S_MAX = 3_600.0
REPORT_INTERVAL_S_DEFAULT = 10.0
HEARTBEAT_INTERVAL_S_MIN = 0.05
HEARTBEAT_INTERVAL_S_MAX = 3_600.0
HEARTBEAT_INTERVAL_S_DEFAULT = 5.0
RUN_SECONDS_MAX = 7 * 24 * 3_600.0
"""Longest run one command may ask for."""
PENDING_SENDS_MAX = 64
"""Sends in flight before the worker waits for the oldest to be delivered."""
DELIVERY_TIMEOUT_S = 30.0
"""Longest wait for the last sends to be delivered when a run ends."""
PRODUCER_REQUEST_TIMEOUT_MS = 30_000
PRODUCER_LINGER_MS = 5

R = TypeVar("R", UsageReport, HeartbeatReport)


class UsageDeliveryError(MeteringError):
    """The broker did not take a report (the message names the lease and the report)."""


class Producer(Protocol):
    """What the worker needs of `aiokafka.AIOKafkaProducer` (started by the caller)."""

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[Any]:
        """Queue a message; the future completes when the broker has it (or fails)."""
        ...


@dataclass(frozen=True, slots=True)
class RunSummary:
    steps: int
    usage_reports: int
    heartbeats: int
    samples: int
    flops: int


def sign_report(report: R, key: NodeKey) -> R:
    """The report with `signature` = the node's signature of the JSON dict that is sent."""
    fields = report.model_dump(mode="json", exclude_none=True)
    fields.pop("signature", None)
    return type(report).model_validate({**fields, "signature": key.sign(fields)})


class _Deliveries:
    """Sends in flight, checked in order as they complete (at most PENDING_SENDS_MAX)."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._pending: deque[tuple[str, asyncio.Future[Any]]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    async def send(self, topic: str, value: bytes, key: bytes, what: str) -> None:
        try:
            delivery = await self._producer.send(topic, value, key=key)
        except KafkaError as e:
            raise UsageDeliveryError(f"{what}: the broker refused it: {e}") from e
        self._pending.append((what, delivery))
        await self.settle(wait_for_oldest=len(self._pending) > PENDING_SENDS_MAX)

    async def settle(self, wait_for_oldest: bool) -> None:
        """Check the sends that completed (in order); wait for the oldest if asked."""
        while self._pending:
            what, delivery = self._pending[0]
            if not wait_for_oldest and not delivery.done():
                return
            self._pending.popleft()
            wait_for_oldest = False
            try:
                await delivery
            except KafkaError as e:
                raise UsageDeliveryError(f"{what}: not delivered: {e}") from e

    async def flush(self, who: str) -> None:
        try:
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                while self._pending:
                    await self.settle(wait_for_oldest=True)
        except TimeoutError as e:
            raise UsageDeliveryError(
                f"{who}: {len(self._pending)} messages not delivered within {DELIVERY_TIMEOUT_S} s"
            ) from e


class NodeReporter:
    """Signs and sends the usage of every lease a node serves: ONE ``aether.usage_batch.v1``
    message per report interval, or per `intervals` intervals (see the module docstring).
    The leases' `GpuWorker`s share it (``reporter=``), on one event loop."""

    def __init__(
        self,
        node_id: UUID,
        key: NodeKey,
        producer: Producer,
        *,
        intervals: int = 1,
        topic: str = USAGE.name,
        clock: Clock = utc_now,
    ) -> None:
        if not 1 <= intervals <= BATCH_REPORTS_MAX:
            raise ValueError(f"node {node_id}: intervals is 1 to {BATCH_REPORTS_MAX}: {intervals}")
        self.node_id = node_id
        self.intervals = intervals
        self._key = key
        self._topic = topic
        self._clock = clock
        self._message_key = str(node_id).encode()
        self._source = f"node/{node_id}"
        self._deliveries = _Deliveries(producer)
        self._leases: dict[UUID, float] = {}
        """The leases served now, with their report interval (s)."""
        self._waiting: list[UsageReport] = []
        self._counts: dict[UUID, int] = {}
        self._oldest_at: float | None = None
        self.batches_sent = 0
        self.reports_sent = 0

    def register(self, lease_id: UUID, report_interval_s: float) -> None:
        """A lease whose worker reports through this node (until `done`)."""
        if lease_id in self._leases:
            raise ValueError(f"lease {lease_id} is already reported by node {self.node_id}")
        self._leases[lease_id] = report_interval_s

    async def add(self, report: UsageReport) -> None:
        """One closed interval of a registered lease (unsigned: the batch is signed)."""
        if report.lease_id not in self._leases or report.node_id != self.node_id:
            raise ValueError(f"lease {report.lease_id} is not served by node {self.node_id}")
        now = time.monotonic()
        if self._oldest_at is None:
            self._oldest_at = now
        self._waiting.append(report)
        self._counts[report.lease_id] = self._counts.get(report.lease_id, 0) + 1
        if self._complete() or now - self._oldest_at >= self._patience_s():
            await self.flush()

    async def done(self, lease_id: UUID) -> None:
        """The lease's worker ended (its last report added): send what the others have
        completed; the node's last lease sends everything and waits for delivery."""
        self._leases.pop(lease_id, None)
        if not self._leases:
            await self.close()
        elif self._complete():
            await self.flush()

    async def flush(self) -> None:
        """Sign and send what is waiting now (split when it would be oversized)."""
        reports, self._waiting = self._waiting, []
        self._counts.clear()
        self._oldest_at = None
        for start in range(0, len(reports), BATCH_REPORTS_MAX):
            await self._send(reports[start : start + BATCH_REPORTS_MAX])

    async def close(self) -> None:
        """Send what is waiting and wait until the broker has every batch."""
        await self.flush()
        await self._deliveries.flush(f"node {self.node_id}")

    def _complete(self) -> bool:
        counts = self._counts
        return bool(self._leases) and all(
            counts.get(lease_id, 0) >= self.intervals for lease_id in self._leases
        )

    def _patience_s(self) -> float:
        slowest = max(self._leases.values(), default=REPORT_INTERVAL_S_DEFAULT)
        return self.intervals * slowest

    async def _send(self, reports: list[UsageReport]) -> None:
        if not reports:
            return
        data = batch_data(self.node_id, reports)
        data["signature"] = self._key.sign(data)
        carried = ",".join(f"{r.lease_id}:{r.sequence}" for r in reports)
        message = Envelope(
            id=uuid5(self.node_id, f"{USAGE_BATCH_TYPE}/{carried}"),
            type=USAGE_BATCH_TYPE,
            source=self._source,
            subject=str(self.node_id),
            time=self._clock(),
            data=data,
        )
        value = encode(message)
        if len(value) > MESSAGE_BYTES_MAX and len(reports) > 1:
            half = len(reports) // 2
            await self._send(reports[:half])
            await self._send(reports[half:])
            return
        what = f"{USAGE_BATCH_TYPE} of node {self.node_id} ({len(reports)} reports)"
        await self._deliveries.send(self._topic, value, self._message_key, what)
        self.batches_sent += 1
        self.reports_sent += len(reports)


class GpuWorker:
    """Runs one lease's workload on this node, metered, reporting to Kafka."""

    def __init__(
        self,
        lease_id: UUID,
        node_id: UUID,
        key: NodeKey,
        workload: Workload,
        producer: Producer,
        gpu_count: int,
        report_interval_s: float = REPORT_INTERVAL_S_DEFAULT,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S_DEFAULT,
        clock: Clock = utc_now,
        *,
        usage_topic: str = USAGE.name,
        heartbeat_topic: str = HEARTBEATS.name,
        reporter: NodeReporter | None = None,
    ) -> None:
        """`usage_topic` and `heartbeat_topic`: where the reports go (the standard topics
        unless a test or demo isolates itself on a shared broker). `reporter`: the node's,
        which batches the usage of all its leases (its topic is used, not `usage_topic`);
        without one, each report is a message of its own."""
        self._usage_topic = usage_topic
        self._heartbeat_topic = heartbeat_topic
        if not REPORT_INTERVAL_S_MIN <= report_interval_s <= REPORT_INTERVAL_S_MAX:
            raise ValueError(
                f"lease {lease_id}: report_interval_s is {REPORT_INTERVAL_S_MIN} to "
                f"{REPORT_INTERVAL_S_MAX}, got {report_interval_s}"
            )
        if not HEARTBEAT_INTERVAL_S_MIN <= heartbeat_interval_s <= HEARTBEAT_INTERVAL_S_MAX:
            raise ValueError(
                f"lease {lease_id}: heartbeat_interval_s is {HEARTBEAT_INTERVAL_S_MIN} to "
                f"{HEARTBEAT_INTERVAL_S_MAX}, got {heartbeat_interval_s}"
            )
        self._lease_id = lease_id
        self._node_id = node_id
        self._key = key
        self._producer = producer
        self._report_interval_s = report_interval_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._clock = clock
        self._meter = Meter(lease_id, node_id, workload, gpu_count, clock)
        self._message_key = str(lease_id).encode()
        self._source = f"node/{node_id}"
        self._heartbeat_sequence_next = 1
        self._deliveries = _Deliveries(producer)
        self._reporter = reporter
        if reporter is not None:
            if reporter.node_id != node_id:
                raise ValueError(f"lease {lease_id}: the reporter is node {reporter.node_id}'s")
            reporter.register(lease_id, report_interval_s)
        self._stop = asyncio.Event()
        self._ran = False

    @property
    def meter(self) -> Meter:
        return self._meter

    def stop(self) -> None:
        """Ask the run to end after the current step (it flushes the last interval)."""
        self._stop.set()

    async def run(
        self, steps_max: int | None = None, seconds_max: float | None = None
    ) -> RunSummary:
        """Run steps until `steps_max` steps, `seconds_max` seconds or `stop()`, reporting
        as it goes; then report the last partial interval and wait for delivery."""
        if steps_max is not None and not 0 <= steps_max <= SEQUENCE_MAX:
            raise ValueError(f"lease {self._lease_id}: steps_max must be >= 0, got {steps_max}")
        if seconds_max is not None and not 0 < seconds_max <= RUN_SECONDS_MAX:
            raise ValueError(
                f"lease {self._lease_id}: seconds_max is > 0 and <= {RUN_SECONDS_MAX}, "
                f"got {seconds_max}"
            )
        assert not self._ran, "a worker runs once"
        self._ran = True
        steps = usage_reports = samples = flops = 0
        meter = self._meter
        meter.start()
        started = time.monotonic()
        next_heartbeat = started
        next_report = started + self._report_interval_s
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_heartbeat:
                await self._send_heartbeat()
                next_heartbeat = _next_tick(next_heartbeat, self._heartbeat_interval_s, now)
            if now >= next_report:
                report = meter.close_interval()
                await self._send_usage(report)
                usage_reports += 1
                samples += report.samples
                flops += report.flops
                next_report = _next_tick(next_report, self._report_interval_s, now)
            if steps_max is not None and steps >= steps_max:
                break
            if seconds_max is not None and now - started >= seconds_max:
                break
            meter.step()
            steps += 1
            await asyncio.sleep(0)  # let the producer's network tasks run
        if meter.steps_in_interval > 0:
            report = meter.close_interval()
            await self._send_usage(report)
            usage_reports += 1
            samples += report.samples
            flops += report.flops
        if self._reporter is not None:
            await self._reporter.done(self._lease_id)
        await self._deliveries.flush(f"lease {self._lease_id}")
        return RunSummary(
            steps=steps,
            usage_reports=usage_reports,
            heartbeats=self._heartbeat_sequence_next - 1,
            samples=samples,
            flops=flops,
        )

    async def _send_usage(self, report: UsageReport) -> None:
        if self._reporter is not None:
            await self._reporter.add(report)
            return
        await self._send(
            self._usage_topic, USAGE_TYPE, report.sequence, sign_report(report, self._key)
        )

    async def _send_heartbeat(self) -> None:
        sequence = self._heartbeat_sequence_next
        report = HeartbeatReport(
            lease_id=self._lease_id, node_id=self._node_id, sequence=sequence, at=self._clock()
        )
        await self._send(
            self._heartbeat_topic, HEARTBEAT_TYPE, sequence, sign_report(report, self._key)
        )
        self._heartbeat_sequence_next += 1

    async def _send(
        self, topic: str, type_: str, sequence: int, report: UsageReport | HeartbeatReport
    ) -> None:
        message = envelope(
            id=uuid5(self._lease_id, f"{type_}/{sequence}"),
            type=type_,
            source=self._source,
            subject=str(self._lease_id),
            time=self._clock(),
            data=report,
        )
        what = f"{type_} #{sequence} of lease {self._lease_id}"
        await self._deliveries.send(topic, encode(message), self._message_key, what)


def _next_tick(previous: float, interval_s: float, now: float) -> float:
    """The next time on the cadence; skips ahead when a long step overran it."""
    upcoming = previous + interval_s
    return upcoming if upcoming > now else now + interval_s


# The command line.

SeedHex = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


class GpuWorkerArgs(BaseModel):
    """`aether worker gpu` arguments, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lease: UUID
    node: UUID
    key_seed_hex: SeedHex
    """The node key's 32-byte Ed25519 seed, as 64 hex digits (demos and tests)."""
    workload: WorkloadKind
    seconds: Annotated[float, Field(gt=0, le=RUN_SECONDS_MAX)] | None = None
    steps: Annotated[int, Field(ge=0, le=SEQUENCE_MAX)] | None = None
    gpus: Annotated[int, Field(ge=1, le=GPU_COUNT_MAX)] = 1
    size: WorkloadSize | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    report_interval_s: Annotated[
        float, Field(ge=REPORT_INTERVAL_S_MIN, le=REPORT_INTERVAL_S_MAX)
    ] = REPORT_INTERVAL_S_DEFAULT
    heartbeat_interval_s: Annotated[
        float, Field(ge=HEARTBEAT_INTERVAL_S_MIN, le=HEARTBEAT_INTERVAL_S_MAX)
    ] = HEARTBEAT_INTERVAL_S_DEFAULT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aether worker gpu",
        description="Run a lease's torch workload on this node, meter it, and send signed "
        "usage reports and heartbeats to Kafka (KAFKA_BOOTSTRAP_SERVERS, or an embedded "
        "broker when unset).",
    )
    parser.add_argument("--lease", required=True, metavar="UUID", help="the lease id")
    parser.add_argument("--node", required=True, metavar="UUID", help="this node's id")
    parser.add_argument(
        "--key-seed-hex", required=True, metavar="HEX64", help="the node key's 32-byte seed"
    )
    parser.add_argument("--workload", required=True, choices=[k.value for k in WorkloadKind])
    parser.add_argument("--seconds", metavar="N", help="stop after N seconds")
    parser.add_argument("--steps", metavar="N", help="stop after N steps")
    parser.add_argument("--gpus", default="1", metavar="N", help="the lease's GPU count")
    parser.add_argument(
        "--size",
        choices=[s.value for s in WorkloadSize],
        help="workload size (default: large on CUDA, small on the CPU)",
    )
    parser.add_argument("--seed", default="0", metavar="N", help="the workload's seed")
    parser.add_argument("--report-interval-s", default=str(REPORT_INTERVAL_S_DEFAULT), metavar="S")
    parser.add_argument(
        "--heartbeat-interval-s", default=str(HEARTBEAT_INTERVAL_S_DEFAULT), metavar="S"
    )
    return parser


def _flag(field: object) -> str:
    return "--" + str(field).replace("_", "-")


def parse_args(argv: Sequence[str] | None) -> GpuWorkerArgs:
    """Parse and validate; SystemExit(2) with a message naming each bad flag."""
    parser = _parser()
    namespace = parser.parse_args(argv)
    values = {k: v for k, v in vars(namespace).items() if v is not None}
    try:
        return GpuWorkerArgs.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{_flag(error['loc'][0]) if error['loc'] else 'arguments'}: {error['msg']}"
            for error in e.errors()
        )
        parser.error(problems)


async def _run_worker(args: GpuWorkerArgs, bootstrap_servers: str) -> RunSummary:
    workload = make_workload(args.workload, args.seed, args.size)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=False,  # the embedded dev broker does not support it
        linger_ms=PRODUCER_LINGER_MS,
        request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
    )
    try:
        try:
            await producer.start()
        except KafkaError as e:
            raise UsageDeliveryError(f"cannot reach Kafka at {bootstrap_servers}: {e}") from e
        worker = GpuWorker(
            lease_id=args.lease,
            node_id=args.node,
            key=NodeKey.from_seed(bytes.fromhex(args.key_seed_hex)),
            workload=workload,
            producer=producer,
            gpu_count=args.gpus,
            report_interval_s=args.report_interval_s,
            heartbeat_interval_s=args.heartbeat_interval_s,
        )
        loop = asyncio.get_running_loop()
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(stop_signal, worker.stop)
        try:
            return await worker.run(steps_max=args.steps, seconds_max=args.seconds)
        finally:
            for stop_signal in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(stop_signal)
    finally:
        await producer.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`aether worker gpu ...`: 0 when the run ended and every report was delivered."""
    from ledger.config import Settings

    args = parse_args(argv)
    if args.seconds is None and args.steps is None:
        print("aether worker gpu: running until interrupted (Ctrl-C)", file=sys.stderr)
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"aether worker gpu: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        bootstrap = settings.kafka_bootstrap_servers
        if bootstrap is None:
            from workers.broker import embedded_broker

            bootstrap = stack.enter_context(embedded_broker())
            print(
                f"aether worker gpu: KAFKA_BOOTSTRAP_SERVERS is unset; embedded broker on "
                f"{bootstrap} (its messages end with this process)",
                file=sys.stderr,
            )
        try:
            summary = asyncio.run(_run_worker(args, bootstrap))
        except MeteringError as e:
            print(f"aether worker gpu: {e}", file=sys.stderr)
            return 1
    print(
        f"lease {args.lease}: {summary.steps} steps, {summary.samples} samples, "
        f"{summary.flops} FLOPs; {summary.usage_reports} usage reports and "
        f"{summary.heartbeats} heartbeats sent to {bootstrap}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
