"""Processes that start together against a fresh database all come up."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from ledger.config import eventsourcing_env
from ledger.store import LedgerApplication
from tests.schemas import fresh_schema

PROCESSES = 4
ROUNDS = 3


def _start(env: dict[str, str], barrier: Any) -> None:
    barrier.wait(timeout=60)
    LedgerApplication(env=env).close()


def test_processes_starting_together_on_a_fresh_schema_all_create_the_store(database_url) -> None:
    # Found by the two-process race test: concurrent CREATE OR REPLACE of the append-only
    # triggers deadlocked, and concurrent CREATE TYPE raised a unique violation.
    ctx = mp.get_context("spawn")
    for _ in range(ROUNDS):
        with fresh_schema(database_url) as schema:
            env = eventsourcing_env(database_url, schema, pool_size=1)
            barrier = ctx.Barrier(PROCESSES)
            processes = [ctx.Process(target=_start, args=(env, barrier)) for _ in range(PROCESSES)]
            for p in processes:
                p.start()
            for p in processes:
                p.join(timeout=120)
            assert [p.exitcode for p in processes] == [0] * PROCESSES
