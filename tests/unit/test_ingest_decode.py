"""Ingest's decode (`workers.messages.decode_usage`, in a decode process) and the
shared-memory segments it writes into (`workers.segments`): whichever way the values come
in and the rows go back (pipe or segment), whether the signature is checked there or left
to the ingest process, the answer is the same rows, rule fields and signature verdict."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.usage import epoch_us
from ledger.usage import RULE_FIELDS
from workers.messages import (
    USAGE_BATCH_TYPE,
    DecodedUsage,
    decode_usage,
    decode_usage_value,
    node_id_text,
)
from workers.segments import SEGMENTS_FREE_MAX, Segments
from workers.signing import NodeKey, canonical_bytes

TOPIC = "aether.usage"
START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NODE_KEY = NodeKey.from_seed(bytes(range(32)))
OTHER_KEY = NodeKey.from_seed(bytes(range(1, 33)))


def batch(
    node_id: UUID,
    leases: list[UUID],
    intervals: int,
    *,
    key: NodeKey = NODE_KEY,
    counter: int | str = 1_000_000,
) -> bytes:
    reports: list[dict[str, Any]] = [
        {
            "lease_id": str(lease_id),
            "sequence": sequence,
            "interval_start": (START + timedelta(seconds=sequence - 1)).isoformat(),
            "interval_end": (START + timedelta(seconds=sequence)).isoformat(),
            "gpu_count": 1,
            "wall_time_us": counter,
            "device_time_us": 900_000,
            "flops": 10**15,
            "samples": 64,
            "tokens": 0,
            "steps": 1,
            "peak_memory_bytes": 2**33,
            "workload": "train",
            "device": "cuda",
        }
        for sequence in range(1, intervals + 1)
        for lease_id in leases
    ]
    data: dict[str, Any] = {"node_id": str(node_id), "reports": reports}
    data["signature"] = key.sign(data)
    return orjson.dumps(
        {
            "id": str(uuid4()),
            "type": USAGE_BATCH_TYPE,
            "source": f"node/{node_id}",
            "subject": str(node_id),
            "time": START.isoformat(),
            "data": data,
        }
    )


def in_segment(segment: Any, records: list[tuple[bytes, int]]) -> tuple[list[Any], int]:
    """The records written into `segment` as the ingest process writes them: spans, and
    where the rows may start."""
    spans, at = [], 0
    for value, timestamp_ms in records:
        segment.buf[at : at + len(value)] = value
        spans.append((at, len(value), timestamp_ms))
        at += len(value)
    return spans, at


def rows_of(answer: DecodedUsage, segment: Any) -> bytes:
    if answer.rows_at < 0:
        return bytes(answer.rows)
    return bytes(segment.buf[answer.rows_at : answer.rows_at + answer.ends[-1]])


@settings(max_examples=25, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.integers(1, 8), st.integers(1, 8), st.booleans()), min_size=1, max_size=6
    )
)
def test_the_segment_and_the_pipe_give_the_same_answer(
    messages: list[tuple[int, int, bool]],
) -> None:
    node_id = uuid4()
    records = []
    for leases, intervals, forged in messages:
        key = OTHER_KEY if forged else NODE_KEY
        records.append(
            (
                batch(node_id, [uuid4() for _ in range(leases)], intervals, key=key),
                1_764_590_400_000,
            )
        )
    piped, _ = decode_usage(TOPIC, records)
    segments = Segments()
    try:
        segment = segments.acquire(3 * sum(len(v) for v, _ in records) + 65_536)
        assert segment is not None
        spans, rows_from = in_segment(segment, records)
        keys = {node_id.int: NODE_KEY.public_key_hex}
        shared, cpu_s = decode_usage(
            TOPIC, (), keys, (segment.name, segment.size), spans, rows_from
        )
        assert cpu_s >= 0
        assert len(shared) == len(piped) == len(records)
        for (_, _, forged), one, other in zip(messages, piped, shared, strict=True):
            assert isinstance(one, DecodedUsage) and isinstance(other, DecodedUsage)
            assert one.rows_at == -1 and other.rows_at >= rows_from
            assert rows_of(one, segment) == rows_of(other, segment)
            assert one.ends == other.ends and one.reports == other.reports
            assert one.leases == other.leases
            # Checked in the decode process against the key given: nothing left to check.
            assert one.verified is None and one.signed
            assert other.verified is (not forged) and other.signed == b""
            assert other.key == NODE_KEY.public_key_hex
        del spans, shared
    finally:
        segments.close()


def test_rule_fields_are_the_reports_integers_and_lease_indexes() -> None:
    node_id, leases = uuid4(), [uuid4(), uuid4(), uuid4()]
    value = batch(node_id, leases, 2)
    answer = decode_usage_value(TOPIC, value, 1_764_590_400_000)
    assert answer.leases == [lease.int for lease in leases]
    fields = list(RULE_FIELDS.iter_unpack(answer.reports))
    assert fields[0] == (
        0, 1, epoch_us(START), epoch_us(START + timedelta(seconds=1)), 1, 1_000_000, 900_000
    )  # fmt: skip
    assert [f[0] for f in fields] == [0, 1, 2, 0, 1, 2]
    assert [f[1] for f in fields] == [1, 1, 1, 2, 2, 2]
    assert answer.signed == canonical_bytes(orjson.loads(value)["data"])


def test_a_counter_past_64_bits_goes_as_tuples_with_its_value() -> None:
    # A decimal string past 2**64-1 takes the full path; the rules refuse it with its value.
    huge = 2**100
    value = batch(uuid4(), [uuid4()], 1, counter=str(huge))
    answer = decode_usage_value(TOPIC, value, 1_764_590_400_000)
    assert isinstance(answer.reports, list)
    assert answer.reports[0][5] == huge and answer.reports[0][0] == 0


def test_a_segment_too_small_sends_the_rows_back_through_the_pipe() -> None:
    node_id = uuid4()
    records = [(batch(node_id, [uuid4()], 4), 1_764_590_400_000) for _ in range(3)]
    segments = Segments()
    try:
        segment = segments.acquire(1)
        assert segment is not None
        spans, rows_from = in_segment(segment, records)
        free = segment.size - rows_from
        first_rows = len(decode_usage_value(TOPIC, records[0][0], records[0][1]).rows)
        # Room for the first message's rows only.
        answers, _ = decode_usage(
            TOPIC, (), None, (segment.name, rows_from + first_rows), spans, rows_from
        )
        assert free > first_rows
        assert answers[0].rows_at == rows_from  # type: ignore[union-attr]
        assert [a.rows_at for a in answers[1:]] == [-1, -1]  # type: ignore[union-attr]
        assert all(a.rows for a in answers[1:])  # type: ignore[union-attr]
    finally:
        segments.close()


def test_a_segment_that_cannot_be_mapped_leaves_the_decoding_to_the_caller() -> None:
    answers, cpu_s = decode_usage(
        TOPIC, (), None, ("aether-no-such-segment", 1 << 20), [(0, 10, 0)], 10
    )
    assert (answers, cpu_s) == ([], -1.0)


def test_segments_are_reused_grown_and_removed() -> None:
    segments = Segments()
    first = segments.acquire(100)
    assert first is not None and first.size >= 100
    segments.release(first)
    again = segments.acquire(200)
    assert again is first  # reused: big enough
    bigger = segments.acquire(first.size + 1)
    assert bigger is not None and bigger is not first and bigger.size > first.size
    assert segments.in_use == 2
    segments.release(again)
    segments.release(bigger)
    segments.release(bigger)  # twice: nothing happens
    assert segments.in_use == 0
    names = [first.name, bigger.name]
    extra = [segments.acquire(1) for _ in range(SEGMENTS_FREE_MAX + 2)]
    for segment in extra:
        assert segment is not None
        names.append(segment.name)
        segments.release(segment)
    segments.close()
    for name in names:
        assert not (Path("/dev/shm") / name).exists()


@pytest.mark.parametrize(
    ("value", "found"),
    [
        (b'{"data":{"node_id":"0b8f9a3e-0000-4000-8000-000000000001","reports":[]}}',
         b"0b8f9a3e-0000-4000-8000-000000000001"),
        (b'{"data":{"reports":[]}}', None),
    ],
)  # fmt: skip
def test_the_node_id_hint_is_read_without_parsing(value: bytes, found: bytes | None) -> None:
    assert node_id_text(value) == found
