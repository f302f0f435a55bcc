"""Spot checks: a checker re-runs a sample of the reported work and compares.

A usage report names its workload (`train/encoder-32x1`, `infer/encoder-512x2`) and claims
`steps` steps, `tokens` tokens and `flops` FLOPs. The GPU worker counts a step's FLOPs once
per input shape (`workers.metering.count_flops`, torch's FlopCounterMode) and adds them up
per step. The spot checker rebuilds the named workload (same kind and size, on the CPU:
FLOPs depend on the shapes, not the device), runs one step of each input shape it feeds
(training: one shape; inference: full and half sequence length) under the FLOP counter, and
works out how many steps of each shape the report's steps and tokens imply (one shape: all
of them; two shapes: the only solution of n1 + n2 = steps, n1 t1 + n2 t2 = tokens); the
report's FLOPs must then be exactly n1 f1 + n2 f2. A report that claims more (or other) work than its
steps did is a mismatch: the checker's verdict for that node-window fails with kind
`fraud`. A workload name the checker does not know cannot be checked: counted as
unverifiable, never as a failure.

Which reports: a deterministic sample, ``sha256(lease id, sequence) < rate``, so every
checker (and a re-run) picks the same reports, and a node cannot tell which of its reports
will be re-run before it sends them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum

import torch

from workers.messages import UsageReport
from workers.metering import count_flops
from workers.workloads import DATA_POOL_BATCHES, WorkloadKind, WorkloadSize, make_workload

SAMPLE_PPM_DEFAULT = 100_000
"""One report in ten."""
PPM = 1_000_000
IMPOSSIBLE = -1
"""`expected_flops` of a report whose steps and tokens no mix of the workload's shapes gives."""


class SpotResult(Enum):
    ok = "ok"
    mismatch = "mismatch"
    unverifiable = "unverifiable"


@dataclass(frozen=True, slots=True)
class SpotCheck:
    result: SpotResult
    expected_flops: int | None
    reported_flops: int


class SpotChecker:
    """Re-runs one step of a sampled report's workload (see the module docstring)."""

    def __init__(self, sample_ppm: int = SAMPLE_PPM_DEFAULT) -> None:
        if not 0 <= sample_ppm <= PPM:
            raise ValueError(f"sample_ppm is 0..{PPM}, got {sample_ppm}")
        self.sample_ppm = sample_ppm
        self._shapes: dict[str, list[tuple[int, int]]] | None = None
        """Workload name -> (tokens, FLOPs) of one step of each input shape it feeds."""
        self.checked = 0
        self.mismatches = 0

    def sampled(self, report: UsageReport) -> bool:
        digest = hashlib.sha256(f"{report.lease_id}:{report.sequence}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % PPM < self.sample_ppm

    def shapes(self, workload: str) -> list[tuple[int, int]] | None:
        """(tokens, FLOPs) of one step per input shape of the named workload, re-run here;
        None when the name is unknown."""
        if self._shapes is None:
            self._shapes = {}
            for kind in WorkloadKind:
                for size in WorkloadSize:
                    name = make_workload(kind, seed=0, size=size, device=torch.device("cpu")).name
                    self._shapes.setdefault(name, [])
        known = self._shapes
        if workload not in known:
            return None
        if not known[workload]:
            for kind in WorkloadKind:
                for size in WorkloadSize:
                    w = make_workload(kind, seed=0, size=size, device=torch.device("cpu"))
                    if w.name != workload:
                        continue
                    seen: dict[tuple[int, ...], tuple[int, int]] = {}
                    for _ in range(DATA_POOL_BATCHES):
                        batch = w.next_batch()
                        if batch.shape_key not in seen:
                            seen[batch.shape_key] = (batch.tokens, count_flops(w, batch))
                    known[workload] = sorted(seen.values())
        return known[workload]

    def expected_flops(self, report: UsageReport) -> int | None:
        """The FLOPs the report's steps and tokens imply; None when it cannot be told."""
        shapes = self.shapes(report.workload)
        if not shapes:
            return None
        if len(shapes) == 1:
            return report.steps * shapes[0][1]
        if len(shapes) != 2:
            return None
        (t1, f1), (t2, f2) = shapes
        if t1 == t2:
            return None
        # n1 + n2 = steps, n1 t1 + n2 t2 = tokens  =>  n2 = (tokens - steps t1) / (t2 - t1)
        n2, rest = divmod(report.tokens - report.steps * t1, t2 - t1)
        n1 = report.steps - n2
        if rest or n1 < 0 or n2 < 0:
            return IMPOSSIBLE
        return n1 * f1 + n2 * f2

    def check(self, report: UsageReport) -> SpotCheck:
        expected = self.expected_flops(report)
        if expected is None:
            return SpotCheck(SpotResult.unverifiable, None, report.flops)
        self.checked += 1
        if report.flops != expected:
            self.mismatches += 1
            return SpotCheck(SpotResult.mismatch, expected, report.flops)
        return SpotCheck(SpotResult.ok, expected, report.flops)
