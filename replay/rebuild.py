"""Rebuild Redis windows from the settlements log after Redis state was lost.

``claimwatch rebuild-state --from TIME`` reads the settlement topic from the first message
appended at or after TIME up to its current end, and runs every detector over it exactly as
the workers did, writing state only (no alert is published again; alert ids and episodes come
out the same, so the alerts that follow extend the right episodes). Window members are event
ids, so rebuilding over state that partly survived, or while workers run, counts nothing twice.
Choose TIME at least one longest window back (a year for the yearly visit rules), within the
topic's retention.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from claimwatch.settings import Settings
from detectors.config import load_rules
from stream.pipeline import Message, Processor, headers_dict, run_id_of


@dataclass
class RebuildStats:
    messages: int = 0
    events: int = 0
    invalid: int = 0
    seconds: float = 0.0


async def rebuild_state(settings: Settings, since_ts: float, *, run_id: str = "live", topic: str | None = None,
                        progress: Callable[[int, int], None] | None = None, batch: int = 5000) -> RebuildStats:
    topic = topic or settings.topic_settlements
    stats = RebuildStats()
    t0 = time.perf_counter()
    rules = load_rules(settings.rules_path, lang=settings.lang)
    r = aioredis.from_url(settings.redis_url)
    aux = aioredis.from_url(settings.redis_aux_url) if settings.aux_rules else None
    proc = Processor(rules, r, max_event_bytes=settings.max_event_bytes,
                     future_tolerance_s=settings.future_tolerance_s, aux=aux, aux_rules=settings.aux_rules)
    c = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
                         fetch_max_bytes=settings.consumer_max_fetch_bytes)
    await c.start()
    try:
        parts = c.partitions_for_topic(topic)
        if not parts:
            await c._client.force_metadata_update()
            parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            raise RuntimeError(f"topic {topic!r} does not exist on {settings.bootstrap_servers}")
        c.assign(tps)
        end = await c.end_offsets(tps)
        start = await c.offsets_for_times({tp: int(since_ts * 1000) for tp in tps})
        total = 0
        for tp in tps:
            off = start.get(tp)
            first = off.offset if off is not None else end[tp]
            c.seek(tp, first)
            total += max(0, end[tp] - first)
        # Read to the end of the log: until a fetch comes back empty with every partition at or
        # past its end offset (re-read each time: the high watermark may trail the last append).
        nxt = {tp: await c.position(tp) for tp in tps}
        while True:
            got = await c.getmany(timeout_ms=500, max_records=batch)
            msgs = []
            for tp, recs in got.items():
                for rec in recs:
                    if rec.offset < nxt[tp]:
                        continue  # already seen
                    nxt[tp] = rec.offset + 1
                    stats.messages += 1
                    h = headers_dict(rec.headers)
                    if run_id_of(h) != run_id:
                        continue
                    msgs.append(Message(rec.value, h, tp.topic, tp.partition, rec.offset, rec.key))
            if msgs:
                res = await proc.process(msgs)
                stats.events += sum(res.processed.values())
                stats.invalid += sum(res.invalid.values())
            if progress:
                progress(stats.messages, max(total, stats.messages))
            if not got:
                end = await c.end_offsets(tps)
                if all(nxt[tp] >= end[tp] for tp in tps):
                    break
    finally:
        await c.stop()
        await r.aclose()
        if aux is not None:
            await aux.aclose()
    stats.seconds = time.perf_counter() - t0
    return stats


def run(settings: Settings, since_ts: float, **kw) -> RebuildStats:
    return asyncio.run(rebuild_state(settings, since_ts, **kw))
