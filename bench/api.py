"""Provider earnings under load: `GET /v1/providers/{id}/earnings` on loopback.

The data (built once into `--schema`, then reused while it holds the market): providers with
nodes and bonded stake, consumers with deposits, one lease per (provider, consumer) pair
matched by the real `Marketplace` service, usage reports written through the usage store
as ingest writes them, `--epochs` epochs settled by the real settle worker (charges,
fees, payout roots), every view projected; an API key for one provider.

Each run starts the API (`aether api`, uvicorn, its own process) on 127.0.0.1, waits for
/health, then `--clients` concurrent clients (raw asyncio HTTP/1.1 keep-alive connections) ask for the provider's earnings for
`--seconds` seconds, each its next request as soon as the last is answered; every answer
is checked (200). Printed: requests, rps, latency p50/p90/p99/max. The reference, in the
same run: the same read (`projections.queries.provider_earnings`, the queries the endpoint
runs) on one asyncpg connection, no HTTP, one at a time.

Last line: RESULT rps=<n> p50_ms=<x> p99_ms=<x>   (target: p99 < 20 ms)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from domain.lease import DEMO_LEASE_RULES
from domain.orderbook import Ask, Bid, escrow_required
from domain.providers import Node
from domain.settlement import SettlementRules
from domain.usage import UsageRecorded
from ledger import api_keys
from ledger.api_keys import PartyKind
from ledger.config import eventsourcing_env
from ledger.embedded import start_embedded_postgres
from ledger.market import service as m
from ledger.market.store import MarketplaceApplication
from ledger.money import units
from ledger.settlement import SettlementApplication, SettlementLog
from ledger.store import LedgerApplication
from ledger.usage import OffsetAdvance, UsageApplication
from ledger.writer import LedgerWriter
from projections import queries as q
from workers.projector import open_views
from workers.settle import Settler

NAMES = uuid.UUID("6a1d2c3e-0000-4000-8000-00000000a91b")
START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
PRICE = units(2)
EPOCH_S = 600
REPORT_S = 60
HEALTH_WAIT_S = 60.0


def uid(name: str) -> uuid.UUID:
    return uuid.uuid5(NAMES, name)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def build(url: str, schema: str, providers: int, consumers: int, epochs: int) -> None:
    env = eventsourcing_env(url, schema, 2)
    ledger = LedgerApplication(env=env)
    try:
        clock = Clock()
        writer = LedgerWriter(ledger, clock=clock)
        datastore = ledger.app_recorder.datastore
        app = MarketplaceApplication(datastore, env=env)
        rules = m.MarketRules(lease=replace(DEMO_LEASE_RULES, release_escrow_at_close=False))
        service = m.Marketplace(app, writer, rules=rules, clock=clock)
        usage = UsageApplication(datastore, env=env)
        log = SettlementLog(SettlementApplication(datastore, env=env))
        settler = Settler(
            service,
            usage,
            log,
            rules=SettlementRules(epoch_s=EPOCH_S, posting=service.rules.postings),
            release_delay_s=30,
            clock=clock,
        )
        duration_s = EPOCH_S * (epochs + 2)
        for c in range(consumers):
            service.handle(
                m.ConfirmDeposit(
                    uuid.uuid4(), uuid.uuid4(), uid(f"c{c}"), units(100_000), f"0x{c:064x}:0"
                )
            )
        leases: list[tuple[uuid.UUID, uuid.UUID]] = []
        for p in range(providers):
            nodes = tuple(
                Node(uid(f"n{p}.{c}"), "H100", 1, 81_920, "eu-west", f"{p:032x}{c:032x}")
                for c in range(consumers)
            )
            address = "0x" + uid(f"p{p}").hex + f"{p:08x}"
            service.handle(m.RegisterProvider(uuid.uuid4(), uid(f"p{p}"), address, nodes))
            service.handle(m.BondStake(uuid.uuid4(), uid(f"p{p}"), units(10_000)))
            for c in range(consumers):
                ask = Ask(
                    uid(f"a{p}.{c}"), uid(f"p{p}"), uid(f"n{p}.{c}"), "H100", 1, PRICE,
                    clock.now + timedelta(days=2),
                )  # fmt: skip
                service.handle(m.PlaceAsk(uuid.uuid4(), ask))
                bid = Bid(
                    uid(f"b{p}.{c}"), uid(f"c{c}"), "H100", 1, PRICE, duration_s,
                    escrow_required(1, PRICE, duration_s),
                )  # fmt: skip
                (lease_id,) = service.handle(m.PlaceBid(uuid.uuid4(), bid)).lease_ids
                leases.append((lease_id, uid(f"n{p}.{c}")))
        sequences = dict.fromkeys((lease for lease, _ in leases), 0)
        for epoch_index in range(epochs):
            facts = []
            for start_s in range(epoch_index * EPOCH_S, (epoch_index + 1) * EPOCH_S, REPORT_S):
                for lease_id, node_id in leases:
                    sequences[lease_id] += 1
                    facts.append(
                        UsageRecorded(
                            uuid.uuid4(), lease_id, node_id, sequences[lease_id],
                            START + timedelta(seconds=start_s),
                            START + timedelta(seconds=start_s + REPORT_S), 1,
                            REPORT_S * 10**6, REPORT_S * 9 * 10**5, 10**12, 10, 100, 5,
                            1_000, "train", "cpu",
                            START + timedelta(seconds=start_s + REPORT_S + 1),
                        )
                    )  # fmt: skip
            advance = OffsetAdvance("usage", 0, epoch_index or None, epoch_index + 1)
            usage.record(facts, "bench-api", [advance])
            clock.now = START + timedelta(seconds=(epoch_index + 2) * EPOCH_S)
            settler.settle_due()
        with open_views(ledger, app) as views:
            views.catch_up()
        app.close()
    finally:
        ledger.close()


def schema_ready(url: str, schema: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = %s",
            (schema, "earnings_providers"),
        ).fetchone()
        if not row or not row[0]:
            return False
        found = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.earnings_providers").format(sql.Identifier(schema))
        ).fetchone()
    return bool(found and found[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))
    return ordered[index]


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive GET on a raw connection: (status, body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def load(
    host: str, port: int, path: str, key: str, clients: int, seconds: float
) -> tuple[list[float], float]:
    """`clients` raw asyncio HTTP/1.1 keep-alive connections (a light client, so the server
    gets the CPU), each sending its next request when the last is answered."""
    latencies: list[float] = []
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {key}\r\n\r\n").encode()
    connections = [await asyncio.open_connection(host, port) for _ in range(clients)]
    for reader, writer in connections:  # warm every connection
        status, body = await _get(reader, writer, request)
        if status != 200:
            raise RuntimeError(f"{status}: {body[:200]!r}")
    began = time.perf_counter()
    stop = began + seconds

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            status, body = await _get(reader, writer, request)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"{status}: {body[:200]!r}")

    await asyncio.gather(*(client(r, w) for r, w in connections))
    elapsed = time.perf_counter() - began
    for _, writer in connections:
        writer.close()
    return latencies, elapsed


async def reference(url: str, schema: str, provider_id: uuid.UUID, count: int) -> list[float]:
    conn = await q.connect(url, schema)
    try:
        for _ in range(20):
            await q.provider_earnings(conn, provider_id)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            await q.provider_earnings(conn, provider_id)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schema", default="bench_api")
    parser.add_argument("--providers", type=int, default=20)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--rebuild", action="store_true", help="drop and rebuild the data")
    args = parser.parse_args()

    server: Any = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        url, server = start_embedded_postgres(Path(".aether-bench"))
    with psycopg.connect(url, autocommit=True) as conn:
        if args.rebuild:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(args.schema))
            )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(args.schema)))
    if not schema_ready(url, args.schema):
        began = time.perf_counter()
        build(url, args.schema, args.providers, args.consumers, args.epochs)
        print(f"built the market in {time.perf_counter() - began:.1f}s", flush=True)
    else:
        print(f"reusing schema {args.schema}", flush=True)
    provider_id = uid("p0")
    key = api_keys.create_key(url, args.schema, PartyKind.provider, provider_id).key

    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "POSTGRES_SCHEMA": args.schema}
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "api", "--host", "127.0.0.1", "--port", str(port),
         "--pool-size", str(args.pool_size)],
        env=env, cwd=root,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + HEALTH_WAIT_S
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the API did not come up")
            time.sleep(0.2)
        endpoint = f"{base}/v1/providers/{provider_id}/earnings"
        body = httpx.get(endpoint, headers={"Authorization": f"Bearer {key}"}).json()
        print(
            f"provider p0: {len(body['epochs'])} epochs, earned {body['earned']}, "
            f"{len(httpx.get(endpoint, headers={'X-API-Key': key}).content)} bytes per answer"
        )
        path = f"/v1/providers/{provider_id}/earnings"
        latencies, elapsed = asyncio.run(
            load("127.0.0.1", port, path, key, args.clients, args.seconds)
        )
    finally:
        process.terminate()
        process.wait(timeout=10)
    ref = asyncio.run(reference(url, args.schema, provider_id, 500))
    del server

    ms = [x * 1000 for x in latencies]
    ref_ms = [x * 1000 for x in ref]
    rps = len(ms) / elapsed
    p50, p99 = statistics.median(ms), percentile(ms, 0.99)
    print(
        f"HTTP, {args.clients} clients, {elapsed:.1f}s: {len(ms)} requests, {rps:,.0f} rps; "
        f"latency p50 {p50:.2f} ms, p90 {percentile(ms, 0.90):.2f} ms, p99 {p99:.2f} ms, "
        f"max {max(ms):.2f} ms"
    )
    print(
        f"reference, the same read without HTTP (asyncpg, one connection, one at a time): "
        f"p50 {statistics.median(ref_ms):.2f} ms, p99 {percentile(ref_ms, 0.99):.2f} ms"
    )
    print(f"target p99 < 20 ms: {'met' if p99 < 20 else 'NOT met'}")
    print(f"RESULT rps={rps:.0f} p50_ms={p50:.2f} p99_ms={p99:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
