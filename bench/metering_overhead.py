"""Metering overhead: a training step with and without the meter, in the same run.

One `TrainingWorkload` (a transformer encoder classifier with AdamW: `large` is two
512-wide blocks, about 10 M parameters, batch 64 of 256 tokens; `small` is a tiny one whose
CPU step takes a few milliseconds) runs blocks of steps, alternately bare
(`next_batch()` + `run()`) and through `workers.metering.Meter.step()`, on the same model
and batches. The blocks are interleaved A-B-B-A so drift (clocks, caches, thermals) falls
on both sides alike; each metered block ends with `close_interval()` (on CUDA: the single
synchronize and the event reads), far more often than a worker closes one, so the figure is
an upper bound. On CUDA the bench synchronizes at each block's edges to time it; the
meter itself never synchronizes per step. Warm-up steps run first (the meter's first step
of a shape runs under FlopCounterMode and is left out of the timing).

Figures per step: the median over rounds of each block's mean step time, the trimmed
mean (middle half), and the median of the per-round paired ratios; and, noise-free, the
meter's own work per step timed around a no-op workload. No timing is asserted. On a busy
CPU the block-to-block noise (several %) exceeds the meter's cost, so the CPU figure can
come out negative; the GPU figure is the one the design's < 1% target is about.

Last line: RESULT device=<cpu|cuda device name, spaces as _> step_ms=<median bare>
metered_step_ms=<median metered> overhead_pct=<100 x (metered - bare) / bare, of the medians>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.metering import Meter, device_name
from workers.workloads import (
    Batch,
    TrainingWorkload,
    WorkloadSize,
    default_device,
    default_size,
)

ROUNDS_DEFAULT = {WorkloadSize.small: 100, WorkloadSize.large: 30}
STEPS_PER_ROUND_DEFAULT = {WorkloadSize.small: 20, WorkloadSize.large: 20}
WARMUP_STEPS = 10
NOOP_STEPS = 20_000
"""Steps of a no-op workload that time the meter's own bookkeeping."""
SEED = 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trimmed_mean(values: list[float]) -> float:
    ordered = sorted(values)
    quarter = len(ordered) // 4
    middle = ordered[quarter : len(ordered) - quarter] or ordered
    return statistics.fmean(middle)


def time_block(device: torch.device, steps: int, step: Callable[[], None]) -> float:
    """Mean ms per step over a block of `steps`, the device drained at both edges."""
    synchronize(device)
    began = time.perf_counter_ns()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter_ns() - began) / steps / 1e6


class NoopWorkload:
    """Steps that do nothing, on the bench's device: what is left is the meter's cost."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.name = "noop"
        self._batch = Batch(inputs=torch.zeros(1, device=device), targets=None, samples=1, tokens=1)

    def next_batch(self) -> Batch:
        return self._batch

    def run(self, batch: Batch) -> None:
        pass


def meter_bookkeeping_us(device: torch.device) -> float:
    """Mean microseconds one `Meter.step()` adds around a step (events included on CUDA)."""
    workload = NoopWorkload(device)
    meter = Meter(uuid.uuid4(), uuid.uuid4(), workload, gpu_count=1)
    meter.start()
    meter.step()  # the FLOP count of its one shape
    began = time.perf_counter_ns()
    for _ in range(NOOP_STEPS):
        meter.step()
    meter.close_interval()
    return (time.perf_counter_ns() - began) / NOOP_STEPS / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=[s.value for s in WorkloadSize], default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps-per-round", type=int, default=None)
    args = parser.parse_args()

    device = default_device()
    size = WorkloadSize(args.size) if args.size else default_size(device)
    steps_per_round: int = args.steps_per_round or STEPS_PER_ROUND_DEFAULT[size]
    rounds: int = args.rounds or ROUNDS_DEFAULT[size]
    workload = TrainingWorkload(size, SEED, device)
    meter = Meter(uuid.uuid4(), uuid.uuid4(), workload, gpu_count=1)
    parameters = sum(p.numel() for p in workload.model.parameters())
    name = device_name(device)
    print(
        f"device {name}, workload {workload.name} ({size.value}, {parameters:,} parameters), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )

    def bare_step() -> None:
        workload.run(workload.next_batch())

    meter.start()
    for _ in range(WARMUP_STEPS):
        bare_step()
        meter.step()
    meter.close_interval()
    synchronize(device)

    bare_ms: list[float] = []
    metered_ms: list[float] = []
    steps_metered = flops = device_time_us = metered_ns = 0
    for round_ in range(rounds):
        order = ("bare", "metered") if round_ % 2 == 0 else ("metered", "bare")
        for kind in order:
            if kind == "bare":
                bare_ms.append(time_block(device, steps_per_round, bare_step))
                continue
            synchronize(device)
            began = time.perf_counter_ns()
            for _ in range(steps_per_round):
                meter.step()
            report = meter.close_interval()
            synchronize(device)
            elapsed_ns = time.perf_counter_ns() - began
            metered_ms.append(elapsed_ns / steps_per_round / 1e6)
            metered_ns += elapsed_ns
            steps_metered += report.steps
            flops += report.flops
            device_time_us += report.device_time_us

    bare_median = statistics.median(bare_ms)
    metered_median = statistics.median(metered_ms)
    overhead_pct = 100 * (metered_median - bare_median) / bare_median
    paired_pct = statistics.median(
        100 * (m - b) / b for m, b in zip(metered_ms, bare_ms, strict=True)
    )
    print(f"{rounds} rounds x {steps_per_round} steps each way, interleaved A-B-B-A")
    print(f"bare step:    median {bare_median:.3f} ms, trimmed mean {trimmed_mean(bare_ms):.3f} ms")
    print(
        f"metered step: median {metered_median:.3f} ms, "
        f"trimmed mean {trimmed_mean(metered_ms):.3f} ms"
    )
    print(f"overhead: {overhead_pct:+.2f}% of the medians, {paired_pct:+.2f}% median paired")
    if steps_metered:
        print(
            f"the meter saw {steps_metered} steps, {flops // steps_metered:,} FLOPs per step, "
            f"device busy {100 * device_time_us * 1_000 / max(metered_ns, 1):.1f}% of the "
            "metered blocks' wall time, "
            f"{flops / max(device_time_us, 1) / 1e6:.3f} TFLOP/s of device time"
        )
    bookkeeping_us = meter_bookkeeping_us(device)
    print(
        f"the meter's own work per step (no-op workload): {bookkeeping_us:.2f} us, "
        f"{100 * bookkeeping_us / 1_000 / bare_median:.3f}% of the bare step"
    )
    print(
        f"RESULT device={name.replace(' ', '_')} step_ms={bare_median:.3f} "
        f"metered_step_ms={metered_median:.3f} overhead_pct={overhead_pct:.2f}"
    )


if __name__ == "__main__":
    main()
