"""The embedded broker: topics exist, any Kafka client reads what we produce."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from workers.broker import TOPICS, USAGE


def test_every_topic_exists_with_its_partitions(kafka_bootstrap: str) -> None:
    async def partitions() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics([t.name for t in TOPICS])
        finally:
            await admin.close()
        return {d["topic"]: len(d["partitions"]) for d in described}

    assert asyncio.run(partitions()) == {t.name: t.partitions for t in TOPICS}


def test_a_message_produced_is_read_back_by_key_partition(kafka_bootstrap: str) -> None:
    key = uuid.uuid4().hex.encode()

    async def round_trip() -> bytes:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            metadata = await producer.send_and_wait(USAGE.name, b'{"hello": 1}', key=key)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(USAGE.name, metadata.partition)
            consumer.assign([tp])
            consumer.seek(tp, metadata.offset)
            record = await asyncio.wait_for(consumer.getone(), timeout=10)
        finally:
            await consumer.stop()
        assert record.key == key
        return bytes(record.value)

    assert asyncio.run(round_trip()) == b'{"hello": 1}'
