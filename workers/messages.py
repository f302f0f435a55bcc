"""The messages on Kafka: JSON envelopes (CloudEvents-like) and their payloads, validated
with pydantic at the boundary. Plain JSON any Kafka client can produce and read.

An envelope::

    {"id": "<uuid>", "type": "aether.usage.v1", "source": "node/<node id>",
     "subject": "<lease id>", "time": "2026-12-01T12:00:05Z", "data": {...}}

`type` names the payload and its version; `subject` is the message key (a lease or a node),
so one key stays ordered on one partition. Amounts and counters are JSON integers (decimal
strings are accepted too, for readers whose numbers are doubles). A node signs its reports
(`workers.signing`): `data.signature` covers `data` without it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from domain.usage import RejectReason as RejectReason

MESSAGE_BYTES_MAX = 64 * 1024
"""Largest message value ingest reads; a larger one is dead-lettered as oversized."""
SEQUENCE_MAX = 2**63 - 1
COUNTER_MAX = 2**127
"""Bound on FLOPs and other counters (far above any real interval)."""
GPU_COUNT_MAX = 1_024
TEXT_LENGTH_MAX = 128

USAGE_TYPE = "aether.usage.v1"
HEARTBEAT_TYPE = "aether.heartbeat.v1"
VERDICT_TYPE = "aether.verdict.v1"
DEAD_LETTER_TYPE = "aether.dead_letter.v1"

Counter = Annotated[int, Field(ge=0, le=COUNTER_MAX)]
Sequence = Annotated[int, Field(ge=1, le=SEQUENCE_MAX)]
Text = Annotated[str, Field(min_length=1, max_length=TEXT_LENGTH_MAX)]
Signature = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


M = TypeVar("M", bound=_Model)


class Envelope(_Model):
    id: UUID
    type: Text
    source: Text
    subject: Text
    time: AwareDatetime
    data: dict[str, Any]


class UsageReport(_Model):
    """What a GPU worker measured on one lease over one interval."""

    lease_id: UUID
    node_id: UUID
    sequence: Sequence
    """Per lease, 1, 2, 3...: a gap is a lost report, a repeat a duplicate."""
    interval_start: AwareDatetime
    interval_end: AwareDatetime
    gpu_count: Annotated[int, Field(ge=1, le=GPU_COUNT_MAX)]
    wall_time_us: Counter
    device_time_us: Counter
    """Time the devices were busy, summed over the lease's GPUs (CUDA events on a GPU)."""
    flops: Counter
    samples: Counter
    tokens: Counter
    steps: Counter
    peak_memory_bytes: Counter
    workload: Text
    device: Text
    signature: Signature | None = None


class HeartbeatReport(_Model):
    lease_id: UUID
    node_id: UUID
    sequence: Sequence
    at: AwareDatetime
    signature: Signature | None = None


class VerdictReport(_Model):
    """A checker's verdict on a node for a window (see `domain.verdicts.Verdict`)."""

    verdict_id: UUID
    checker_id: UUID
    node_id: UUID
    provider_id: UUID
    window_start: AwareDatetime
    window_end: AwareDatetime
    latency_ms_p99: Annotated[int, Field(ge=0)]
    throughput_milli_per_s: Annotated[int, Field(ge=0)]
    uptime_ppm: Annotated[int, Field(ge=0, le=1_000_000)]
    passed: bool
    failure_kind: Literal["none", "downtime", "fraud", "under_spec"]
    evidence_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class MessageRejectedError(Exception):
    """A message ingest does not accept; nothing of it is recorded."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(envelope: Envelope) -> bytes:
    return orjson.dumps(envelope.model_dump(mode="json"))


def envelope(
    id: UUID, type: str, source: str, subject: str, time: datetime, data: BaseModel
) -> Envelope:
    return Envelope(
        id=id,
        type=type,
        source=source,
        subject=subject,
        time=time,
        data=data.model_dump(mode="json", exclude_none=True),
    )


def decode_envelope(value: bytes | None) -> Envelope:
    """The envelope of a message value; MessageRejectedError (oversized or malformed) otherwise."""
    if value is None:
        raise MessageRejectedError(RejectReason.malformed, "the message has no value")
    if len(value) > MESSAGE_BYTES_MAX:
        raise MessageRejectedError(
            RejectReason.oversized, f"{len(value)} bytes, at most {MESSAGE_BYTES_MAX} are read"
        )
    try:
        return Envelope.model_validate(orjson.loads(value))
    except (orjson.JSONDecodeError, ValidationError) as e:
        raise MessageRejectedError(RejectReason.malformed, _short(e)) from e


def payload(cls: type[M], envelope: Envelope) -> M:
    try:
        return cls.model_validate(envelope.data)
    except ValidationError as e:
        raise MessageRejectedError(RejectReason.malformed, _short(e)) from e


def _short(error: Exception) -> str:
    text = str(error).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."
