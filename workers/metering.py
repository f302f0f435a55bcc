"""Metering: what a workload did on a lease, per interval, without slowing it down.

A `Meter` wraps each step of a `workers.workloads.Workload` and closes intervals into
`workers.messages.UsageReport`s numbered 1, 2, 3... per lease. What it measures, and how:

- **wall_time_us**: the interval's elapsed time on the host's monotonic clock
  (`time.perf_counter_ns`), from the moment it opened to the moment it closed. The next
  interval opens at that same instant, so intervals are contiguous and never overlap.
  On CUDA the close waits for the last step to finish on the device first, so the
  device time of every step in the interval lies inside its wall time.
  `interval_start` and `interval_end` are the same two instants on the worker's clock
  (an aware datetime, UTC by default).
- **device_time_us**: the time the device was busy running steps, summed over the
  lease's GPUs (the workloads run on one device, so the sum is that device's time).
  On CUDA: a pair of `torch.cuda.Event(enable_timing=True)` recorded around each step,
  read once per interval after a single `synchronize()` of the last one, never a
  synchronize per step (a pool of `CUDA_EVENT_PAIRS_MAX` pairs bounds the memory; when
  it is full, the oldest pair is read, which only waits if the device is that many steps
  behind). On the CPU: the step's wall time (`perf_counter_ns` around `run`), because
  torch spreads a step over several intra-op threads, so the calling thread's CPU time
  would undercount the work and the process's CPU time would count one "device" several
  times over.
- **flops**: floating-point operations counted by `torch.utils.flop_counter.
  FlopCounterMode` (matrix products, convolutions and attention, forward and backward;
  element-wise and optimizer arithmetic is not counted) on the first step of each
  distinct input shape, cached, and added for every later step of that shape; no
  other step runs under the counter. The CPU attention kernels, which torch's table
  lacks, are counted with torch's own attention formulas (`FLOP_FORMULAS`).
- **samples**, **tokens**, **steps**: as the batches state them, summed.
- **peak_memory_bytes**: on CUDA, `torch.cuda.max_memory_allocated` over the interval
  (the peak is reset when an interval closes). On the CPU, the process's peak resident
  set size since it started (`resource.getrusage(RUSAGE_SELF).ru_maxrss`): the CPU
  allocator keeps no per-interval peak.

Every counter is an integer; microseconds are floored from nanoseconds.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from workers.messages import GPU_COUNT_MAX, SEQUENCE_MAX, UsageReport
from workers.workloads import Batch, Workload

CUDA_EVENT_PAIRS_MAX = 4_096
"""Steps whose CUDA events an interval holds before it reads the oldest one early."""
SHAPES_MAX = 64
"""Distinct input shapes whose FLOPs a meter counts and keeps; more is a workload bug."""
TEXT_LENGTH_MAX = 128
"""Longest workload or device name in a report (`workers.messages.Text`)."""
NS_PER_US = 1_000
NS_PER_MS = 1_000_000

Clock = Callable[[], datetime]
"""The worker's clock: aware datetimes for the interval bounds."""
FlopCounter = Callable[[Workload, Batch], int]
"""Runs one step of a workload on a batch and returns the FLOPs it counted."""

aten = torch.ops.aten


def utc_now() -> datetime:
    return datetime.now(UTC)


def _sdpa_cpu_flop(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    flops: int = sdpa_flop_count(query_shape, key_shape, value_shape)  # type: ignore[no-untyped-call]
    return flops


def _sdpa_cpu_backward_flop(
    grad_out_shape: Any,
    query_shape: Any,
    key_shape: Any,
    value_shape: Any,
    *args: Any,
    **kwargs: Any,
) -> int:
    flops: int = sdpa_backward_flop_count(  # type: ignore[no-untyped-call]
        grad_out_shape, query_shape, key_shape, value_shape
    )
    return flops


FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
}
"""Formulas for the ops FlopCounterMode has none for (the CPU attention kernels), as
torch computes them for the CUDA attention kernels."""


class MeteringError(Exception):
    """Metering cannot go on (the message names the lease)."""


def count_flops(workload: Workload, batch: Batch) -> int:
    """Run one step of `workload` on `batch` under FlopCounterMode; its FLOPs."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        workload.run(batch)
    flops = counter.get_total_flops()
    assert isinstance(flops, int) and flops >= 0
    return flops


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)[:TEXT_LENGTH_MAX]
    return device.type


def process_peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class _CudaStepTimer:
    """CUDA event pairs around the steps of one interval, read when it closes."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._free: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._recorded: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._read_ns = 0
        """Device time of the pairs already read in this interval (the pool was full)."""

    def begin(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if len(self._recorded) >= CUDA_EVENT_PAIRS_MAX:
            self._read_oldest()
        if self._free:
            pair = self._free.pop()
        else:
            with torch.cuda.device(self._device):
                pair = (
                    torch.cuda.Event(enable_timing=True),  # type: ignore[no-untyped-call]
                    torch.cuda.Event(enable_timing=True),  # type: ignore[no-untyped-call]
                )
        pair[0].record()
        return pair

    def end(self, pair: tuple[torch.cuda.Event, torch.cuda.Event]) -> None:
        pair[1].record()
        self._recorded.append(pair)

    def _read_oldest(self) -> None:
        start, end = self._recorded.popleft()
        end.synchronize()
        self._read_ns += round(start.elapsed_time(end) * NS_PER_MS)
        self._free.append((start, end))

    def close(self) -> int:
        """Wait for the last step, read every pair once; the interval's device time in ns."""
        if self._recorded:
            self._recorded[-1][1].synchronize()
        total_ns = self._read_ns
        while self._recorded:
            start, end = self._recorded.popleft()
            total_ns += round(start.elapsed_time(end) * NS_PER_MS)
            self._free.append((start, end))
        self._read_ns = 0
        return total_ns


class Meter:
    """Runs a workload's steps for one lease and closes intervals into usage reports.

    Call `start()` when the lease starts working, `step()` for each step, and
    `close_interval()` at each report time (and once more at the end); see the module
    docstring for what each field measures.
    """

    def __init__(
        self,
        lease_id: UUID,
        node_id: UUID,
        workload: Workload,
        gpu_count: int,
        clock: Clock = utc_now,
        flop_counter: FlopCounter = count_flops,
    ) -> None:
        if not 1 <= gpu_count <= GPU_COUNT_MAX:
            raise MeteringError(
                f"lease {lease_id}: gpu_count is 1 to {GPU_COUNT_MAX}, got {gpu_count}"
            )
        self._lease_id = lease_id
        self._node_id = node_id
        self._workload = workload
        self._gpu_count = gpu_count
        self._clock = clock
        self._flop_counter = flop_counter
        self._device = workload.device
        self._device_name = device_name(self._device)
        self._cuda = _CudaStepTimer(self._device) if self._device.type == "cuda" else None
        self._flops_by_shape: dict[tuple[int, ...], int] = {}
        self._sequence_next = 1
        self._opened_ns: int | None = None
        self._opened_at: datetime | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._steps = 0
        self._samples = 0
        self._tokens = 0
        self._flops = 0
        self._step_ns = 0
        """Summed wall time of the steps (the CPU's device time)."""

    @property
    def lease_id(self) -> UUID:
        return self._lease_id

    @property
    def workload(self) -> Workload:
        return self._workload

    @property
    def started(self) -> bool:
        return self._opened_ns is not None

    @property
    def steps_in_interval(self) -> int:
        return self._steps

    @property
    def sequence_next(self) -> int:
        """The sequence number the next closed interval gets."""
        return self._sequence_next

    @property
    def flops_by_shape(self) -> Mapping[tuple[int, ...], int]:
        """FLOPs of one step, per input shape counted so far."""
        return dict(self._flops_by_shape)

    def start(self) -> None:
        """Open the first interval now."""
        assert self._opened_ns is None, "a meter starts once"
        self._open(time.perf_counter_ns(), self._clock())

    def _open(self, at_ns: int, at: datetime) -> None:
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self._opened_ns = at_ns
        self._opened_at = at
        self._reset_counters()

    def step(self) -> None:
        """Run one step of the workload, metered."""
        assert self._opened_ns is not None, "start() the meter before its first step"
        batch = self._workload.next_batch()
        shape = batch.shape_key
        flops = self._flops_by_shape.get(shape)
        pair = self._cuda.begin() if self._cuda is not None else None
        began_ns = time.perf_counter_ns()
        if flops is None:
            if len(self._flops_by_shape) >= SHAPES_MAX:
                raise MeteringError(f"lease {self._lease_id}: more than {SHAPES_MAX} input shapes")
            flops = self._flop_counter(self._workload, batch)
            self._flops_by_shape[shape] = flops
        else:
            self._workload.run(batch)
        self._step_ns += time.perf_counter_ns() - began_ns
        if pair is not None:
            assert self._cuda is not None
            self._cuda.end(pair)
        self._steps += 1
        self._samples += batch.samples
        self._tokens += batch.tokens
        self._flops += flops

    def close_interval(self) -> UsageReport:
        """Close the open interval into an (unsigned) usage report and open the next."""
        assert self._opened_ns is not None and self._opened_at is not None, "not started"
        if self._sequence_next > SEQUENCE_MAX:
            raise MeteringError(f"lease {self._lease_id}: sequence numbers are exhausted")
        device_ns = self._cuda.close() if self._cuda is not None else self._step_ns
        closed_ns = time.perf_counter_ns()
        closed_at = max(self._clock(), self._opened_at)
        wall_us = (closed_ns - self._opened_ns) // NS_PER_US
        device_us = device_ns // NS_PER_US
        if self._cuda is None:
            assert device_us <= wall_us, "CPU steps lie inside their interval"
        else:
            # The events are timed by the GPU's clock, the interval by the host's: they may
            # disagree by a few microseconds; the device cannot be busier than the interval.
            device_us = min(device_us, wall_us)
        report = UsageReport(
            lease_id=self._lease_id,
            node_id=self._node_id,
            sequence=self._sequence_next,
            interval_start=self._opened_at,
            interval_end=closed_at,
            gpu_count=self._gpu_count,
            wall_time_us=wall_us,
            device_time_us=device_us,
            flops=self._flops,
            samples=self._samples,
            tokens=self._tokens,
            steps=self._steps,
            peak_memory_bytes=self._peak_memory_bytes(),
            workload=self._workload.name[:TEXT_LENGTH_MAX],
            device=self._device_name,
        )
        self._sequence_next += 1
        self._open(closed_ns, closed_at)
        return report

    def _peak_memory_bytes(self) -> int:
        if self._device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self._device))
        return process_peak_rss_bytes()
