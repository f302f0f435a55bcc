"""The `aether` CLI as a user drives it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def aether(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def cli_env(database_url: str, schema: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "POSTGRES_SCHEMA": schema,
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }


def test_the_demo_settles_a_lease_and_prints_a_balanced_trial_balance(cli_env, tmp_path) -> None:
    run = aether("demo", env=cli_env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "rejected: exceeds_credits" in out
    assert "trial balance AETH: debits 1,600 = credits 1,600  (pending 0 = 0)  BALANCED" in out
    assert "provider gpu-farm        provider_earnings                   0              285" in out
    assert (
        "retry the refused withdrawal, now that 700 AETH are free       rejected: exceeds_credits"
        in out
    )
    assert "alice: balance 700 AETH, available 700 AETH; log position 22" in out


def test_running_the_demo_twice_moves_no_money_twice(cli_env, tmp_path) -> None:
    first = aether("demo", env=cli_env, cwd=tmp_path)
    second = aether("demo", env=cli_env, cwd=tmp_path)
    assert first.returncode == second.returncode == 0, second.stderr
    assert first.stdout == second.stdout  # same results, same balances, same log position


def test_trial_balance_as_of_an_earlier_position_shows_the_ledger_as_it_stood(
    cli_env, tmp_path
) -> None:
    assert aether("demo", env=cli_env, cwd=tmp_path).returncode == 0
    # Positions 1-7: six accounts and their batch record; 8: the deposit.
    run = aether("trial-balance", "--as-of-position", "8", env=cli_env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "debits 1,000 = credits 1,000" in run.stdout
    assert "BALANCED" in run.stdout


def test_trial_balance_as_of_a_time_before_anything_happened_is_empty_and_balanced(
    cli_env, tmp_path
) -> None:
    assert aether("demo", env=cli_env, cwd=tmp_path).returncode == 0
    run = aether(
        "trial-balance", "--as-of-time", "2000-01-01T00:00:00+00:00", env=cli_env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert "trial balance" not in run.stdout  # no account existed yet
    now = aether(
        "trial-balance", "--as-of-time", "2999-01-01T00:00:00+00:00", env=cli_env, cwd=tmp_path
    )
    assert "debits 1,600 = credits 1,600" in now.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--as-of-position", "-3"], "a log position is >= 0"),
        (["--as-of-position", "ten"], "not a log position"),
        (["--as-of-time", "yesterday"], "not an ISO 8601 time"),
        (["--as-of-time", "2026-01-01T00:00:00"], "give the time with its offset"),
    ],
)
def test_bad_as_of_arguments_are_refused_with_a_clear_message(
    cli_env, tmp_path, args, message
) -> None:
    run = aether("trial-balance", *args, env=cli_env, cwd=tmp_path)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_an_invalid_database_url_is_a_clear_configuration_error(tmp_path) -> None:
    run = aether("demo", env={"DATABASE_URL": "postgresql://x@/db?nonsense=1"}, cwd=tmp_path)
    assert run.returncode == 2
    assert "DATABASE_URL is not a valid libpq URL" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_unreachable_database_is_reported_without_a_traceback(tmp_path) -> None:
    run = aether(
        "demo", env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test"}, cwd=tmp_path
    )
    assert run.returncode == 1
    assert "cannot reach PostgreSQL" in run.stderr
    assert "Traceback" not in run.stderr
