"""The outbox relay against real PostgreSQL and the real broker: every committed event
reaches Kafka, keyed by aggregate, in log order per aggregate, none missing, also across a
kill -9 and a restart; duplicates carry the same event id."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from ledger.money import units
from ledger.store import LedgerApplication
from tests.market import build_market
from workers.broker import Topic, create_topics
from workers.relay import Relay, Source, event_id

ROOT = Path(__file__).parents[2]


def fresh_topic(kafka_bootstrap: str) -> Topic:
    topic = Topic(f"test.relay.{uuid.uuid4().hex[:8]}", 4, "aggregate id")
    asyncio.run(create_topics(kafka_bootstrap, (topic,)))
    return topic


def read_topic(kafka_bootstrap: str, topic: Topic) -> list[dict]:
    """Every message of the topic, partition by partition, in offset order."""

    async def read() -> list[dict]:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            out: list[dict] = []

            async def behind() -> bool:
                for tp in partitions:
                    if await consumer.position(tp) < ends[tp]:
                        return True
                return False

            while await behind():
                batch = await consumer.getmany(timeout_ms=1_000)
                for records in batch.values():
                    for r in records:
                        message = orjson.loads(r.value)
                        assert r.key == message["subject"].encode()
                        out.append(message)
            return out
        finally:
            await consumer.stop()

    return asyncio.run(read())


def fill_market(ledger_app: LedgerApplication, ledger_env: dict[str, str], deposits: int) -> int:
    market = build_market(ledger_app, ledger_env)
    for i in range(deposits):
        market.deposit(f"consumer-{i % 7}", units(1 + i))
    return market.app.recorder.max_notification_id() or 0


def assert_complete_and_ordered(messages: list[dict], last_position: int) -> int:
    """Every position 1..last present; per aggregate positions increase; duplicates equal."""
    seen: dict[int, dict] = {}
    duplicates = 0
    last_per_stream: dict[str, int] = {}
    for m in messages:
        position = m["data"]["position"]
        if position in seen:
            assert seen[position] == m  # a resend is the same message, same event id
            duplicates += 1
            continue
        seen[position] = m
        stream = m["subject"]
        assert position > last_per_stream.get(stream, 0), "out of order within an aggregate"
        last_per_stream[stream] = position
        data = m["data"]
        assert m["id"] == str(
            event_id(data["application"], uuid.UUID(data["stream"]), data["version"])
        )
    assert sorted(seen) == list(range(1, last_position + 1))
    return duplicates


def test_every_marketplace_event_reaches_kafka_keyed_and_in_order(
    ledger_app, ledger_env, kafka_bootstrap
) -> None:
    last = fill_market(ledger_app, ledger_env, 40)
    topic = fresh_topic(kafka_bootstrap)
    market = build_market(ledger_app, ledger_env)
    relay = Relay(
        ledger_app.app_recorder.datastore,
        [Source(market.app, topic.name)],
        kafka_bootstrap,
        page_size=25,
    )

    async def run() -> int:
        await relay.start()
        try:
            return await relay.relay_all()
        finally:
            await relay.stop()

    assert asyncio.run(run()) == last
    assert relay.position(Source(market.app, topic.name)) == last
    assert asyncio.run(run()) == 0  # resumed at the end: nothing sent twice
    messages = read_topic(kafka_bootstrap, topic)
    assert assert_complete_and_ordered(messages, last) == 0
    first = next(m for m in messages if m["data"]["position"] == 1)
    assert first["type"] == "domain.funds:DepositConfirmed"
    assert first["data"]["state"]["fact"]["amount"] == str(units(1))


RELAY_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from ledger.config import eventsourcing_env
    from ledger.market.store import MarketplaceApplication
    from ledger.store import LedgerApplication
    from workers.relay import Relay, Source
    url, schema, bootstrap, topic = sys.argv[1:5]
    env = eventsourcing_env(url, schema, 2)
    ledger = LedgerApplication(env=env)
    market = MarketplaceApplication(ledger.app_recorder.datastore, env=env)
    relay = Relay(ledger.app_recorder.datastore, [Source(market, topic)], bootstrap, page_size=20)
    asyncio.run(relay.run())
    """
)


def test_a_relay_killed_mid_batch_and_restarted_delivers_every_event_in_order(
    ledger_app, ledger_env, database_url, schema, kafka_bootstrap
) -> None:
    last = fill_market(ledger_app, ledger_env, 400)
    topic = fresh_topic(kafka_bootstrap)
    market = build_market(ledger_app, ledger_env)
    source = Source(market.app, topic.name)
    probe = Relay(ledger_app.app_recorder.datastore, [source], kafka_bootstrap)
    args = [sys.executable, "-c", RELAY_SCRIPT, database_url, schema, kafka_bootstrap, topic.name]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(args, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while probe.position(source) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 0 < probe.position(source) < last, "kill it mid-run"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = probe.position(source)
    restarted = subprocess.Popen(args, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while probe.position(source) < last and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        restarted.send_signal(signal.SIGKILL)
        restarted.wait()
    assert probe.position(source) == last
    messages = read_topic(kafka_bootstrap, topic)
    duplicates = assert_complete_and_ordered(messages, last)
    assert duplicates <= 20  # at most the page in flight when it was killed
    assert killed_at < last
