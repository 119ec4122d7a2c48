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

from claimwatch import runtime
from claimwatch.settings import Settings
from replay.bench import _rss_kb, _wait_ready, machine, redis_clients, used_memory
from stream.topics import ensure_topics


def _lag(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith("claimwatch_consumergroup_lag{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


#: days the generated city is simulated at a time (weekly patterns need a week)
CHUNK_DAYS = 7


def history_start(cards: int, seed: int, settlements: float, *, now: datetime | None = None) -> datetime:
    """Midnight (+08:00) far enough back that ``settlements`` of the generated city, one after another,
    all lie in the past: the city's clock runs ahead at whatever speed the offered rate implies, and a
    settlement from the future is refused (dead-lettered). Measures the city's settlements per day on
    its first week; at least 400 days back.

    >>> a, b = history_start(2000, 5, 10_000), history_start(2000, 5, 1_000_000)
    >>> 400 <= (datetime.now(a.tzinfo) - a).days < (datetime.now(b.tzinfo) - b).days
    True
    """
    from replay.city import DEFAULT_START, iter_live

    end = (DEFAULT_START + timedelta(days=CHUNK_DAYS)).isoformat()
    n = 0
    for ev in iter_live(cards, seed, DEFAULT_START, days_per_chunk=CHUNK_DAYS):
        if ev["event_time"] >= end:
            break
        n += 1
    days = max(400, int(settlements / max(1, n) * CHUNK_DAYS * 1.1) + 2 * CHUNK_DAYS)
    now = now or datetime.now(timezone(timedelta(hours=8)))
    return (now - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)


def soak(settings: Settings, *, seconds: float, rate: float, cards: int = 50_000, seed: int = 5,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    from replay.city import iter_live

    samples: list[dict[str, Any]] = []
    with runtime.services(settings) as s, runtime.workers(s, 1) as procs:
        asyncio.run(ensure_topics(s.bootstrap_servers, [s.topic_settlements, s.topic_replay, s.topic_alerts,
                                                        s.topic_dlq], s.topic_partitions))
        _wait_ready(procs)
        rs = redis_clients(s)   # the main Redis, then the aux one when there is one
        r = rs[0]
        w = procs[0]

        def sample(sent: int) -> dict[str, Any]:
            return {"t": round(time.monotonic() - t_start, 1), "sent": sent,
                    "processed": int(r.hget("cw:live:progress", "processed") or 0),
                    "worker_rss_mb": round(_rss_kb(w.proc.pid) / 1024, 1),
                    "redis_used_mb": round(used_memory(rs) / 2**20, 1), "redis_keys": sum(x.dbsize() for x in rs),
                    "lag": _lag(w.web_port)}

        start = history_start(cards, seed, seconds * rate)

        async def feed() -> int:
            p = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=20, max_batch_size=1 << 20)
            await p.start()
            it = iter_live(cards, seed, start, days_per_chunk=CHUNK_DAYS)
            horizon = time.time() + 60   # a settlement from the future is dead-lettered, never processed
            horizon_iso = datetime.fromtimestamp(horizon, start.tzinfo).isoformat(timespec="seconds")
            sent, t0 = 0, time.monotonic()
            next_sample = t0 + max(5.0, seconds / 20)
            try:
                while time.monotonic() - t0 < seconds:
                    burst = max(1, int(rate / 20))
                    for _ in range(burst):
                        ev = next(it)
                        if ev["event_time"] > horizon_iso:
                            raise RuntimeError(f"the generated city reached the present after {sent:,} settlements "
                                               f"(it started {start:%Y-%m-%d}); this is a bug in history_start")
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
