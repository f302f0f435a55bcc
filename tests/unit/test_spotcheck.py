"""Spot checks: genuine metered reports pass, inflated FLOPs fail the window for fraud,
unknown workloads are unverifiable (never a failure), the sample is deterministic."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import torch

from domain.verdicts import VerdictRules
from workers.checker import Checker, CheckerRules, Observations, judge
from workers.messages import UsageReport
from workers.metering import Meter
from workers.spotcheck import SpotChecker, SpotResult
from workers.workloads import WorkloadKind, WorkloadSize, make_workload

CPU = torch.device("cpu")
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=10)
        return self.now


def genuine_reports(kind: WorkloadKind, steps: list[int]) -> list[UsageReport]:
    workload = make_workload(kind, seed=3, size=WorkloadSize.small, device=CPU)
    meter = Meter(uuid.uuid4(), uuid.uuid4(), workload, 1, Clock())
    meter.start()
    reports = []
    for n in steps:
        for _ in range(n):
            meter.step()
        reports.append(meter.close_interval())
    return reports


@pytest.mark.parametrize("kind", list(WorkloadKind))
def test_genuine_reports_pass_and_inflated_flops_are_a_mismatch(kind: WorkloadKind) -> None:
    spot = SpotChecker(sample_ppm=1_000_000)
    reports = genuine_reports(kind, [3, 1, 0])
    for report in reports:
        assert spot.check(report).result is SpotResult.ok, report
    inflated = reports[0].model_copy(update={"flops": reports[0].flops * 2})
    found = spot.check(inflated)
    assert found.result is SpotResult.mismatch
    assert found.expected_flops == reports[0].flops
    fewer_steps = reports[0].model_copy(update={"steps": reports[0].steps - 1})
    assert spot.check(fewer_steps).result is SpotResult.mismatch


def test_an_unknown_workload_is_unverifiable() -> None:
    spot = SpotChecker(sample_ppm=1_000_000)
    report = genuine_reports(WorkloadKind.train, [1])[0].model_copy(
        update={"workload": "train/resnet-50"}
    )
    assert spot.check(report).result is SpotResult.unverifiable
    assert spot.checked == 0


def test_the_sample_is_deterministic_and_follows_the_rate() -> None:
    base = genuine_reports(WorkloadKind.infer, [1])[0]
    reports = [base.model_copy(update={"sequence": n}) for n in range(1, 2_001)]
    tenth = SpotChecker(sample_ppm=100_000)
    picked = [r.sequence for r in reports if tenth.sampled(r)]
    assert picked == [r.sequence for r in reports if SpotChecker(100_000).sampled(r)]
    assert 120 <= len(picked) <= 280
    assert not any(SpotChecker(sample_ppm=0).sampled(r) for r in reports)
    with pytest.raises(ValueError, match="sample_ppm"):
        SpotChecker(sample_ppm=1_000_001)


def test_a_checker_fails_the_window_for_fraud_on_a_mismatch() -> None:
    rules = VerdictRules()
    report = genuine_reports(WorkloadKind.train, [2])[0]
    node_id, provider_id = report.node_id, uuid.uuid4()
    checker = Checker(
        uuid.uuid4(),
        {node_id: provider_id},
        "127.0.0.1:9",
        verdict_rules=rules,
        spot_checker=SpotChecker(sample_ppm=1_000_000),
    )
    checker.observe("usage", report, 0)
    (seen,) = checker.open.values()
    assert (seen.spot_checked, seen.spot_mismatches) == (1, [])
    checker.observe("usage", report.model_copy(update={"sequence": 2, "flops": 1}), 0)
    assert seen.spot_mismatches == [f"{report.lease_id}:2"]
    loud = Observations(node_id, provider_id, seen.window_start, heartbeats=10_000)
    loud.spot_mismatches = list(seen.spot_mismatches)
    verdict = judge(loud, checker.checker_id, CheckerRules(), rules)
    assert (verdict.passed, verdict.failure_kind) == (False, "fraud")
    clean = Observations(node_id, provider_id, seen.window_start, heartbeats=10_000)
    assert judge(clean, checker.checker_id, CheckerRules(), rules).passed


def test_steps_and_tokens_no_mix_of_shapes_gives_are_a_mismatch() -> None:
    spot = SpotChecker(sample_ppm=1_000_000)
    report = genuine_reports(WorkloadKind.infer, [4])[0]
    odd = report.model_copy(update={"tokens": report.tokens + 1})
    assert spot.check(odd).result is SpotResult.mismatch
