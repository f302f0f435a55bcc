"""The `aether` CLI as a user drives it."""

from __future__ import annotations

import os
import re
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


TRIAL_BALANCE = (
    "trial balance AETH: debits 1,212.612500000000000011 = credits 1,212.612500000000000011"
    "  (pending 0 = 0)  BALANCED"
)


def test_the_demo_runs_a_market_from_stake_to_slash_and_prints_balanced_books(
    cli_env, tmp_path
) -> None:
    run = aether("demo", env=cli_env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "an ask by an unregistered provider is refused: provider_not_found" in out
    assert "-> lease with borealis at 2 AETH, 8 AETH in lease escrow" in out
    assert "-> rests in the book (no ask at or below its price)" in out
    assert "bob bids beyond his funds: refused (insufficient_funds), nothing recorded" in out
    assert "downtime detected on alice's lease (no heartbeat for over 15 s): True" in out
    assert (
        "quorum failed for borealis-1 (2 of 3 checkers): slashed 66.666666666666666666 AETH" in out
    )
    assert "alice refunded 1 AETH out of the slash" in out
    assert "marten, contradicted by the quorum, loses 1 AETH of its stake" in out
    assert TRIAL_BALANCE in out


def test_the_demo_settles_two_epochs_posts_the_roots_and_a_provider_claims_on_chain(
    cli_env, tmp_path
) -> None:
    run = aether("demo", env=cli_env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    # Bonds and deposits go through the chain; the watcher credits them in the ledger.
    assert "atlas's bond credited: 400 AETH" in out
    assert "alice deposits 100 AETH into the vault, credited by the watcher" in out
    assert (
        "the slash mirror sends the slash to Staking (1 transaction): borealis's stake on "
        "chain is 133.333333333333333334 AETH, as in the ledger" in out
    )
    # Epoch 2993400 is 2026-11-30 12:00-12:10 (10-minute epochs since 1970).
    assert (
        "epoch 2993400 (12:00-12:10): 14 usage records of 2 leases, charged "
        "0.708333333333333338 AETH (withheld 0.333333333333333335 AETH), fee 0.01875 AETH, "
        "checker rewards 0 AETH, provider share 0.356250000000000003 AETH, drawn "
        "0.708333333333333338 AETH" in out
    )
    assert (
        "epoch 2993401 (12:10-12:20): 10 usage records of 1 lease, charged "
        "0.41666666666666667 AETH (withheld 0 AETH), fee 0.020833333333333333 AETH, checker "
        "rewards 0.002083333333333332 AETH" in out
    )
    assert len(re.findall(r"new\): posted \(tx 0x[0-9a-f]{10}\.\.\.\)", out)) == 2
    assert "epoch 2993400 settled again (a re-run): 2 commands, 2 answered as retries" in out
    assert "7.666666666666666665 AETH of escrow released to her" in out
    assert "atlas claims epoch 2993401 on chain: cumulative 0.75208333333333334 AETH" in out
    assert "the distributor pays it 0.75208333333333334 AETH" in out
    assert "atlas's earnings in the ledger now 0 AETH" in out
    assert (
        "claim on chain: atlas, epoch 2993401, cumulative 0.75208333333333334 AETH, paid "
        "0.75208333333333334 AETH" in out
    )
    report = out[out.index("reconciliation of epoch 2993401") :]
    assert "MISMATCH" not in report
    assert re.search(
        r"claimed\s+atlas\s+0\.75208333333333334\s+-\s+0\.75208333333333334\s+ok", report
    )
    assert "epoch 2993401: 16 lines, all tie out" in report
    earnings = out[out.index("provider earnings (AETH)") : out.index("audit: the logs")]
    assert re.search(
        r"atlas\s+0\.75208333333333334\s+0\s+0\.75208333333333334\s+0\.75208333333333334\s+"
        r"0\.75208333333333334",
        earnings,
    )
    assert re.search(r"borealis\s+0\s+0\.333333333333333335\s", earnings)
    audit = out[out.index("audit: the logs hash-chained") :]
    assert re.search(
        r"verify: clean: \d+ events recomputed against the hash chain, \d+ "
        r"checkpoints, \d+ roots anchored in CheckpointAnchor",
        audit,
    )
    assert re.search(
        r"prove ledger event 1: in checkpoint 0, \d+ sibling hashes; checked "
        r"against the anchored root 0x[0-9a-f]{16}\.\.\.: accepted",
        audit,
    )


def test_the_demos_live_part_runs_gpu_workers_ingest_and_a_checker_through_the_broker(
    cli_env, tmp_path
) -> None:
    run = aether("demo", env=cli_env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "it fills bob's resting bid, a lease opens now" in out
    done = re.search(
        r"worker done: ([\d,]+) training steps, (\d+) usage reports, (\d+) heartbeats", out
    )
    assert done is not None, out
    steps, reports, beats = (int(g.replace(",", "")) for g in done.groups())
    assert steps > 0 and reports >= 2 and beats >= 2
    inference = re.search(
        r"worker done: ([\d,]+) inference steps, (\d+) usage reports, (\d+) heartbeats", out
    )
    assert inference is not None, out
    infer_reports, infer_beats = int(inference.group(2)), int(inference.group(3))
    # Every report each worker sent is recorded, once; every heartbeat reached its lease.
    assert (
        f"ingest recorded {reports} of {reports} usage reports of the train/encoder-32x1 lease"
        in out
    )
    assert (
        f"ingest recorded {infer_reports} of {infer_reports} usage reports of the "
        "infer/encoder-32x1 lease" in out
    )
    assert f"heartbeats recorded on that lease: {beats} (of {beats} sent)" in out
    assert f"heartbeats recorded on that lease: {infer_beats} (of {infer_beats} sent)" in out
    assert (
        "dead-lettered with their reasons: malformed 1, replayed 1, signature_invalid 1, "
        "unsigned 1" in out
    )
    assert re.search(r"the checker saw \d+ heartbeats of the nodes", out)
    assert re.search(
        r"spot checks: the checker re-ran [1-9]\d* of the nodes' usage reports .*: every "
        r"one's FLOPs match its steps",
        out,
    )
    assert "lease bob/cirrus-2       open        1        2.2" in out
    assert "lease bob/cirrus         open        2        4.4" in out


def test_running_the_demo_twice_records_nothing_twice(cli_env, tmp_path) -> None:
    first = aether("demo", env=cli_env, cwd=tmp_path)
    second = aether("demo", env=cli_env, cwd=tmp_path)
    assert first.returncode == second.returncode == 0, second.stderr
    assert "this database has seen the demo before" in second.stdout
    assert (
        "620 of 620 commands were answered as retries; 27 usage records were stored already; "
        "nothing was recorded twice" in second.stdout
    )
    tables = first.stdout[first.stdout.index("order book H100") :]
    # The same book, leases, reputation, balances, settlement log, claim and reconciliation:
    # the rerun's chain is new, and its roots are posted again from the settlement log.
    assert tables in second.stdout
    assert "epoch 2993401: 16 lines, all tie out" in second.stdout


def test_trial_balance_as_of_an_earlier_position_shows_the_ledger_as_it_stood(
    cli_env, tmp_path
) -> None:
    assert aether("demo", env=cli_env, cwd=tmp_path).returncode == 0
    # Positions 1-4: the protocol's three accounts and their batch; 5-8 and 9-12: atlas's
    # and borealis's three accounts; 13-14: atlas's bond on chain, credited by the watcher,
    # 400 AETH (the transfer and its batch).
    run = aether("trial-balance", "--as-of-position", "14", env=cli_env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "debits 400 = credits 400" in run.stdout
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
    assert TRIAL_BALANCE in now.stdout


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


def test_project_brings_every_view_up_to_date_once(cli_env, tmp_path) -> None:
    first = aether("project", env=cli_env, cwd=tmp_path)  # an empty market: the protocol's accounts
    assert first.returncode == 0, first.stderr
    assert aether("demo", env=cli_env, cwd=tmp_path).returncode == 0
    run = aether("project", env=cli_env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()[1:]}
    assert set(lines) == {
        "balances",
        "orderbook",
        "providers",
        "leases",
        "reputation",
        "earnings",
        "earnings_settlement",
        "earnings_usage",
    }
    # The demo caught the views up itself: nothing is applied twice.
    assert all(values[0] == "0" for values in lines.values())
    assert lines["orderbook"][1] == lines["leases"][1] == lines["reputation"][1] != "0"
