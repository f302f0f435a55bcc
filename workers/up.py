"""`aether up`: every service process of one deployment, supervised, in one command.

The supervisor starts each service as a child process (`aether worker ingest`, `aether
worker relay`, `aether worker settle --follow`, `aether project --follow`, `aether api`, the
chain watcher ``python -m workers.chain`` when ``ETH_RPC_URL`` is set, and one `aether worker
checker --checker-id ID` per ``--checker-id``), against the configured PostgreSQL, Kafka and
RPC node. Left unset, ``DATABASE_URL`` and ``KAFKA_BOOTSTRAP_SERVERS`` mean the embedded
default, started ONCE here (a private PostgreSQL in ``AETHER_DATA_DIR`` and a private
Kafka-protocol broker on loopback) and handed to every child, so they all share one store
and one broker. The chain watcher needs ``ETH_RPC_URL``: an in-process chain would be
private to one process.

- Every line a child writes (stdout and stderr) is forwarded to stdout with the child's
  name in front (``relay    | ...``); the supervisor's own lines carry ``up``.
- A child that exits while the supervisor runs is restarted after a pause that starts at
  RESTART_PAUSE_S_MIN and doubles on each quick exit up to RESTART_PAUSE_S_MAX (a child that
  ran STABLE_RUN_S or longer starts again from the minimum); each exit and restart is one
  log line with the exit code or signal.
- SIGINT or SIGTERM stop the supervisor: every child gets SIGTERM (which each child takes
  as an interrupt: the workers finish what they do and leave), and SIGKILL after
  ``--stop-timeout-s``; then the embedded store and broker stop. Exit code 0.
- Children run in their own session (a Ctrl-C in the terminal reaches the supervisor only,
  which stops them in order) and stop themselves when the supervisor disappears (a kill -9
  of the supervisor leaves no orphans).
- A configuration ``aether up`` cannot run is refused before anything starts, exit code 2,
  with the reason (an unknown service, the chain watcher without ``ETH_RPC_URL``, a checker
  without ``--checker-id``, ``ETH_RPC_URL`` without the CHAIN_*_ADDRESS settings).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any
from uuid import UUID

from ledger.config import Settings

RESTART_PAUSE_S_MIN = 1.0
"""Pause before the first restart of a child that exited."""
RESTART_PAUSE_S_MAX = 30.0
"""Longest pause between two restarts of a child that keeps exiting."""
STABLE_RUN_S = 60.0
"""A child that ran this long before it exited is restarted after RESTART_PAUSE_S_MIN."""
STOP_TIMEOUT_S_DEFAULT = 15.0
"""How long the children have, after SIGTERM, before they get SIGKILL."""
POLL_INTERVAL_S = 0.2
"""How often the supervisor looks at its children."""
PARENT_CHECK_INTERVAL_S = 1.0
"""How often a child checks that its supervisor is still there."""
LINE_CHARS_MAX = 8_192
"""A child's log line is cut at this length when forwarded."""
NAME_WIDTH = 8

SERVICES = ("ingest", "relay", "settle", "project", "chain", "api", "checker")
"""The services `--only` can name, in start order. Without `--only` all of them run (the
chain watcher only with ETH_RPC_URL, checkers only with --checker-id, the api only when
this `aether` has the `api` command), each left out with a log line."""


@dataclass(frozen=True, slots=True)
class Service:
    """One supervised child: its name and the command line after ``aether`` (or, for the
    chain watcher, the arguments of ``python -m workers.chain``)."""

    name: str
    target: str
    """``aether`` (an `aether` subcommand) or ``chain`` (``workers.chain.main``)."""
    argv: tuple[str, ...]


@dataclass
class _Child:
    service: Service
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    pause_s: float = RESTART_PAUSE_S_MIN
    restarts: int = 0
    readers: list[threading.Thread] = field(default_factory=list)


class UpConfigError(Exception):
    """`aether up` cannot run with these options and settings."""


# -- the `up` subcommand -------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    """Add `up` to `aether`'s subparsers (`commands`, kept to see which commands exist)."""
    up = commands.add_parser(
        "up",
        help="run the service processes (ingest, relay, settle, project, chain watcher, "
        "checkers, api) supervised, against the configured or the embedded infrastructure",
        description=" ".join(__doc__.split("\n\n")[0].split()) if __doc__ else None,
    )
    up.add_argument(
        "--only",
        type=_service_list,
        default=None,
        metavar="NAME,...",
        help=f"run only these services (of: {', '.join(SERVICES)})",
    )
    up.add_argument(
        "--checker-id",
        type=_uuid,
        action="append",
        default=[],
        metavar="UUID",
        help="run a checker for this registered checker (repeat for several)",
    )
    up.add_argument(
        "--stop-timeout-s",
        type=float,
        default=STOP_TIMEOUT_S_DEFAULT,
        metavar="S",
        help=f"SIGKILL children still running S seconds after SIGTERM "
        f"(default {STOP_TIMEOUT_S_DEFAULT:g})",
    )
    up.set_defaults(run=run, commands=commands)


def _service_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SERVICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown service {', '.join(unknown) or '(none given)'}; known: {', '.join(SERVICES)}"
        )
    return names


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`aether up`: plan the services, start the shared infrastructure, supervise."""
    available = set(getattr(args.commands, "choices", {}) or {})
    try:
        services, notes = plan(
            settings, only=args.only, checker_ids=args.checker_id, commands=available
        )
    except UpConfigError as e:
        print(f"aether up: invalid configuration: {e}", file=sys.stderr)
        return 2
    if args.stop_timeout_s <= 0:
        print("aether up: --stop-timeout-s must be > 0", file=sys.stderr)
        return 2
    out = _Output(sys.stdout)
    for note in notes:
        out.say(note)
    stop = _StopSignal()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop.handle)
    with _infrastructure(settings, out) as env:
        if stop.is_set():
            out.say(f"{stop.name}: stopping")
            return 0
        supervisor = Supervisor(
            services,
            env,
            out,
            verbose=bool(getattr(args, "verbose", False)),
            stop_timeout_s=args.stop_timeout_s,
        )
        supervisor.run(stop)
    out.say("stopped")
    return 0


class _StopSignal(threading.Event):
    """Set by SIGTERM or SIGINT. The handler only records: it runs between two bytecodes
    of the main thread, which may hold the output lock."""

    name = ""

    def handle(self, signum: int, _frame: object) -> None:
        if not self.is_set():
            self.name = signal.Signals(signum).name
        self.set()


def plan(
    settings: Settings,
    *,
    only: Sequence[str] | None,
    checker_ids: Sequence[UUID],
    commands: set[str],
) -> tuple[list[Service], list[str]]:
    """The services to run and the notes to log about those left out (UpConfigError when
    the options and settings cannot run)."""
    chosen = tuple(only) if only is not None else SERVICES
    explicit = only is not None
    notes: list[str] = []
    if settings.eth_rpc_url is not None:
        missing = [
            name
            for name, value in (
                ("CHAIN_TOKEN_ADDRESS", settings.chain_token_address),
                ("CHAIN_STAKING_ADDRESS", settings.chain_staking_address),
                ("CHAIN_DISTRIBUTOR_ADDRESS", settings.chain_distributor_address),
                ("CHAIN_VAULT_ADDRESS", settings.chain_vault_address),
                ("CHAIN_ANCHOR_ADDRESS", settings.chain_anchor_address),
            )
            if value is None
        ]
        if missing:
            raise UpConfigError(f"ETH_RPC_URL is set; also set {', '.join(missing)}")
    services: list[Service] = []
    for name in SERVICES:
        if name not in chosen:
            continue
        if name == "ingest":
            services.append(Service("ingest", "aether", ("worker", "ingest")))
        elif name == "relay":
            services.append(Service("relay", "aether", ("worker", "relay")))
        elif name == "settle":
            services.append(Service("settle", "aether", ("worker", "settle", "--follow")))
        elif name == "project":
            services.append(Service("project", "aether", ("project", "--follow")))
        elif name == "chain":
            if settings.eth_rpc_url is None:
                if explicit:
                    raise UpConfigError(
                        "the chain watcher needs ETH_RPC_URL (an in-process chain would be "
                        "private to its one process)"
                    )
                notes.append("chain watcher not started: ETH_RPC_URL is unset")
                continue
            services.append(Service("chain", "chain", ()))
        elif name == "api":
            if "api" not in commands:
                notes.append("api not started: this aether has no `api` command (workers/api.py)")
                continue
            services.append(Service("api", "aether", ("api",)))
        elif name == "checker":
            if not checker_ids:
                if explicit:
                    raise UpConfigError("--only names checker: give --checker-id UUID")
                notes.append("no checker started: give --checker-id UUID to run one")
                continue
            for checker_id in dict.fromkeys(checker_ids):
                services.append(
                    Service(
                        f"checker-{str(checker_id)[:8]}",
                        "aether",
                        ("worker", "checker", "--checker-id", str(checker_id)),
                    )
                )
    if checker_ids and "checker" not in chosen:
        raise UpConfigError("--checker-id given but --only leaves checker out")
    if not services:
        raise UpConfigError("no service left to run")
    return services, notes


@contextlib.contextmanager
def _infrastructure(settings: Settings, out: _Output) -> Iterator[dict[str, str]]:
    """The environment of the children: the configured settings, or the embedded
    PostgreSQL and broker started here once."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    with contextlib.ExitStack() as stack:
        if settings.database_url is None:
            from ledger.embedded import start_embedded_postgres

            url, server = start_embedded_postgres(settings.aether_data_dir)
            stack.callback(server.cleanup)
            env["DATABASE_URL"] = url
            out.say(
                f"DATABASE_URL is unset: embedded PostgreSQL in "
                f"{(settings.aether_data_dir / 'postgres').resolve()}, shared by every service"
            )
        else:
            out.say(f"PostgreSQL: {_redact(settings.database_url)}")
        if settings.kafka_bootstrap_servers is None:
            from workers.broker import embedded_broker

            bootstrap = stack.enter_context(embedded_broker())
            env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
            out.say(
                f"KAFKA_BOOTSTRAP_SERVERS is unset: embedded broker (Tansu, in memory) on "
                f"{bootstrap}, shared by every service"
            )
        else:
            out.say(f"Kafka: {settings.kafka_bootstrap_servers}")
        if settings.eth_rpc_url is not None:
            out.say(f"chain: {settings.eth_rpc_url}")
        yield env


def _redact(url: str) -> str:
    from workers.bootstrap import _redact as redact

    return redact(url)


# -- the supervisor ------------------------------------------------------------------------


class _Output:
    """One writer for every forwarded line (whole lines, never interleaved)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self.lock:
            self.stream.write(f"{name:<{NAME_WIDTH}} | {text}\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        self.line("up", f"{stamp} {text}")


class Supervisor:
    """Starts the services, restarts those that exit, stops them all when told."""

    def __init__(
        self,
        services: Sequence[Service],
        env: dict[str, str],
        out: _Output,
        *,
        verbose: bool,
        stop_timeout_s: float,
    ) -> None:
        self.children = [_Child(s) for s in services]
        self.env = env
        self.out = out
        self.verbose = verbose
        self.stop_timeout_s = stop_timeout_s

    def command(self, service: Service) -> list[str]:
        head = [sys.executable, "-m", "workers.up", "--child", service.target]
        if service.target == "aether" and self.verbose:
            return [*head, "-v", *service.argv]
        return [*head, *service.argv]

    def run(self, stop: _StopSignal) -> None:
        try:
            for child in self.children:
                if stop.is_set():
                    break
                self._start(child)
            while not stop.wait(POLL_INTERVAL_S):
                now = time.monotonic()
                for child in self.children:
                    self._watch(child, now)
            self.out.say(f"{stop.name}: stopping every service")
        finally:
            self._stop_all()

    def _start(self, child: _Child) -> None:
        service = child.service
        process = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
            self.command(service),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        child.process = process
        child.started_at = time.monotonic()
        child.restart_at = None
        assert process.stdout is not None
        reader = threading.Thread(
            target=self._forward, args=(service.name, process.stdout), daemon=True
        )
        reader.start()
        child.readers = [reader]
        shown = " ".join(service.argv) if service.target == "aether" else "workers.chain"
        self.out.say(
            f"started {service.name} (pid {process.pid}): "
            f"{'aether ' if service.target == 'aether' else 'python -m '}{shown}"
        )

    def _forward(self, name: str, stream: IO[bytes]) -> None:
        for raw in stream:
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.out.line(name, text[:LINE_CHARS_MAX])
        stream.close()

    def _watch(self, child: _Child, now: float) -> None:
        if child.process is None:
            if child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self.out.say(f"restarting {child.service.name} (restart {child.restarts})")
                self._start(child)
            return
        code = child.process.poll()
        if code is None:
            return
        for reader in child.readers:
            reader.join(timeout=1.0)
        ran_s = now - child.started_at
        if ran_s >= STABLE_RUN_S:
            child.pause_s = RESTART_PAUSE_S_MIN
        self.out.say(
            f"{child.service.name} (pid {child.process.pid}) {_exit_text(code)} after "
            f"{ran_s:.1f} s; restarting in {child.pause_s:.1f} s"
        )
        child.process = None
        child.restart_at = now + child.pause_s
        child.pause_s = min(child.pause_s * 2, RESTART_PAUSE_S_MAX)

    def _stop_all(self) -> None:
        running = [c for c in self.children if c.process is not None]
        for child in running:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in running:
            assert child.process is not None
            try:
                code = child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.out.say(
                    f"{child.service.name} (pid {child.process.pid}) still running "
                    f"{self.stop_timeout_s:g} s after SIGTERM: SIGKILL"
                )
                child.process.kill()
                code = child.process.wait()
            for reader in child.readers:
                reader.join(timeout=1.0)
            self.out.say(
                f"stopped {child.service.name} (pid {child.process.pid}): {_exit_text(code)}"
            )
            child.process = None


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# -- inside a child ------------------------------------------------------------------------


def _watch_parent(parent: int) -> None:
    """Stop this child (as by SIGTERM) when its supervisor is gone."""
    while True:
        time.sleep(PARENT_CHECK_INTERVAL_S)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def child_main(argv: Sequence[str]) -> int:
    """``python -m workers.up --child aether ARGS...`` or ``--child chain ARGS...``: one
    service, which takes SIGTERM as an interrupt (as Ctrl-C)."""
    if len(argv) < 2 or argv[0] != "--child" or argv[1] not in ("aether", "chain"):
        print("usage: python -m workers.up --child aether|chain ARGS...", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    target, rest = argv[1], list(argv[2:])
    try:
        if target == "chain":
            from workers.chain import main as chain_main

            return chain_main(rest)
        from workers.cli import main as cli_main

        return cli_main(rest)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
