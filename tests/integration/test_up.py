"""`aether up` against the real PostgreSQL and the session broker: the children come up,
a killed child is restarted, SIGTERM stops everything, a supervisor killed with SIGKILL
leaves no orphans, and a configuration it cannot run is refused before anything starts."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ledger.config import Settings
from workers.up import Service, UpConfigError, plan

ROOT = Path(__file__).parents[2]
WAIT_S_MAX = 120.0
"""Bound on every wait (children import the whole service on 2 shared cores): a hang
fails the test instead of blocking the suite. No test asserts how long anything took."""


class Up:
    """`aether -v up ...` as a child process, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "-v", "up", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, pattern: str, *, after: int = 0) -> tuple[int, re.Match[str]]:
        """The first line at index >= `after` matching `pattern` (its index and match)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + WAIT_S_MAX
        with self.changed:
            while True:
                for i in range(after, len(self.lines)):
                    found = regex.search(self.lines[i])
                    if found:
                        return i, found
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self.reader.is_alive()):
                    output = "\n".join(self.lines)
                    pytest.fail(f"no line matching {pattern!r}; output:\n{output}")
                self.changed.wait(timeout=min(left, 1.0))

    def output(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + WAIT_S_MAX
    while alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} ({' '.join(command_line(pid))}) still running")
        time.sleep(0.2)


@pytest.fixture
def up_env(database_url: str, schema: str, kafka_bootstrap: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHAIN_", "ETH_", "POSTGRES_", "KAFKA_", "DATABASE_"))
    }
    env.update(
        DATABASE_URL=database_url,
        POSTGRES_SCHEMA=schema,
        POSTGRES_POOL_SIZE="2",
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
    )
    return env


@pytest.fixture
def start_up(up_env: dict[str, str]) -> Iterator[Callable[[list[str]], Up]]:
    started: list[Up] = []

    def start(args: list[str]) -> Up:
        up = Up(args, up_env)
        started.append(up)
        return up

    yield start
    for up in started:
        up.close()


@pytest.mark.slow
def test_up_starts_the_children_restarts_a_killed_one_and_stops_all_on_sigterm(
    start_up,
) -> None:
    up = start_up(["--only", "relay,project", "--stop-timeout-s", "30"])
    _, relay = up.wait_for(r"^up +\| .*started relay \(pid (\d+)\): aether worker relay$")
    _, project = up.wait_for(r"^up +\| .*started project \(pid (\d+)\): aether project --follow$")
    relay_pid, project_pid = int(relay[1]), int(project[1])
    # the relay reached PostgreSQL and the broker: its own log line, forwarded with its name
    seen, _ = up.wait_for(r"^relay +\| .*relay: publishing the ledger")
    for pid, words in ((relay_pid, ["worker", "relay"]), (project_pid, ["project", "--follow"])):
        assert alive(pid)
        assert parent_of(pid) == up.process.pid
        assert command_line(pid)[-len(words) :] == words
    assert "chain" not in up.output()  # --only leaves the chain watcher out

    os.kill(relay_pid, signal.SIGKILL)
    up.wait_for(rf"^up +\| .*relay \(pid {relay_pid}\) was killed by SIGKILL after .*restarting in")
    at, again = up.wait_for(r"^up +\| .*started relay \(pid (\d+)\)", after=seen + 1)
    new_relay_pid = int(again[1])
    assert new_relay_pid != relay_pid
    up.wait_for(r"^relay +\| .*relay: publishing the ledger", after=at + 1)
    assert alive(project_pid), "the other child is left alone"

    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=WAIT_S_MAX) == 0, up.output()
    up.reader.join(timeout=WAIT_S_MAX)
    out = up.output()
    assert "SIGTERM: stopping every service" in out
    assert f"stopped relay (pid {new_relay_pid}): exited with code 0" in out
    assert f"stopped project (pid {project_pid}): exited with code 0" in out
    assert "SIGKILL" not in out.split("SIGTERM: stopping every service")[1]
    # project --follow, interrupted, prints where each view stands
    assert re.search(r"^project +\| balances ", out, re.MULTILINE), out
    assert not alive(new_relay_pid) and not alive(project_pid)


@pytest.mark.slow
def test_children_stop_themselves_when_the_supervisor_is_killed(start_up) -> None:
    up = start_up(["--only", "relay"])
    _, relay = up.wait_for(r"^up +\| .*started relay \(pid (\d+)\)")
    up.wait_for(r"^relay +\| .*relay: publishing the ledger")
    up.process.kill()
    up.process.wait()
    wait_gone(int(relay[1]))


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--only", "relay,nope"], {}, "unknown service nope"),
        (["--only", ""], {}, "unknown service (none given)"),
        (["--only", "chain"], {}, "the chain watcher needs ETH_RPC_URL"),
        (["--only", "checker"], {}, "give --checker-id UUID"),
        (["--checker-id", "not-a-uuid"], {}, "not a UUID: 'not-a-uuid'"),
        (["--only", "relay", "--checker-id", str(uuid.uuid4())], {}, "leaves checker out"),
        (["--stop-timeout-s", "0"], {}, "--stop-timeout-s must be > 0"),
        ([], {"KAFKA_BOOTSTRAP_SERVERS": "kafka"}, "is not host:port"),
        ([], {"DATABASE_URL": "postgresql://[bad"}, "DATABASE_URL is not a valid libpq URL"),
        (
            [],
            {"ETH_RPC_URL": "http://127.0.0.1:8545"},
            "ETH_RPC_URL is set; also set CHAIN_TOKEN_ADDRESS, CHAIN_STAKING_ADDRESS",
        ),
    ],
)
def test_a_configuration_up_cannot_run_is_refused_with_the_reason(args, env, message) -> None:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHAIN_", "ETH_", "POSTGRES_", "KAFKA_", "DATABASE_"))
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "up", *args],
        cwd=ROOT,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=WAIT_S_MAX)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # with an embedded broker it started
        process.communicate()
        pytest.fail(f"aether up {args} with {env} started instead of refusing")
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert done.returncode == 2, done
    assert message in done.stderr, done.stderr
    assert "started" not in done.stdout


def test_the_plan_leaves_out_what_cannot_run_and_says_why() -> None:
    services, notes = plan(
        Settings(eth_rpc_url=None), only=None, checker_ids=[], commands={"worker", "project"}
    )
    assert [s.name for s in services] == ["ingest", "relay", "settle", "project"]
    assert notes == [
        "chain watcher not started: ETH_RPC_URL is unset",
        "api not started: this aether has no `api` command (workers/api.py)",
        "no checker started: give --checker-id UUID to run one",
    ]
    checker = uuid.uuid4()
    services, notes = plan(
        Settings(eth_rpc_url=None),
        only=["checker", "api"],
        checker_ids=[checker, checker],
        commands={"api", "worker"},
    )
    assert services == [
        Service("api", "aether", ("api",)),
        Service(
            f"checker-{str(checker)[:8]}",
            "aether",
            ("worker", "checker", "--checker-id", str(checker)),
        ),
    ]
    assert notes == []
    with pytest.raises(UpConfigError, match="no service left to run"):
        plan(Settings(eth_rpc_url=None), only=["api"], checker_ids=[], commands=set())
