"""Named limits of the ledger. Every batch, queue, retry and size has its maximum here."""

from __future__ import annotations

AMOUNT_MAX = 2**128 - 1
"""Largest amount and largest balance (u128, as in TigerBeetle); stored as NUMERIC(78,0)."""
ASSET_LENGTH_MAX = 16
TIMEOUT_S_MAX = 10 * 365 * 24 * 3600
REFERENCES_COUNT_MAX = 8
REFERENCE_KEY_LENGTH_MAX = 32
REFERENCE_VALUE_LENGTH_MAX = 128

BATCH_SIZE_MAX = 8_190
"""Most transfers committed in one Postgres transaction (TigerBeetle's batch size)."""
QUEUE_DEPTH_MAX = 64
"""Most client requests waiting for the writer; submitters block beyond it."""
COMMIT_RETRIES_MAX = 32
"""Most times a batch is re-decided after losing a race to another writer of its shard.
One writer per shard is the design; a second one is safe (it can never double-spend) but
under sustained contention a batch may lose every time and fail with WriterRaceLostError."""
RACE_BACKOFF_S_MAX = 0.05
"""Longest random pause before re-deciding a batch that lost a race (grows per attempt)."""
CATCH_UP_PAGE_SIZE = 10_000
"""Events read per query when a writer catches up with the log."""
PIPELINE_DEPTH_MAX = 2
"""Most batches decided but not yet committed: one committing while the next is decided."""
