"""Usage ingest throughput: Kafka to durable, deduplicated usage events, per second.

N valid usage reports (default 200,000), signed by their nodes' Ed25519 keys, spread over
many leases, are produced to the usage topic (the embedded broker unless
KAFKA_BOOTSTRAP_SERVERS is set). Then one `workers.ingest.Ingest` reads them all: decode,
validate, verify every signature, check the usage rules, and commit events plus offsets in
one Postgres transaction per batch. The figure: usage events committed per second, from the
first message consumed to the last commit (the group join before is not counted).

The reference, in the same run and the same database: a raw binary COPY of the very rows
ingest stored (same columns, indexes and JSON state bytes) into a fresh schema's usage
events table, in transactions of the same size, with nothing decided.

Also printed: where ingest's time went, and the single-thread Ed25519 verify rate of this
machine (each report costs one verify).

Last line: RESULT events_per_s=<n> copy_rows_per_s=<n> ratio=<x>
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import sys
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
from workers.ingest import BATCH_RECORDS_MAX, Ingest, IngestTopics
from workers.messages import USAGE_TYPE
from workers.signing import NodeKey, canonical_bytes, verify

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
    url: str, schema: str, leases_count: int, opened_at: datetime
) -> list[tuple[uuid.UUID, str]]:
    """Providers with one 8-GPU node each, and 1-GPU leases on them: (lease id, node name)."""
    app = LedgerApplication(env=eventsourcing_env(url, schema, 2))
    writer = LedgerWriter(app)
    market_app = MarketplaceApplication(app.app_recorder.datastore, env=app.env)
    service = m.Marketplace(market_app, writer, clock=FixedClock(opened_at))
    consumer = uid("consumer")
    service.handle(
        m.ConfirmDeposit(uuid.uuid4(), uuid.uuid4(), consumer, units(10**6), "0xbench:0")
    )
    leases: list[tuple[uuid.UUID, str]] = []
    for n in range((leases_count + GPUS_PER_NODE - 1) // GPUS_PER_NODE):
        name = f"n{n}"
        count = min(GPUS_PER_NODE, leases_count - len(leases))
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


def sign_reports(
    work: tuple[list[tuple[str, str]], int, int, str],
) -> list[tuple[bytes, bytes]]:
    """(key, value) of reports `first`..`last` of each lease (runs in a worker process)."""
    leases, first, last, opened_at = work
    t0 = datetime.fromisoformat(opened_at)
    keys: dict[str, NodeKey] = {}
    out = []
    for sequence in range(first, last + 1):
        start = t0 + timedelta(seconds=sequence - 1)
        for lease_id, node in leases:
            key = keys.get(node) or keys.setdefault(node, NodeKey.from_seed(seed(node)))
            data: dict[str, Any] = {
                "lease_id": lease_id,
                "node_id": str(uid(node)),
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
            data["signature"] = key.sign(data)
            envelope = {
                "id": str(uuid.uuid4()),
                "type": USAGE_TYPE,
                "source": f"node/{data['node_id']}",
                "subject": lease_id,
                "time": (start + timedelta(seconds=1)).isoformat(),
                "data": data,
            }
            out.append((lease_id.encode(), orjson.dumps(envelope)))
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


def verify_rate(
    messages: list[tuple[bytes, bytes]], node_names: set[str], count: int = 2_000
) -> float:
    """Single-thread Ed25519 verifies per second (cryptography), on the run's own reports."""
    keys = {str(uid(n)): NodeKey.from_seed(seed(n)).public_key_hex for n in node_names}
    sample = [orjson.loads(v)["data"] for _, v in messages[:count]]
    started = time.perf_counter()
    for d in sample:
        assert verify(keys[d["node_id"]], d, d["signature"])
    return len(sample) / (time.perf_counter() - started)


def nacl_verify(public_key_hex: str, fields: dict[str, Any], signature_hex: str) -> bool:
    """`workers.signing.verify` on libsodium (PyNaCl), for comparison only."""
    import nacl.bindings
    import nacl.exceptions

    try:
        nacl.bindings.crypto_sign_open(
            bytes.fromhex(signature_hex) + canonical_bytes(fields), bytes.fromhex(public_key_hex)
        )
    except (ValueError, nacl.exceptions.BadSignatureError):
        return False
    return True


def no_verify(public_key_hex: str, fields: dict[str, Any], signature_hex: str) -> bool:
    """Accepts every signature: measures everything but verification (never use it)."""
    return True


VERIFIERS = {"cryptography": verify, "pynacl": nacl_verify, "none": no_verify}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--leases", type=int, default=400)
    parser.add_argument("--batch-records-max", type=int, default=BATCH_RECORDS_MAX)
    parser.add_argument("--verify-threads", type=int, default=2)
    parser.add_argument(
        "--verifier",
        choices=("cryptography", "pynacl", "none"),
        default="cryptography",
        help="pynacl (libsodium; not a dependency of the project): what a faster verifier "
        "buys; none: accept every signature unchecked, to measure the rest of the path "
        "(never a valid configuration)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    url = os.environ.get("DATABASE_URL")
    server = None
    if not url:
        url, server = start_embedded_postgres(Path(".aether/bench"))
    schema = "bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(url, autocommit=True) as conn:
        for name in (schema, f"{schema}_copy"):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    print(f"database: {url.split('@')[-1]}  schema: {schema}  verifier: {args.verifier}")

    per_lease = max(1, args.messages // args.leases)
    opened_at = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=per_lease + 3_600)
    started = time.perf_counter()
    leases = open_leases(url, schema, args.leases, opened_at)
    print(f"market: {len(leases)} leases opened in {time.perf_counter() - started:.1f}s")

    started = time.perf_counter()
    plain = [(str(lease_id), node) for lease_id, node in leases]
    step = max(1, per_lease // 16)
    work = [
        (plain, first, min(first + step - 1, per_lease), opened_at.isoformat())
        for first in range(1, per_lease + 1, step)
    ]
    with ProcessPoolExecutor(2) as pool:
        messages = [m for chunk in pool.map(sign_reports, work) for m in chunk]
    print(f"signed {len(messages)} reports in {time.perf_counter() - started:.1f}s")

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
        usage = UsageApplication(app.app_recorder.datastore, env=app.env)

        async def run() -> Any:
            ingest = Ingest(
                bootstrap,
                f"bench-{uuid.uuid4()}",
                usage,
                service,
                topics=topics,
                batch_records_max=args.batch_records_max,
                verify_threads=args.verify_threads,
                verifier=VERIFIERS[args.verifier],
            )
            async with ingest:
                return await ingest.run_until_caught_up(timeout_s=600)

        cpu_started = time.process_time()
        stats = asyncio.run(run())
        cpu_s = time.process_time() - cpu_started
        assert stats.first_consumed_at is not None and stats.last_committed_at is not None
        elapsed = stats.last_committed_at - stats.first_consumed_at
        assert stats.recorded == len(messages), (stats.recorded, stats.reasons)
        rate = stats.recorded / elapsed
        print(
            f"ingest   events committed={stats.recorded} dead-lettered={stats.dead_lettered} "
            f"in {elapsed:.1f}s -> {rate:,.0f} events/s (batches={stats.batches})"
        )
        print(
            f"         time in: decide {stats.decide_s:.1f}s (of it waiting for signatures "
            f"{stats.verify_wait_s:.1f}s), "
            f"commit {stats.commit_s:.1f}s (overlaps the next batch's decide); "
            f"ingest process CPU {cpu_s:.1f}s ({1e6 * cpu_s / stats.recorded:.0f} us per event, "
            "group join included)"
        )
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                sql.SQL(
                    "SELECT originator_id, originator_version, topic, state FROM {}.usage_events "
                    "ORDER BY notification_id"
                ).format(sql.Identifier(schema))
            ).fetchall()
        app.close()
    assert len(rows) == len(messages)

    verifies = verify_rate(messages, {node for _, node in leases})
    print(
        f"ed25519  {verifies:,.0f} verifies/s on one thread ({1e6 / verifies:.0f} us each): "
        f"at most {2 * verifies:,.0f}/s on 2 cores doing nothing else"
    )
    copy_rate = raw_copy_rate(url, f"{schema}_copy", rows, args.batch_records_max)
    print(f"raw COPY of {len(rows)} usage event rows -> {copy_rate:,.0f} rows/s")
    with psycopg.connect(url, autocommit=True) as conn:
        for name in (schema, f"{schema}_copy"):
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
    if server is not None:
        server.cleanup()
    print(
        f"RESULT events_per_s={rate:.0f} copy_rows_per_s={copy_rate:.0f} "
        f"ratio={rate / copy_rate:.3f}"
    )


if __name__ == "__main__":
    main()
