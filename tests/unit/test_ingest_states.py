"""Ingest's hot path writes each usage event's state from the report as validated
(`ledger.usage.ReportStates`): byte for byte the state `state_of` writes of the same fact,
which is the codec's JSON, whatever the counters, offsets and texts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import orjson
from hypothesis import given
from hypothesis import strategies as st

from ledger.market.codec import encode
from ledger.usage import ReportStates, state_of, usage_of_state
from workers.messages import USAGE_BATCH_ADAPTER

COUNTER = st.one_of(st.integers(0, 2**53), st.integers(0, 2**127))
OFFSET_MINUTES = st.integers(-23 * 60 - 59, 23 * 60 + 59)
TEXT = st.text(min_size=1, max_size=128)


@given(
    counters=st.lists(COUNTER, min_size=7, max_size=7),
    sequence=st.integers(1, 2**63 - 1),
    offset=OFFSET_MINUTES,
    start=st.datetimes(datetime(1970, 1, 2), datetime(9998, 1, 1)),
    microseconds=st.integers(0, 999_999),
    workload=TEXT,
    received=st.datetimes(datetime(1970, 1, 2), datetime(9998, 1, 1), timezones=st.just(UTC)),
    as_text=st.booleans(),
)
def test_a_state_from_the_validated_report_is_the_state_of_its_fact(
    counters: list[int],
    sequence: int,
    offset: int,
    start: datetime,
    microseconds: int,
    workload: str,
    received: datetime,
    as_text: bool,
) -> None:
    zone = timezone(timedelta(minutes=offset))
    begins = start.replace(tzinfo=zone, microsecond=microseconds)
    sent: dict[str, Any] = {
        "lease_id": str(uuid4()),
        "sequence": sequence,
        "interval_start": begins.isoformat(),
        "interval_end": (begins + timedelta(seconds=1)).isoformat(),
        "gpu_count": 8,
        **dict(
            zip(
                ["wall_time_us", "device_time_us", "flops", "samples", "tokens", "steps",
                 "peak_memory_bytes"],
                [str(c) if as_text else c for c in counters],
                strict=True,
            )
        ),
        "workload": workload,
        "device": "cuda:0 \"quoted\" \u00e9",
    }  # fmt: skip
    if not as_text and any(c > 2**64 - 1 for c in counters):
        sent = {k: (str(v) if type(v) is int and v > 2**63 else v) for k, v in sent.items()}
    batch = USAGE_BATCH_ADAPTER.validate_python({"node_id": str(uuid4()), "reports": [sent]})
    (report,) = batch["reports"]
    states = ReportStates(uuid4(), batch["node_id"], received)
    fact = states.fact(report)
    state = states.state(report)
    assert state == state_of(fact) == orjson.dumps(encode(fact))
    assert usage_of_state(state) == fact


def test_a_time_whose_offset_has_seconds_is_written_as_isoformat_writes_it() -> None:
    odd = timezone(timedelta(seconds=3_661))
    report = USAGE_BATCH_ADAPTER.validate_python(
        {
            "node_id": str(uuid4()),
            "reports": [
                {
                    "lease_id": str(uuid4()), "sequence": 1,
                    "interval_start": "2026-12-01T12:00:00+00:00",
                    "interval_end": "2026-12-01T12:00:10+00:00", "gpu_count": 1,
                    "wall_time_us": 1, "device_time_us": 1, "flops": 1, "samples": 1,
                    "tokens": 1, "steps": 1, "peak_memory_bytes": 1, "workload": "w",
                    "device": "d",
                }
            ],
        }
    )["reports"][0]  # fmt: skip
    states = ReportStates(uuid4(), uuid4(), datetime(2026, 12, 1, 12, 0, tzinfo=odd))
    fact = states.fact(report)
    assert states.state(report) == state_of(fact) == orjson.dumps(encode(fact))
    assert b'"received_at":"2026-12-01T12:00:00+01:01:01"' in states.state(report)
