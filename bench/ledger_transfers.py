"""Ledger write throughput: durably committed transfers per second, constraints enforced.

Several client threads submit requests of transfers to one `LedgerWriter` (group commit).
Every transfer is checked against its accounts' limits (all user accounts carry
`debits_must_not_exceed_credits`) and is acknowledged only after its Postgres transaction
committed. Two workloads:

- uniform: debit and credit accounts drawn uniformly from all accounts;
- hot: accounts drawn from a Zipf distribution (s=1.1), so a handful of accounts (think
  escrow, treasury, fees) appear in most transfers.

The reference, in the same run and the same database: a raw binary COPY of rows shaped like
the stored events (same columns, same indexes, same JSON state bytes) with nothing decided.

Last line: RESULT transfers_per_s=<lower of the two workloads> copy_rows_per_s=<n> ratio=<x>
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger.config import eventsourcing_env
from ledger.embedded import start_embedded_postgres
from ledger.model import AccountFlags, NewAccount, NewTransfer, TransferOutcome
from ledger.store import LedgerApplication
from ledger.writer import LedgerWriter

ASSET = "AETH"
CODE_FUNDING = 1
CODE_PAYMENT = 2
ACCOUNT_CODE_USER = 10
ACCOUNT_CODE_EXTERNAL = 1


def zipf_picker(n: int, s: float, rng: random.Random) -> Callable[[], int]:
    weights = [1.0 / (k**s) for k in range(1, n + 1)]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]

    def pick() -> int:
        return bisect.bisect_left(cumulative, rng.random() * total)

    return pick


def run_workload(
    writer: LedgerWriter,
    accounts: list[uuid.UUID],
    name: str,
    seconds: float,
    clients: int,
    request_size: int,
    in_flight: int,
) -> tuple[int, float, int]:
    """Returns (transfers committed ok, elapsed seconds, transfers rejected)."""
    counts = [0] * clients
    rejected = [0] * clients

    # Each client's requests are generated before the clock starts: the figure measures the
    # ledger, not the load generator. Enough for the target rate and then some.
    requests_max = int(seconds * 60_000 / (clients * request_size)) + in_flight + 1

    def make_requests(index: int) -> list[list[NewTransfer]]:
        rng = random.Random(index * 7919 + (1 if name == "hot" else 0))
        if name == "hot":
            pick = zipf_picker(len(accounts), 1.1, rng)
        else:
            pick = lambda: rng.randrange(len(accounts))  # noqa: E731
        requests = []
        for _ in range(requests_max):
            batch = []
            for _ in range(request_size):
                debit = pick()
                credit = pick()
                while credit == debit:
                    credit = pick()
                batch.append(
                    NewTransfer(
                        id=uuid.UUID(int=rng.getrandbits(128)),
                        debit_account_id=accounts[debit],
                        credit_account_id=accounts[credit],
                        amount=rng.randint(1, 1000),
                        asset=ASSET,
                        code=CODE_PAYMENT,
                    )
                )
            requests.append(batch)
        return requests

    prepared = [make_requests(i) for i in range(clients)]
    stop_at = 0.0

    def client(index: int) -> None:
        nonlocal stop_at
        pending: list[Future[list[TransferOutcome]]] = []
        for batch in prepared[index]:
            if time.perf_counter() >= stop_at:
                break
            pending.append(writer.submit(batch))
            if len(pending) >= in_flight:
                outcomes = pending.pop(0).result()
                ok = sum(1 for o in outcomes if o.ok)
                counts[index] += ok
                rejected[index] += len(outcomes) - ok
        for future in pending:
            outcomes = future.result()
            ok = sum(1 for o in outcomes if o.ok)
            counts[index] += ok
            rejected[index] += len(outcomes) - ok

    started = time.perf_counter()
    stop_at = started + seconds
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return sum(counts), elapsed, sum(rejected)


def raw_copy_rate(url: str, schema: str, rows: list[tuple[uuid.UUID, int, str, bytes]]) -> float:
    """Rows per second of a binary COPY into a table shaped like the events table."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {schema}.copy_reference (originator_id uuid NOT NULL, "
            "originator_version bigint NOT NULL, topic text, state bytea, "
            "notification_id bigserial, PRIMARY KEY (originator_id, originator_version))"
        )
        conn.execute(f"CREATE UNIQUE INDEX ON {schema}.copy_reference (notification_id ASC)")
        chunk = 8190
        started = time.perf_counter()
        for start in range(0, len(rows), chunk):
            with (
                conn.transaction(),
                conn.cursor() as curs,
                curs.copy(
                    f"COPY {schema}.copy_reference "
                    "(originator_id, originator_version, topic, state) FROM STDIN (FORMAT BINARY)"
                ) as copy,
            ):
                copy.set_types(["uuid", "int8", "text", "bytea"])
                for row in rows[start : start + chunk]:
                    copy.write_row(row)
        return len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per workload")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--request-size", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=4, help="requests per client")
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL")
    server = None
    if not url:
        url, server = start_embedded_postgres(Path(".aether/bench"))
    schema = "bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    print(f"database: {url.split('@')[-1]}  schema: {schema}")

    figures: dict[str, float] = {}
    try:
        for workload in ("uniform", "hot"):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {schema}_{workload}")
            app = LedgerApplication(env=eventsourcing_env(url, f"{schema}_{workload}", 2))
            writer = LedgerWriter(app)
            external = uuid.uuid4()
            accounts = [uuid.uuid4() for _ in range(args.accounts)]
            writer.open_accounts([NewAccount(external, ASSET, ACCOUNT_CODE_EXTERNAL)])
            for start in range(0, len(accounts), 5000):
                writer.open_accounts(
                    [
                        NewAccount(
                            a, ASSET, ACCOUNT_CODE_USER, AccountFlags.debits_must_not_exceed_credits
                        )
                        for a in accounts[start : start + 5000]
                    ]
                )
                writer.create_transfers(
                    [
                        NewTransfer(uuid.uuid4(), external, a, 10**24, ASSET, CODE_FUNDING)
                        for a in accounts[start : start + 5000]
                    ]
                )
            writer.start()
            ok, elapsed, rejected = run_workload(
                writer,
                accounts,
                workload,
                args.seconds,
                args.clients,
                args.request_size,
                args.in_flight,
            )
            writer.stop()
            rate = ok / elapsed
            figures[workload] = rate
            debits, credits = writer.state.trial_balance()[ASSET]
            assert debits == credits, "ledger out of balance"
            print(
                f"{workload:8s} transfers committed={ok} rejected={rejected} in {elapsed:.1f}s "
                f"-> {rate:,.0f} transfers/s (batches={writer.batch_number}, "
                f"races lost={writer.races_lost})"
            )
            app.close()

        # Reference: raw COPY of as many event-shaped rows as the faster workload committed.
        sample_state = (
            b'{"timestamp":"2026-11-23T18:00:00.000000+00:00","debit_account_id":'
            b'"0b6f3c1e-8d7a-4f0e-9a55-2f1d3c4b5a69","credit_account_id":'
            b'"7a2e9d4c-1b3f-4e8a-b6c5-9d0e1f2a3b4c","amount":"517","asset":"AETH","code":2}'
        )
        topic = "ledger.events:TransferCreated"
        count = max(50_000, int(max(figures.values()) * min(args.seconds, 10)))
        rows = [(uuid.uuid4(), 1, topic, sample_state) for _ in range(count)]
        copy_rate = raw_copy_rate(url, schema, rows)
        print(f"raw COPY of {count} event-shaped rows -> {copy_rate:,.0f} rows/s")
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for suffix in ("", "_uniform", "_hot"):
                conn.execute(f"DROP SCHEMA IF EXISTS {schema}{suffix} CASCADE")
        if server is not None:
            server.cleanup()

    transfers_per_s = min(figures.values())
    print(
        f"RESULT transfers_per_s={transfers_per_s:.0f} copy_rows_per_s={copy_rate:.0f} "
        f"ratio={transfers_per_s / copy_rate:.3f}"
    )


if __name__ == "__main__":
    main()
