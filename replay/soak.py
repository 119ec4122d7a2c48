"""Soak: a steady offered load for a long time; worker RSS, Redis memory and lag at start and end.

The city is finite (``cards``) like a real one, and its simulated clock runs at whatever
speed the offered rate implies, so event-time windows slide and prune during the soak.
``claimwatch bench soak --minutes 20 --rate 2000`` is the long form; CI runs a short one.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import orjson
import redis as sync_redis

from claimwatch import runtime
from claimwatch.settings import Settings
from replay.bench import _rss_kb, _wait_ready, machine
from stream.topics import ensure_topics


def _lag(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith("claimwatch_consumergroup_lag{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def soak(settings: Settings, *, seconds: float, rate: float, cards: int = 50_000, seed: int = 5,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    from replay.city import iter_live

    samples: list[dict[str, Any]] = []
    with runtime.services(settings) as s, runtime.workers(s, 1) as procs:
        asyncio.run(ensure_topics(s.bootstrap_servers, [s.topic_settlements, s.topic_replay, s.topic_alerts,
                                                        s.topic_dlq], s.topic_partitions))
        _wait_ready(procs)
        r = sync_redis.Redis.from_url(s.redis_url)
        w = procs[0]

        def sample(sent: int) -> dict[str, Any]:
            info = r.info("memory")
            return {"t": round(time.monotonic() - t_start, 1), "sent": sent,
                    "processed": int(r.hget("cw:live:progress", "processed") or 0),
                    "worker_rss_mb": round(_rss_kb(w.proc.pid) / 1024, 1),
                    "redis_used_mb": round(info["used_memory"] / 2**20, 1), "redis_keys": r.dbsize(),
                    "lag": _lag(w.web_port)}

        async def feed() -> int:
            p = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=20, max_batch_size=1 << 20)
            await p.start()
            start = datetime.now(timezone(timedelta(hours=8))) - timedelta(days=400)
            it = iter_live(cards, seed, start.replace(hour=0, minute=0, second=0, microsecond=0), days_per_chunk=7)
            sent, t0 = 0, time.monotonic()
            next_sample = t0 + max(5.0, seconds / 20)
            try:
                while time.monotonic() - t0 < seconds:
                    burst = max(1, int(rate / 20))
                    for _ in range(burst):
                        ev = next(it)
                        await p.send(s.topic_settlements, orjson.dumps(ev), key=ev["card_id"].encode())
                    sent += burst
                    wait = t0 + sent / rate - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if time.monotonic() >= next_sample:
                        samples.append(await asyncio.to_thread(sample, sent))
                        log(json.dumps(samples[-1]))
                        next_sample += max(5.0, seconds / 20)
                await p.flush()
            finally:
                await p.stop()
            return sent

        t_start = time.monotonic()
        sent = asyncio.run(feed())
        deadline = time.monotonic() + 60
        while int(r.hget("cw:live:progress", "processed") or 0) < sent and time.monotonic() < deadline:
            time.sleep(0.5)
        lag_deadline = time.monotonic() + 25  # the lag gauge refreshes from committed offsets every 10 s
        while _lag(w.web_port) > 0 and time.monotonic() < lag_deadline:
            time.sleep(1.0)
        samples.append(sample(sent))
        alive = w.alive()
    first = samples[min(1, len(samples) - 1)]  # after warm-up
    last = samples[-1]
    return {"seconds": seconds, "rate": rate, "cards": cards, "sent": last["sent"], "processed": last["processed"],
            "worker_alive": alive, "start": first, "end": last, "samples": samples, "machine": machine()}
