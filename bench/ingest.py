"""Usage ingest throughput: Kafka to durable, deduplicated usage events, per second.

N valid usage reports (default 1,000,000) over L leases (default 400), sent as real nodes
send them: each node has 8 GPUs and serves `--leases-per-node` 1-GPU leases (default 8);
once per `--intervals` report intervals (default 8) it signs ONE usage batch
(``aether.usage_batch.v1``, keyed by the node) with the reports of all its leases for
those intervals (`--intervals 1`: a message per interval; `--single`: the old one signed
message per report). They are produced to the usage topic (the embedded broker unless
KAFKA_BOOTSTRAP_SERVERS is set). Then one `workers.ingest.Ingest` reads them all: decode,
validate every report, verify every batch's signature, check the usage rules on every
report, and commit events plus offsets in one Postgres transaction per batch. The figure:
usage events committed per second, from the first message consumed to the last commit
(the group join before is not counted).

The reference, in the same run and the same database: a raw binary COPY of the very rows
ingest stored (same columns, indexes and JSON state bytes) into a fresh schema's usage
events table, in transactions of the same size (ingest's events per commit), with nothing
decided.

A throughput is measured sustained: a million reports make each ingest round about 9 s
long on the 2-core development machine, so that neither ingest's start (the first batch
decoded with nothing to overlap it) nor a short COPY's first writes, which the page cache
takes before any writeback or checkpoint, weighs much (with 200,000 reports a round lasts
2 s and the ratio reads about 0.2 lower; `--reports` picks the size). This machine's speed
also swings by a third within seconds (other tenants), so both are measured `--rounds`
times (default 3), alternating: each round a new consumer group
ingests every message into an empty usage log, then the raw COPY of that round's rows
runs. The figures are the medians of the rounds (each round's are printed too).

Also printed: where ingest's time went, how busy the machine's cores were while ingest
ran, and the single-thread Ed25519 verify rate of this machine on the run's own messages
(each message costs one verify).

Last line: RESULT events_per_s=<n> copy_rows_per_s=<n> ratio=<x>
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from domain.orderbook import Ask, Bid, escrow_required
from domain.providers import Node
from ledger.config import eventsourcing_env
from ledger.embedded import start_embedded_postgres
from ledger.market import service as m
from ledger.market.store import MarketplaceApplication
from ledger.money import units
from ledger.store import LedgerApplication
from ledger.usage import UsageApplication, UsageRecorder
from ledger.writer import LedgerWriter
from workers.broker import create_topics, embedded_broker
from workers.ingest import (
    BATCH_EVENTS_MAX,
    BATCH_RECORDS_MAX,
    DECODE_PROCESSES,
    Ingest,
    IngestTopics,
)
from workers.messages import USAGE_BATCH_TYPE, USAGE_TYPE
from workers.signing import NodeKey, canonical_bytes, public_key, verify_bytes

GPUS_PER_NODE = 8
NAMES = uuid.UUID("3d0f8a52-6c1e-4f7b-9a0d-5e2b7c8d9e10")
PRICE = units(2)


def uid(name: str) -> uuid.UUID:
    return uuid.uuid5(NAMES, name)


def seed(name: str) -> bytes:
    return hashlib.sha256(b"bench-seed:" + name.encode()).digest()


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def open_leases(
    url: str, schema: str, leases_count: int, opened_at: datetime, per_node: int = GPUS_PER_NODE
) -> list[tuple[uuid.UUID, str]]:
    """Providers with one 8-GPU node each, and `per_node` 1-GPU leases on each: (lease id,
    node name)."""
    app = LedgerApplication(env=eventsourcing_env(url, schema, 2))
    writer = LedgerWriter(app)
    market_app = MarketplaceApplication(app.app_recorder.datastore, env=app.env)
    service = m.Marketplace(market_app, writer, clock=FixedClock(opened_at))
    consumer = uid("consumer")
    service.handle(
        m.ConfirmDeposit(uuid.uuid4(), uuid.uuid4(), consumer, units(10**6), "0xbench:0")
    )
    leases: list[tuple[uuid.UUID, str]] = []
    for n in range((leases_count + per_node - 1) // per_node):
        name = f"n{n}"
        count = min(per_node, leases_count - len(leases))
        node = Node(
            uid(name),
            "H100",
            GPUS_PER_NODE,
            81_920,
            "eu-west",
            NodeKey.from_seed(seed(name)).public_key_hex,
        )
        pid = uid(f"p{n}")
        service.handle(m.RegisterProvider(uuid.uuid4(), pid, f"0x{n:040x}", (node,)))
        service.handle(m.BondStake(uuid.uuid4(), pid, units(100 * GPUS_PER_NODE)))
        ask = Ask(
            uid(f"a{n}"), pid, node.node_id, "H100", count, PRICE, opened_at + timedelta(days=1)
        )
        service.handle(m.PlaceAsk(uuid.uuid4(), ask))
        for i in range(count):
            escrow = escrow_required(1, units(3), 86_400)
            bid = Bid(uid(f"b{n}.{i}"), consumer, "H100", 1, units(3), 86_400, escrow)
            handled = service.handle(m.PlaceBid(uuid.uuid4(), bid))
            leases.extend((lease_id, name) for lease_id in handled.lease_ids)
    app.close()
    return leases


def report_data(lease_id: str, sequence: int, start: datetime) -> dict[str, Any]:
    """One lease's report of one 1-second interval (without node id and signature)."""
    return {
        "lease_id": lease_id,
        "sequence": sequence,
        "interval_start": start.isoformat(),
        "interval_end": (start + timedelta(seconds=1)).isoformat(),
        "gpu_count": 1,
        "wall_time_us": 1_000_000,
        "device_time_us": 950_000,
        "flops": 312 * 10**12,
        "samples": 256,
        "tokens": 0,
        "steps": 1,
        "peak_memory_bytes": 60 * 2**30,
        "workload": "train",
        "device": "cuda",
    }


def sign_reports(
    work: tuple[list[tuple[str, str]], int, int, str, int, bool],
) -> list[tuple[bytes, bytes]]:
    """(key, value) of the messages carrying reports `first`..`last` of each lease (runs in
    a worker process): per node, one signed batch per `intervals` intervals, or with
    `single` one signed message per report."""
    leases, first, last, opened_at, intervals, single = work
    t0 = datetime.fromisoformat(opened_at)
    by_node: dict[str, list[str]] = {}
    for lease_id, node in leases:
        by_node.setdefault(node, []).append(lease_id)
    keys = {node: NodeKey.from_seed(seed(node)) for node in by_node}
    out = []
    for low in range(first, last + 1, intervals):
        sequences = range(low, min(low + intervals - 1, last) + 1)
        end = t0 + timedelta(seconds=sequences[-1])
        for node, node_leases in by_node.items():
            node_id = str(uid(node))
            if single:
                for sequence in sequences:
                    start = t0 + timedelta(seconds=sequence - 1)
                    for lease_id in node_leases:
                        data = {**report_data(lease_id, sequence, start), "node_id": node_id}
                        data["signature"] = keys[node].sign(data)
                        envelope = {
                            "id": str(uuid.uuid4()),
                            "type": USAGE_TYPE,
                            "source": f"node/{node_id}",
                            "subject": lease_id,
                            "time": (start + timedelta(seconds=1)).isoformat(),
                            "data": data,
                        }
                        out.append((lease_id.encode(), orjson.dumps(envelope)))
                continue
            batch: dict[str, Any] = {
                "node_id": node_id,
                "reports": [
                    report_data(lease_id, sequence, t0 + timedelta(seconds=sequence - 1))
                    for sequence in sequences
                    for lease_id in node_leases
                ],
            }
            batch["signature"] = keys[node].sign(batch)
            envelope = {
                "id": str(uuid.uuid4()),
                "type": USAGE_BATCH_TYPE,
                "source": f"node/{node_id}",
                "subject": node_id,
                "time": end.isoformat(),
                "data": batch,
            }
            out.append((node_id.encode(), orjson.dumps(envelope)))
    return out


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=20,
        max_batch_size=1024 * 1024,
    )
    await producer.start()
    try:
        for start in range(0, len(messages), 10_000):
            sent = [
                await producer.send(topic, v, key=k) for k, v in messages[start : start + 10_000]
            ]
            await asyncio.gather(*sent)
    finally:
        await producer.stop()


def raw_copy_rate(url: str, schema: str, rows: list[tuple[Any, ...]], chunk: int) -> float:
    """Rows per second of a binary COPY into a fresh usage events table, `chunk` rows per
    transaction."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}.usage_events").format(sql.Identifier(schema)))
    app = LedgerApplication(env=eventsourcing_env(url, schema, 2))
    recorder = UsageRecorder(app.app_recorder.datastore)
    recorder.create_table()
    app.close()
    statement = sql.SQL(
        "COPY {}.{} (originator_id, originator_version, topic, state) FROM STDIN (FORMAT BINARY)"
    ).format(sql.Identifier(schema), sql.Identifier(recorder.events_table_name))
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for start in range(0, len(rows), chunk):
            with conn.transaction(), conn.cursor() as curs, curs.copy(statement) as copy:
                copy.set_types(["uuid", "int8", "text", "bytea"])
                for row in rows[start : start + chunk]:
                    copy.write_row(row)
        return len(rows) / (time.perf_counter() - started)


def machine_cpu() -> tuple[int, int]:
    """(busy, all) CPU ticks of the whole machine since boot (Linux /proc/stat; zeros
    elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


class MachineSampler:
    """Samples `machine_cpu` every 20 ms in a thread, to tell how busy the machine was
    between two `time.perf_counter` readings."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="machine-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append((time.perf_counter(), *machine_cpu()))

    def __enter__(self) -> MachineSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy_cores(self, start: float, end: float) -> float | None:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or not inside[-1][2] - inside[0][2]:
            return None
        (_, busy0, all0), (_, busy1, all1) = inside[0], inside[-1]
        return (busy1 - busy0) / (all1 - all0) * (os.cpu_count() or 1)


def verify_rate(
    messages: list[tuple[bytes, bytes]], node_names: set[str], count: int = 500
) -> float:
    """Single-thread Ed25519 verifies per second (cryptography), on the run's own messages
    (canonical bytes computed beforehand, keys loaded)."""
    keys = {str(uid(n)): public_key(NodeKey.from_seed(seed(n)).public_key_hex) for n in node_names}
    sample = []
    for _, v in messages[:count]:
        data = orjson.loads(v)["data"]
        sample.append(
            (keys[data["node_id"]], canonical_bytes(data), bytes.fromhex(data["signature"]))
        )
    started = time.perf_counter()
    for key, signed, signature in sample:
        assert key is not None and verify_bytes(key, signed, signature)
    return len(sample) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reports", "--messages", dest="reports", type=int, default=1_000_000,
        help="usage reports (events) in all (--messages: the old name)",
    )  # fmt: skip
    parser.add_argument("--leases", type=int, default=400)
    parser.add_argument(
        "--leases-per-node", type=int, default=GPUS_PER_NODE, choices=range(1, GPUS_PER_NODE + 1)
    )
    parser.add_argument(
        "--intervals", type=int, default=8, help="report intervals per node batch (1..16)"
    )
    parser.add_argument(
        "--single", action="store_true", help="one signed message per report (the old format)"
    )
    parser.add_argument("--batch-records-max", type=int, default=BATCH_RECORDS_MAX)
    parser.add_argument("--batch-events-max", type=int, default=BATCH_EVENTS_MAX)
    parser.add_argument("--verify-threads", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="ingest and raw COPY measured this many times, alternating (medians reported)",
    )  # fmt: skip
    parser.add_argument(
        "--decode-processes", type=int, default=DECODE_PROCESSES,
        help="processes decoding usage messages beside the event loop (0: in its thread)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.leases_per_node * args.intervals > 128:
        parser.error("a batch carries at most 128 reports: leases-per-node x intervals")
    logging.basicConfig(level=logging.WARNING)

    url = os.environ.get("DATABASE_URL")
    server = None
    if not url:
        url, server = start_embedded_postgres(Path(".aether/bench"))
    schema = "bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(url, autocommit=True) as conn:
        for name in (schema, f"{schema}_copy"):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    shape = (
        "one signed message per report"
        if args.single
        else f"node batches of {args.leases_per_node} leases x {args.intervals} intervals"
    )
    print(f"database: {url.split('@')[-1]}  schema: {schema}  messages: {shape}")

    per_lease = max(1, args.reports // args.leases)
    opened_at = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=per_lease + 3_600)
    started = time.perf_counter()
    leases = open_leases(url, schema, args.leases, opened_at, args.leases_per_node)
    print(f"market: {len(leases)} leases opened in {time.perf_counter() - started:.1f}s")

    started = time.perf_counter()
    plain = [(str(lease_id), node) for lease_id, node in leases]
    step = max(args.intervals, (per_lease // 16) // args.intervals * args.intervals)
    work = [
        (plain, first, min(first + step - 1, per_lease), opened_at.isoformat(), args.intervals,
         args.single)
        for first in range(1, per_lease + 1, step)
    ]  # fmt: skip
    with ProcessPoolExecutor(2) as pool:
        messages = [m for chunk in pool.map(sign_reports, work) for m in chunk]
    reports = per_lease * len(leases)
    print(
        f"signed {len(messages)} messages carrying {reports} reports "
        f"({sum(len(v) for _, v in messages) / len(messages):,.0f} bytes each) "
        f"in {time.perf_counter() - started:.1f}s"
    )

    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    with embedded_broker() if not servers else nullcontext(servers) as bootstrap:
        topics = IngestTopics().suffixed("bench" + uuid.uuid4().hex[:8])
        asyncio.run(create_topics(bootstrap, topics.all()))
        started = time.perf_counter()
        asyncio.run(produce(bootstrap, topics.usage.name, messages))
        print(f"produced {len(messages)} messages in {time.perf_counter() - started:.1f}s")

        app = LedgerApplication(env=eventsourcing_env(url, schema, 4))
        writer = LedgerWriter(app)
        market_app = MarketplaceApplication(app.app_recorder.datastore, env=app.env)
        service = m.Marketplace(market_app, writer)
        rates: list[float] = []
        copy_rates: list[float] = []
        for round_ in range(1, args.rounds + 1):
            if round_ > 1:
                # The next round ingests the same messages into an empty usage log (the
                # append-only log refuses TRUNCATE: the table is made anew).
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(
                        sql.SQL("DROP TABLE {}.usage_events").format(sql.Identifier(schema))
                    )
            usage = UsageApplication(app.app_recorder.datastore, env=app.env)
            print(f"round {round_} of {args.rounds}")
            rate, per_commit, rows = ingest_round(args, bootstrap, topics, usage, service, url)
            assert len(rows) == reports
            copy_rate = raw_copy_rate(url, f"{schema}_copy", rows, per_commit)
            print(
                f"raw COPY of {len(rows)} usage event rows, {per_commit} per transaction -> "
                f"{copy_rate:,.0f} rows/s (ratio in this round {rate / copy_rate:.3f})"
            )
            rates.append(rate)
            copy_rates.append(copy_rate)
        app.close()

    verifies = verify_rate(messages, {node for _, node in leases})
    print(
        f"ed25519  {verifies:,.0f} verifies/s on one thread ({1e6 / verifies:.0f} us each, "
        f"{1e6 / verifies * len(messages) / reports:.1f} us per event at "
        f"{reports / len(messages):.0f} reports per message)"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        for name in (schema, f"{schema}_copy"):
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
    if server is not None:
        server.cleanup()
    rate, copy_rate = statistics.median(rates), statistics.median(copy_rates)
    if args.rounds > 1:
        print(
            f"medians of {args.rounds} rounds (ingest and raw COPY alternating): "
            f"ingest {rate:,.0f} events/s (rounds: {', '.join(f'{r:,.0f}' for r in rates)}), "
            f"raw COPY {copy_rate:,.0f} rows/s "
            f"(rounds: {', '.join(f'{r:,.0f}' for r in copy_rates)})"
        )
    print(
        f"RESULT events_per_s={rate:.0f} copy_rows_per_s={copy_rate:.0f} "
        f"ratio={rate / copy_rate:.3f}"
    )


def ingest_round(
    args: argparse.Namespace,
    bootstrap: str,
    topics: IngestTopics,
    usage: UsageApplication,
    service: m.Marketplace,
    url: str,
) -> tuple[float, int, list[tuple[Any, ...]]]:
    """One ingest of every message on the topic by a new consumer group into the empty
    usage log: its events per second (first fetch to last commit), the events per commit,
    and the rows it stored (for the raw COPY)."""

    async def run() -> Any:
        ingest = Ingest(
            bootstrap,
            f"bench-{uuid.uuid4()}",
            usage,
            service,
            topics=topics,
            batch_records_max=args.batch_records_max,
            batch_events_max=args.batch_events_max,
            verify_threads=args.verify_threads,
            decode_processes=args.decode_processes,
        )
        async with ingest:
            return await ingest.run_until_caught_up(timeout_s=600)

    cpu_started = time.process_time()
    main_started = time.thread_time()
    with MachineSampler() as machine:
        stats = asyncio.run(run())
    cpu_s = time.process_time() - cpu_started
    main_cpu_s = time.thread_time() - main_started
    assert stats.first_consumed_at is not None and stats.last_committed_at is not None
    elapsed = stats.last_committed_at - stats.first_consumed_at
    assert stats.dead_lettered == 0, stats.reasons
    rate = stats.recorded / elapsed
    per_commit = max(1, round(stats.recorded / stats.batches))
    us = 1e6 / stats.recorded
    print(
        f"ingest   events committed={stats.recorded} from {stats.usage_messages} messages "
        f"dead-lettered={stats.dead_lettered} in {elapsed:.2f}s -> {rate:,.0f} events/s "
        f"(commits={stats.batches}, {per_commit} events each)"
    )
    print(
        f"         wall time (s; us per event): fetch {stats.fetch_s:.2f} "
        f"({us * stats.fetch_s:.1f}), decide {stats.decide_s:.2f} ({us * stats.decide_s:.1f})"
        f" of it waiting for signatures {stats.verify_wait_s:.2f} "
        f"({us * stats.verify_wait_s:.1f}) and for the decode processes "
        f"{stats.decode_wait_s:.2f} ({us * stats.decode_wait_s:.1f}), dead letters "
        f"{stats.dead_letter_s:.2f}, "
        f"commit {stats.commit_s:.2f} ({us * stats.commit_s:.1f}; in a thread, beside the "
        "next decide)"
    )
    print(
        f"         CPU (s; us per event): decode processes (parse, validate, verify, "
        f"canonical bytes, JSON states, COPY rows) {stats.decode_cpu_s:.2f} "
        f"({us * stats.decode_cpu_s:.1f}); event loop: parse+take over "
        f"{stats.parse_s:.2f} ({us * stats.parse_s:.1f}), rules {stats.rules_s:.2f} "
        f"({us * stats.rules_s:.1f}); COPY+commit client side {stats.record_cpu_s:.2f} "
        f"({us * stats.record_cpu_s:.1f})"
    )
    print(
        f"         ingest process CPU {cpu_s:.1f}s ({us * cpu_s:.1f} us per event, group "
        f"join included), of it the event loop's thread {main_cpu_s:.1f}s "
        f"({us * main_cpu_s:.1f}); the rest: commit, decode-result and other threads; plus "
        f"the decode processes' {stats.decode_cpu_s:.1f}s; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    busy = machine.busy_cores(stats.first_consumed_at, stats.last_committed_at)
    if busy is not None:
        print(
            f"         machine: {busy:.2f} of {os.cpu_count()} cores busy from the first "
            "fetch to the last commit (every process, Postgres's and the broker's too)"
        )
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT originator_id, originator_version, topic, state FROM {}.usage_events "
                "ORDER BY notification_id"
            ).format(sql.Identifier(usage.usage_recorder.datastore.schema))
        ).fetchall()
    return rate, per_commit, rows


if __name__ == "__main__":
    main()
