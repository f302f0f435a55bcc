"""The messages on Kafka: JSON envelopes (CloudEvents-like) and their payloads, validated
with pydantic at the boundary. Plain JSON any Kafka client can produce and read.

An envelope::

    {"id": "<uuid>", "type": "aether.usage.v1", "source": "node/<node id>",
     "subject": "<lease id>", "time": "2026-12-01T12:00:05Z", "data": {...}}

`type` names the payload and its version; `subject` is the message key (a lease or a node),
so one key stays ordered on one partition. Amounts and counters are JSON integers (decimal
strings are accepted too, for readers whose numbers are doubles, and needed past 2**64-1,
which orjson reads as a double). A node signs its reports (`workers.signing`):
`data.signature` (128 hex digits, Ed25519) covers `data` without it, as canonical JSON
(keys sorted at every level, no spaces: `workers.signing.canonical_bytes`).

Usage, in one of two types on the usage topic:

- ``aether.usage.v1`` (one report; subject and key: the lease id): `data` is a
  `UsageReport` (lease_id, node_id, sequence, interval_start, interval_end, gpu_count,
  wall_time_us, device_time_us, flops, samples, tokens, steps, peak_memory_bytes,
  workload, device, signature).
- ``aether.usage_batch.v1`` (what a node sends: ONE signed message per report interval, or
  per `intervals` intervals, carrying the reports of every lease the node serves; subject
  and key: the node id, source ``node/<node id>``)::

      "data": {"node_id": "<uuid>",
               "reports": [{"lease_id": "<uuid>", "sequence": 7,
                            "interval_start": "...", "interval_end": "...",
                            "gpu_count": 1, "wall_time_us": 10000000,
                            "device_time_us": 9500000, "flops": 3120000000000000,
                            "samples": 2560, "tokens": 0, "steps": 10,
                            "peak_memory_bytes": 64424509440,
                            "workload": "train", "device": "cuda"}, ...],
               "signature": "<128 hex>"}

  Each report is a `UsageReport` without node_id (the batch's) and signature (the batch's
  one signature covers `data`: node_id and every report, in order). Each report keeps its
  own lease, per-lease sequence and interval; a lease may appear several times (several
  intervals, in sequence order). At most BATCH_REPORTS_MAX reports and MESSAGE_BYTES_MAX
  bytes (else `oversized`). Ingest verifies the batch once: a batch that is unsigned,
  forged or altered is dead-lettered whole (`unsigned`, `signature_invalid`); in a batch
  that verifies, each report is checked by the usage rules on its own, so one bad report
  (unknown lease, replayed, overlapping, impossible...) is dead-lettered alone, with its
  index in the batch, and the others are recorded. Every recorded report of a batch
  carries the batch's envelope id.

Validation of a batch is one compiled pydantic-core call (`USAGE_BATCH_ADAPTER`, over
TypedDicts) for all its reports. Ingest's decode (`decode_usage_value`) first tries a fast
path (`_decode_text`): the whole message validated straight from its bytes, lease ids and
times kept as text and each distinct text validated once per decode process by the same
validators; whatever that path does not take (not signed, not valid, counters as strings
or past 2**64-1...) goes the full path above, which gives the reason and the detail.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, NamedTuple, NotRequired, TypeVar
from uuid import UUID

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    with_config,
)
from typing_extensions import TypedDict

from domain.usage import RejectReason as RejectReason
from domain.usage import epoch_us
from ledger.usage import RULE_FIELDS, LeaseText, ReportStates, TimeText, time_text
from workers.segments import SegmentRef, attach
from workers.signing import canonical_bytes, public_key, verify_bytes

MESSAGE_BYTES_MAX = 64 * 1024
"""Largest message value ingest reads; a larger one is dead-lettered as oversized."""
SEQUENCE_MAX = 2**63 - 1
COUNTER_MAX = 2**127
"""Bound on FLOPs and other counters (far above any real interval)."""
GPU_COUNT_MAX = 1_024
TEXT_LENGTH_MAX = 128
BATCH_REPORTS_MAX = 128
"""Most reports in one usage batch (a node of 8 leases: 16 intervals); more is oversized."""

USAGE_TYPE = "aether.usage.v1"
USAGE_BATCH_TYPE = "aether.usage_batch.v1"
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


UsageCounter = Annotated[int, Field(ge=0, le=COUNTER_MAX)]
GpuCount = Annotated[int, Field(ge=1, le=GPU_COUNT_MAX)]


@with_config(ConfigDict(extra="forbid", strict=False))
class BatchedUsage(TypedDict):
    """One lease's report in a usage batch: a `UsageReport` without node_id and signature."""

    lease_id: UUID
    sequence: Sequence
    interval_start: AwareDatetime
    interval_end: AwareDatetime
    gpu_count: GpuCount
    wall_time_us: UsageCounter
    device_time_us: UsageCounter
    flops: UsageCounter
    samples: UsageCounter
    tokens: UsageCounter
    steps: UsageCounter
    peak_memory_bytes: UsageCounter
    workload: Text
    device: Text


@with_config(ConfigDict(extra="forbid", strict=False))
class UsageBatch(TypedDict):
    """The data of an ``aether.usage_batch.v1`` message (see the module docstring)."""

    node_id: UUID
    reports: Annotated[list[BatchedUsage], Field(min_length=1, max_length=BATCH_REPORTS_MAX)]
    signature: NotRequired[Signature]


@with_config(ConfigDict(extra="forbid", strict=False))
class UsageReportData(TypedDict):
    """The data of an ``aether.usage.v1`` message, as ingest validates it (the same fields
    and bounds as `UsageReport`, as a dict)."""

    lease_id: UUID
    node_id: UUID
    sequence: Sequence
    interval_start: AwareDatetime
    interval_end: AwareDatetime
    gpu_count: GpuCount
    wall_time_us: UsageCounter
    device_time_us: UsageCounter
    flops: UsageCounter
    samples: UsageCounter
    tokens: UsageCounter
    steps: UsageCounter
    peak_memory_bytes: UsageCounter
    workload: Text
    device: Text
    signature: NotRequired[Signature | None]


_JsonCounter = Annotated[int, Field(ge=0, le=2**64 - 1, strict=True)]
_JsonSequence = Annotated[int, Field(ge=1, le=SEQUENCE_MAX, strict=True)]
_JsonGpuCount = Annotated[int, Field(ge=1, le=GPU_COUNT_MAX, strict=True)]


@with_config(ConfigDict(extra="forbid", strict=False))
class _TextBatchedUsage(TypedDict):
    """`BatchedUsage` as decode's fast path reads it from the message's JSON: its lease id
    and times left as their text (each distinct text validated once, with the validators of
    `BatchedUsage`: `_uuid`, `_aware_time`) and its integers only JSON integers that orjson
    reads as integers too, so that the validated data is the data as `orjson.loads` reads
    it (what the signature covers). Anything else goes the full path."""

    lease_id: str
    sequence: _JsonSequence
    interval_start: str
    interval_end: str
    gpu_count: _JsonGpuCount
    wall_time_us: _JsonCounter
    device_time_us: _JsonCounter
    flops: _JsonCounter
    samples: _JsonCounter
    tokens: _JsonCounter
    steps: _JsonCounter
    peak_memory_bytes: _JsonCounter
    workload: Text
    device: Text


@with_config(ConfigDict(extra="forbid", strict=False))
class _TextUsageBatch(TypedDict):
    node_id: str
    reports: Annotated[list[_TextBatchedUsage], Field(min_length=1, max_length=BATCH_REPORTS_MAX)]
    signature: NotRequired[Signature]


@with_config(ConfigDict(extra="forbid", strict=False))
class _TextUsageReportData(_TextBatchedUsage):
    """A single report's data as the fast path reads it: a batched report's fields, the
    node's id and the signature (key order does not matter: the signature covers the
    sorted-key JSON, and the report is taken field by field)."""

    node_id: str
    signature: NotRequired[Signature | None]


@with_config(ConfigDict(extra="forbid", strict=False))
class _TextBatchEnvelope(TypedDict):
    """An `Envelope` of a usage batch, as decode's fast path validates it from its bytes."""

    id: UUID
    type: Literal["aether.usage_batch.v1"]
    source: Text
    subject: Text
    time: AwareDatetime
    data: _TextUsageBatch


@with_config(ConfigDict(extra="forbid", strict=False))
class _TextReportEnvelope(TypedDict):
    """An `Envelope` of a single usage report, as decode's fast path validates it."""

    id: UUID
    type: Literal["aether.usage.v1"]
    source: Text
    subject: Text
    time: AwareDatetime
    data: _TextUsageReportData


BATCHED_USAGE_FIELDS: tuple[str, ...] = tuple(BatchedUsage.__annotations__)
"""A batched report's fields, in order (a validated report dict has them in this order)."""
USAGE_BATCH_ADAPTER: TypeAdapter[UsageBatch] = TypeAdapter(UsageBatch)
USAGE_REPORT_ADAPTER: TypeAdapter[UsageReportData] = TypeAdapter(UsageReportData)
_TEXT_BATCH_ADAPTER: TypeAdapter[_TextBatchEnvelope] = TypeAdapter(_TextBatchEnvelope)
_TEXT_REPORT_ADAPTER: TypeAdapter[_TextReportEnvelope] = TypeAdapter(_TextReportEnvelope)
_UUID_ADAPTER: TypeAdapter[UUID] = TypeAdapter(UUID)
_TIME_ADAPTER: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)
assert tuple(_TextBatchedUsage.__annotations__) == BATCHED_USAGE_FIELDS
assert USAGE_BATCH_TYPE == "aether.usage_batch.v1" and USAGE_TYPE == "aether.usage.v1"


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


def usage_batch(envelope: Envelope) -> UsageBatch:
    """The validated data of a usage batch; MessageRejectedError (oversized: more than
    BATCH_REPORTS_MAX reports; malformed) otherwise."""
    reports = envelope.data.get("reports")
    if isinstance(reports, list) and len(reports) > BATCH_REPORTS_MAX:
        raise MessageRejectedError(
            RejectReason.oversized,
            f"message {envelope.id}: {len(reports)} reports, at most {BATCH_REPORTS_MAX} "
            "in one batch",
        )
    try:
        return USAGE_BATCH_ADAPTER.validate_python(envelope.data)
    except ValidationError as e:
        raise MessageRejectedError(RejectReason.malformed, _short(e)) from e


def usage_report_data(envelope: Envelope) -> UsageReportData:
    """The validated data of a single usage report (a dict); MessageRejectedError otherwise."""
    try:
        return USAGE_REPORT_ADAPTER.validate_python(envelope.data)
    except ValidationError as e:
        raise MessageRejectedError(RejectReason.malformed, _short(e)) from e


def batch_data(node_id: UUID, reports: Iterable[UsageReport]) -> dict[str, Any]:
    """The JSON data of a usage batch of `reports` (all the node's), unsigned: each report
    as its JSON without node_id and signature. Counters past 2**64-1 are sent as decimal
    strings (JSON numbers that large are read as doubles by many readers, orjson too)."""
    items = []
    for report in reports:
        if report.node_id != node_id:
            raise ValueError(f"report of lease {report.lease_id} is from node {report.node_id}")
        item = report.model_dump(mode="json", exclude={"node_id", "signature"})
        for name, value in item.items():
            if type(value) is int and value > _JSON_INT_MAX:
                item[name] = str(value)
        items.append(item)
    return {"node_id": str(node_id), "reports": items}


_JSON_INT_MAX = 2**64 - 1


def batch_reports(envelope: Envelope) -> list[UsageReport]:
    """The reports of a usage batch as `UsageReport`s (node_id from the batch, unsigned);
    MessageRejectedError when the batch is not valid. For readers (the checker), not the
    ingest's hot path."""
    batch = usage_batch(envelope)
    try:
        return [
            UsageReport.model_validate({**r, "node_id": batch["node_id"]}) for r in batch["reports"]
        ]
    except ValidationError as e:
        raise MessageRejectedError(RejectReason.malformed, _short(e)) from e


def _short(error: Exception) -> str:
    text = str(error).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


# -- decoding usage messages (ingest's hot path; runs in ingest's decode processes) -------


class DecodedUsage(NamedTuple):
    """A usage message (a batch or a single report) decoded and validated, not yet decided
    (and verified only where the ingest process gave the node's key): what the rules need
    of each report, as integers, and each report's usage event as a binary COPY row
    (`ledger.usage.copy_row`), to store if the rules accept it."""

    envelope: int
    """The envelope id, as its integer (`UUID.int`)."""
    node: int
    """The reporting node's id, as its integer."""
    batched: bool
    signed: bytes
    """What the signature covers (`workers.signing.canonical_bytes` of the data); empty
    where the signature was checked in the decode process (`verified`)."""
    signature: bytes
    """The signature's 64 bytes."""
    reports: bytes | bytearray | list[tuple[int, int, int, int, int, int, int]]
    """Per report, in order, what the rules read (`domain.usage.check_report`): its
    `ledger.usage.RULE_FIELDS` packed one after the other (or, where a counter is past
    what they hold, as tuples of the same integers): the index of its lease in `leases`,
    sequence, interval start and end (microseconds since the Unix epoch,
    `domain.usage.epoch_us`), gpu_count, wall_time_us, device_time_us."""
    rows: bytes | bytearray | memoryview
    """The reports' usage events (envelope id, node id and receive time spliced in), one
    after the other: `ledger.usage.ReportStates.copy_rows`; empty where they were written
    into the task's shared-memory segment, at `rows_at`."""
    ends: list[int]
    """Where each report's row ends in `rows` (or after `rows_at` in the segment)."""
    leases: list[int]
    """The integers (`UUID.int`) of the leases the reports are for, each once."""
    verified: bool | None = None
    """Whether the node's key `key` signed `signed` (checked in the decode process); None
    where no key was given for the node: `signed` is then for the ingest process to check."""
    key: str = ""
    """The public key (hex) the signature was checked against."""
    rows_at: int = -1
    """Where the rows start in the task's shared-memory segment (-1: in `rows`)."""


UsageRejection = tuple[str, str]
"""(a `RejectReason` value, detail): a usage message that did not decode."""


PARENT_CHECK_S = 1.0
"""How often a decode process checks that the ingest process that started it lives."""


def decode_worker_init(parent_pid: int) -> None:
    """Start-up of an ingest decode process: a daemon thread ends the process once its
    parent (`parent_pid`) is gone, so a killed ingest leaves no decode process behind."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _received_at(timestamp_ms: int) -> datetime:
    """A record's timestamp (milliseconds since the epoch) as an exact UTC datetime."""
    seconds, ms = divmod(timestamp_ms, 1000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(milliseconds=ms)


def decode_usage(
    topic: str,
    records: Seq[tuple[bytes | None, int]],
    keys: Mapping[int, str] | None = None,
    segment: SegmentRef | None = None,
    spans: Seq[tuple[int, int, int]] | None = None,
    rows_from: int = 0,
) -> tuple[list[DecodedUsage | UsageRejection], float]:
    """Each usage-topic record (value, timestamp in ms) decoded (`decode_usage_value`) or
    rejected, and the CPU seconds it took. Ingest runs it in a process of its own.

    `keys` (node id's integer -> the public key the marketplace registered for it, hex):
    the signature of a message from one of those nodes is checked here (`verified`, `key`)
    and what it covers is not sent back. `segment`
    (`workers.segments`): the rows are written there from `rows_from` on, as many as fit,
    instead of being sent back. `spans`: the records are in the segment instead, each as
    (where its value starts, its length (-1: no value), its timestamp); where the segment
    cannot be mapped here the answer is ``([], -1.0)``: the caller decodes them itself."""
    started = time.process_time()
    mapped = None if segment is None else attach(segment)
    values: Iterable[tuple[bytes | None, int]] = records
    if spans is not None:
        if mapped is None:
            return [], -1.0
        values = (
            (None if length < 0 else mapped[at : at + length], timestamp_ms)
            for at, length, timestamp_ms in spans
        )
    out: list[DecodedUsage | UsageRejection] = []
    free = 0 if mapped is None else len(mapped)
    at = rows_from
    for value, timestamp_ms in values:
        try:
            decoded = decode_usage_value(topic, value, timestamp_ms)
        except MessageRejectedError as e:
            out.append((e.reason.value, e.detail))
            continue
        key_hex = None if keys is None else keys.get(decoded.node)
        key = None if key_hex is None else public_key(key_hex)
        size = len(decoded.rows)
        if mapped is not None and size <= free - at:
            mapped[at : at + size] = decoded.rows
            decoded = decoded._replace(rows=b"", rows_at=at)
            at += size
        if key is not None:
            # Here, not in a thread: the verifier holds the GIL enough that a thread only
            # adds switches (measured: 0.4-1.8 us per event more CPU, no less wall time).
            assert key_hex is not None
            verified = verify_bytes(key, decoded.signed, decoded.signature)
            decoded = decoded._replace(signed=b"", verified=verified, key=key_hex)
        out.append(decoded)
    return out, time.process_time() - started


def node_id_text(value: bytes) -> bytes | None:
    """The text of the first ``"node_id"`` string field in a message's bytes, found without
    parsing it (a hint: which node's key to hand to `decode_usage`; the key is used only if
    the decoded message names that node)."""
    at = value.find(b'"node_id":"')
    if at < 0:
        return None
    return value[at + 11 : at + 47]


TEXTS_CACHED_MAX = 1 << 16
"""Most lease ids and times (each) a decode process keeps validated, by their text."""
_uuids: dict[str, LeaseText] = {}
_times: dict[str, TimeText] = {}


def _uuid(text: str) -> LeaseText:
    """The UUID of `text` (pydantic's UUID validator: ValidationError when it is not one),
    its stored text (`str(UUID)`), its bytes and its integer; validated once per distinct
    text."""
    entry = _uuids.get(text)
    if entry is None:
        value = _UUID_ADAPTER.validate_python(text)
        if len(_uuids) >= TEXTS_CACHED_MAX:
            _uuids.clear()
        entry = _uuids[text] = (value, str(value), value.bytes, value.int)
    return entry


def _aware_time(text: str) -> TimeText:
    """The aware time of `text` (pydantic's AwareDatetime validator: ValidationError when it
    is not one), as microseconds since the epoch and as its stored text (`time_text`);
    validated once per distinct text."""
    entry = _times.get(text)
    if entry is None:
        value = _TIME_ADAPTER.validate_python(text)
        if len(_times) >= TEXTS_CACHED_MAX:
            _times.clear()
        entry = _times[text] = (value, epoch_us(value), time_text(value))
    return entry


_SINGLE_TYPE_TEXT = b'"type":"' + USAGE_TYPE.encode() + b'"'


def _decode_text(value: bytes, timestamp_ms: int) -> DecodedUsage | None:
    """`decode_usage_value`'s fast path: the message validated from its bytes in one
    pydantic-core call, its reports' lease ids and times as text (each distinct text then
    validated once by the validators the full schema uses: `_uuid`, `_aware_time`), their
    states written from that text. None (or ValidationError) where the message is not a
    signed usage message of that form: the full path then decides, with its reason and
    detail (or takes what the fast path leaves to it)."""
    reports: list[dict[str, Any]]
    if _SINGLE_TYPE_TEXT in value:
        single = _TEXT_REPORT_ADAPTER.validate_json(value)
        report = single["data"]
        message_id = single["id"]
        data: dict[str, Any] = report  # type: ignore[assignment]
        node_text = report["node_id"]
        signature = report.get("signature")
        # As a batch's report is (the fields and order `ReportStates` writes).
        reports = [{name: data[name] for name in BATCHED_USAGE_FIELDS}]
        batched = False
    else:
        batch = _TEXT_BATCH_ADAPTER.validate_json(value)
        message_id = batch["id"]
        data = batch["data"]  # type: ignore[assignment]
        node_text = batch["data"]["node_id"]
        signature = batch["data"].get("signature")
        reports = data["reports"]
        batched = True
    if signature is None:
        return None
    try:
        signed = canonical_bytes(data)
    except orjson.JSONEncodeError:  # text orjson does not write (a lone surrogate)
        return None
    node_id = _uuid(node_text)[0]
    states = ReportStates(message_id, node_id, _received_at(timestamp_ms))
    rows, ends, fields, leases = states.copy_rows_of_text(
        reports, _uuid, _aware_time, _uuids, _times
    )
    return DecodedUsage(
        message_id.int,
        node_id.int,
        batched,
        signed,
        bytes.fromhex(signature),
        fields,
        rows,
        ends,
        leases,
    )


def decode_usage_value(topic: str, value: bytes | None, timestamp_ms: int) -> DecodedUsage:
    """A usage message decoded and validated (a batch's reports in one pydantic-core call),
    its signature's bytes and what it covers, each report's rule fields and event row;
    MessageRejectedError (oversized, malformed, unknown_type, unsigned) otherwise."""
    if value is not None and len(value) <= MESSAGE_BYTES_MAX:
        try:
            decoded = _decode_text(value, timestamp_ms)
        except ValidationError:
            decoded = None
        if decoded is not None:
            return decoded
    envelope = decode_envelope(value)
    type_ = envelope.type
    reports: Seq[Any]
    if type_ == USAGE_BATCH_TYPE:
        batch = usage_batch(envelope)
        node_id = batch["node_id"]
        signature = batch.get("signature")
        reports = batch["reports"]
        batched = True
    elif type_ == USAGE_TYPE:
        report = usage_report_data(envelope)
        node_id = report["node_id"]
        signature = report.get("signature")
        # As a batch's report is (the fields and order `ReportStates` writes).
        reports = ({name: report[name] for name in BATCHED_USAGE_FIELDS},)  # type: ignore[literal-required]
        batched = False
    else:
        raise MessageRejectedError(
            RejectReason.unknown_type,
            f"message {envelope.id}: type {envelope.type!r} on topic {topic} "
            f"(which carries {USAGE_TYPE} or {USAGE_BATCH_TYPE})",
        )
    if signature is None:
        raise MessageRejectedError(
            RejectReason.unsigned, f"message {envelope.id} from node {node_id}"
        )
    rows, ends = ReportStates(envelope.id, node_id, _received_at(timestamp_ms)).copy_rows(reports)
    index: dict[int, int] = {}
    fields = [
        (
            index.setdefault(r["lease_id"].int, len(index)),
            r["sequence"],
            epoch_us(r["interval_start"]),
            epoch_us(r["interval_end"]),
            r["gpu_count"],
            r["wall_time_us"],
            r["device_time_us"],
        )
        for r in reports
    ]
    packed: bytes | list[tuple[int, int, int, int, int, int, int]]
    try:
        packed = b"".join(RULE_FIELDS.pack(*f) for f in fields)
    except struct.error:  # a counter past 2**64-1: the rules refuse it, with its value
        packed = fields
    return DecodedUsage(
        envelope.id.int,
        node_id.int,
        batched,
        canonical_bytes(envelope.data),
        bytes.fromhex(signature),
        packed,
        rows,
        ends,
        list(index),
    )
