"""Topic names, headers and control messages shared by workers, replay and tools."""

from __future__ import annotations

LIVE_RUN = "live"

#: header carrying the run id of a replayed settlement (absent = live)
H_RUN_ID = "cw-run-id"
#: header marking a control message; ``eof`` ends a replay on one partition
H_CONTROL = "cw-control"
CONTROL_EOF = b"eof"
#: dead-letter headers
H_REASON = "cw-reason"
H_SOURCE_TOPIC = "cw-source-topic"
H_SOURCE_PARTITION = "cw-source-partition"
H_SOURCE_OFFSET = "cw-source-offset"


async def ensure_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    """Create topics that do not exist yet (existing ones are left as they are)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, num_partitions=partitions, replication_factor=1,
                        topic_configs={"retention.ms": str(7 * 86400 * 1000)})
               for n in names if n not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
