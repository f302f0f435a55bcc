"""The meter and the worker's reports, on the CPU, without a broker."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from workers.gpu_worker import GpuWorker, sign_report
from workers.messages import HEARTBEAT_TYPE, USAGE_TYPE, Envelope, HeartbeatReport, UsageReport
from workers.metering import FLOP_FORMULAS, Meter, count_flops
from workers.signing import NodeKey, verify
from workers.workloads import (
    Batch,
    InferenceWorkload,
    MlpTrainingWorkload,
    TrainingWorkload,
    Workload,
    WorkloadSize,
)

CPU = torch.device("cpu")
SEED = 7
COUNTERS = (
    "sequence",
    "gpu_count",
    "wall_time_us",
    "device_time_us",
    "flops",
    "samples",
    "tokens",
    "steps",
    "peak_memory_bytes",
)


class FakeClock:
    """An aware clock that moves a millisecond each time it is read."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


class CountingFlopCounter:
    """Our meter's FLOP-counting path, wrapped to count how often it runs."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, workload: Workload, batch: Batch) -> int:
        self.calls.append(batch.shape_key)
        return count_flops(workload, batch)


def flops_of_one_step(workload: Workload) -> dict[tuple[int, ...], int]:
    """FlopCounterMode's own count of one step per shape, on a twin of the workload."""
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(4):
        batch = workload.next_batch()
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            workload.run(batch)
        counts.setdefault(batch.shape_key, counter.get_total_flops())
    return counts


def metered(workload: Workload, gpu_count: int = 1, **kwargs: Any) -> Meter:
    meter = Meter(uuid.uuid4(), uuid.uuid4(), workload, gpu_count, FakeClock(), **kwargs)
    meter.start()
    return meter


def run_intervals(meter: Meter, steps_per_interval: list[int]) -> list[UsageReport]:
    reports = []
    for steps in steps_per_interval:
        for _ in range(steps):
            meter.step()
        reports.append(meter.close_interval())
    return reports


@pytest.fixture(scope="module")
def training_reports() -> list[UsageReport]:
    meter = metered(TrainingWorkload(WorkloadSize.small, SEED, CPU), gpu_count=2)
    return run_intervals(meter, [3, 1, 0, 4])


def test_flops_are_counted_once_per_shape_and_not_again() -> None:
    counter = CountingFlopCounter()
    meter = metered(MlpTrainingWorkload(WorkloadSize.small, SEED, CPU), flop_counter=counter)
    run_intervals(meter, [5, 5])
    assert counter.calls == [(32, 64)]

    counter = CountingFlopCounter()
    meter = metered(InferenceWorkload(WorkloadSize.small, SEED, CPU), flop_counter=counter)
    run_intervals(meter, [6])
    assert counter.calls == [(8, 16), (8, 8)]
    assert set(meter.flops_by_shape) == {(8, 16), (8, 8)}


def test_training_flops_equal_flop_counter_modes_count_times_steps(
    training_reports: list[UsageReport],
) -> None:
    (per_step,) = flops_of_one_step(TrainingWorkload(WorkloadSize.small, SEED, CPU)).values()
    assert per_step > 0
    assert [r.flops for r in training_reports] == [per_step * r.steps for r in training_reports]


def test_inference_flops_equal_the_count_of_each_shape_times_its_steps() -> None:
    expected = flops_of_one_step(InferenceWorkload(WorkloadSize.small, SEED, CPU))
    assert len(expected) == 2
    assert all(flops > 0 for flops in expected.values())
    meter = metered(InferenceWorkload(WorkloadSize.small, SEED, CPU))
    (report,) = run_intervals(meter, [5])
    # Batches alternate full and half length: 3 full, 2 half.
    assert report.flops == 3 * expected[(8, 16)] + 2 * expected[(8, 8)]
    assert report.tokens == 3 * 8 * 16 + 2 * 8 * 8
    assert report.samples == 5 * 8


def test_the_attention_flops_are_counted_on_the_cpu() -> None:
    workload = TrainingWorkload(WorkloadSize.small, SEED, CPU)
    batch = workload.next_batch()
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        workload.run(batch)
    names = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in names


def test_sequences_run_one_to_n_without_gaps(training_reports: list[UsageReport]) -> None:
    assert [r.sequence for r in training_reports] == [1, 2, 3, 4]


def test_intervals_are_contiguous_and_do_not_overlap(training_reports: list[UsageReport]) -> None:
    for report in training_reports:
        assert report.interval_start <= report.interval_end
        assert report.interval_start.tzinfo is not None
    for earlier, later in itertools.pairwise(training_reports):
        assert earlier.interval_end == later.interval_start


def test_counters_add_up_per_interval(training_reports: list[UsageReport]) -> None:
    assert [r.steps for r in training_reports] == [3, 1, 0, 4]
    assert [r.samples for r in training_reports] == [24, 8, 0, 32]
    assert [r.tokens for r in training_reports] == [24 * 16, 8 * 16, 0, 32 * 16]
    assert all(r.gpu_count == 2 for r in training_reports)
    assert all(r.peak_memory_bytes > 0 for r in training_reports)
    assert all(r.device == "cpu" and r.workload.startswith("train/") for r in training_reports)


def test_device_time_is_within_wall_time_times_gpus(training_reports: list[UsageReport]) -> None:
    for report in training_reports:
        assert report.device_time_us <= report.wall_time_us * report.gpu_count
        assert report.device_time_us <= report.wall_time_us
    assert all(r.device_time_us > 0 for r in training_reports if r.steps > 0)


def test_every_counter_is_an_integer(training_reports: list[UsageReport]) -> None:
    for report in training_reports:
        sent = report.model_dump(mode="json")
        for name in COUNTERS:
            assert type(getattr(report, name)) is int, name
            assert type(sent[name]) is int, name


def test_reports_validate_as_usage_reports(training_reports: list[UsageReport]) -> None:
    for report in training_reports:
        sent = report.model_dump(mode="json", exclude_none=True)
        assert UsageReport.model_validate(sent) == report


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    raise AssertionError(f"no change for {value!r}")


def test_the_signature_verifies_and_fails_when_any_field_changes(
    training_reports: list[UsageReport],
) -> None:
    key = NodeKey.from_seed(bytes(range(32)))
    signed = sign_report(training_reports[0], key)
    sent = signed.model_dump(mode="json", exclude_none=True)
    signature = sent["signature"]
    assert verify(key.public_key_hex, sent, signature)
    for name, value in sent.items():
        if name == "signature":
            continue
        tampered = {**sent, name: _changed(value)}
        assert not verify(key.public_key_hex, tampered, signature), name
    other = NodeKey.from_seed(bytes(32))
    assert not verify(other.public_key_hex, sent, signature)


class FakeProducer:
    """An in-memory twin of AIOKafkaProducer.send: delivered at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[Any]:
        self.sent.append((topic, value, key))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def test_a_worker_flushes_its_last_partial_interval_and_signs_what_it_sends() -> None:
    key = NodeKey.from_seed(bytes(range(1, 33)))
    lease_id, node_id = uuid.uuid4(), uuid.uuid4()
    producer = FakeProducer()
    worker = GpuWorker(
        lease_id=lease_id,
        node_id=node_id,
        key=key,
        workload=MlpTrainingWorkload(WorkloadSize.small, SEED, CPU),
        producer=producer,
        gpu_count=1,
        report_interval_s=60.0,
        heartbeat_interval_s=60.0,
    )
    summary = asyncio.run(worker.run(steps_max=7))
    assert (summary.steps, summary.usage_reports, summary.heartbeats) == (7, 1, 1)
    topics = [topic for topic, _, _ in producer.sent]
    assert topics == ["aether.heartbeats", "aether.usage"]
    for topic, value, message_key in producer.sent:
        message = Envelope.model_validate_json(value)
        assert message_key == str(lease_id).encode()
        assert message.subject == str(lease_id)
        assert message.source == f"node/{node_id}"
        assert verify(key.public_key_hex, message.data, message.data["signature"])
        if topic == "aether.usage":
            assert message.type == USAGE_TYPE
            report = UsageReport.model_validate(message.data)
            assert (report.sequence, report.steps, report.samples) == (1, 7, 7 * 32)
            assert report.flops > 0
        else:
            assert message.type == HEARTBEAT_TYPE
            assert HeartbeatReport.model_validate(message.data).sequence == 1


def test_a_worker_reports_each_interval_in_sequence() -> None:
    producer = FakeProducer()
    worker = GpuWorker(
        lease_id=uuid.uuid4(),
        node_id=uuid.uuid4(),
        key=NodeKey.from_seed(bytes(32)),
        workload=MlpTrainingWorkload(WorkloadSize.small, SEED, CPU),
        producer=producer,
        gpu_count=1,
        report_interval_s=0.05,
        heartbeat_interval_s=0.05,
    )
    summary = asyncio.run(worker.run(seconds_max=0.3))
    usage = [
        UsageReport.model_validate(Envelope.model_validate_json(v).data)
        for t, v, _ in producer.sent
        if t == "aether.usage"
    ]
    beats = [
        HeartbeatReport.model_validate(Envelope.model_validate_json(v).data)
        for t, v, _ in producer.sent
        if t == "aether.heartbeats"
    ]
    assert len(usage) == summary.usage_reports >= 3
    assert [r.sequence for r in usage] == list(range(1, len(usage) + 1))
    assert [b.sequence for b in beats] == list(range(1, len(beats) + 1))
    assert sum(r.steps for r in usage) == summary.steps
    for earlier, later in itertools.pairwise(usage):
        assert earlier.interval_end == later.interval_start


def test_a_worker_refuses_intervals_outside_its_limits() -> None:
    with pytest.raises(ValueError, match="report_interval_s"):
        GpuWorker(
            lease_id=uuid.uuid4(),
            node_id=uuid.uuid4(),
            key=NodeKey.from_seed(bytes(32)),
            workload=MlpTrainingWorkload(WorkloadSize.small, SEED, CPU),
            producer=FakeProducer(),
            gpu_count=1,
            report_interval_s=0.0,
        )
