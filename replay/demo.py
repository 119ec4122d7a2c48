"""``claimwatch demo``: the embedded stack, a worker, a live synthetic city, alerts as they fire.

The simulated clock starts 30 days back and runs as fast as ``--rate`` allows;
once it catches up with the wall clock the city settles in real time. Event
times are what the windows use, so alerts fire within the first minute even
though 12 pharmacy visits take a real drug dealer most of a day.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from datetime import datetime, timedelta, timezone

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from claimwatch import runtime
from claimwatch.settings import Settings
from stream.topics import H_RUN_ID, ensure_topics

SEV_STYLE = {"low": "dim", "medium": "yellow", "high": "bold red", "critical": "bold white on red"}


def run_demo(settings: Settings, *, rate: float, cards: int, seed: int, duration_s: float | None,
             console: Console) -> None:
    embedded = not settings.kafka_url
    with console.status("starting the embedded broker, Redis and a worker…"):
        ctx = runtime.services(settings)
        s = ctx.__enter__()
    try:
        with runtime.workers(s, 1) as procs:
            run_id = None if embedded else "demo"
            asyncio.run(_demo(s, procs, rate=rate, cards=cards, seed=seed, duration_s=duration_s,
                              console=console, run_id=run_id))
    finally:
        ctx.__exit__(None, None, None)


async def _demo(s: Settings, procs, *, rate: float, cards: int, seed: int, duration_s: float | None,
                console: Console, run_id: str | None) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from replay.city import iter_live

    await ensure_topics(s.bootstrap_servers, [s.topic_settlements, s.topic_replay, s.topic_alerts, s.topic_dlq],
                        s.topic_partitions)
    producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=10)
    consumer = AIOKafkaConsumer(s.topic_alerts, bootstrap_servers=s.bootstrap_servers, group_id=None,
                                auto_offset_reset="latest" if run_id else "earliest")
    await producer.start()
    await consumer.start()
    want_run = run_id or "live"
    recent: dict[str, dict] = {}
    order: deque[str] = deque(maxlen=200)
    by_rule: Counter = Counter()
    stats = {"sent": 0, "sim": "", "t0": time.monotonic()}
    headers = [(H_RUN_ID, run_id.encode())] if run_id else None
    start = datetime.now(timezone(timedelta(hours=8))).replace(microsecond=0) - timedelta(days=30)

    async def feed() -> None:
        it = iter_live(cards, seed, start)
        t_next = time.monotonic()
        step = max(1, int(rate / 10))
        while True:
            for _ in range(step):
                ev = next(it)
                ts = datetime.fromisoformat(ev["event_time"]).timestamp()
                if ts > time.time():  # caught up with the wall clock: real time from here
                    await asyncio.sleep(ts - time.time())
                await producer.send(s.topic_settlements, orjson.dumps(ev), key=ev["card_id"].encode(),
                                    headers=headers)
                stats["sent"] += 1
                stats["sim"] = ev["event_time"]
            t_next += step / rate
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def watch() -> None:
        async for rec in consumer:
            a = orjson.loads(rec.value)
            if a.get("run_id") != want_run:
                continue
            if a["alert_id"] not in recent:
                order.appendleft(a["alert_id"])
                by_rule[a["rule"]] += 1
            recent[a["alert_id"]] = a

    def render() -> Group:
        el = time.monotonic() - stats["t0"]
        head = Text.assemble(("claimwatch live demo ", "bold"),
                             f"— {stats['sent']:,} settlements sent ({stats['sent'] / max(el, 1e-9):.0f}/s), "
                             f"simulated time {stats['sim'][:16]}, {len(recent)} alerts "
                             f"({', '.join(f'{k} {v}' for k, v in by_rule.most_common()) or 'none yet'}); "
                             f"worker {'up' if all(p.alive() for p in procs) else '[DOWN]'} — Ctrl-C to stop")
        t = Table(expand=True)
        t.add_column("时间 time", no_wrap=True)
        t.add_column("规则 rule", no_wrap=True)
        t.add_column("级别", no_wrap=True)
        t.add_column("对象 subject", no_wrap=True)
        t.add_column("摘要 summary", ratio=1, overflow="fold")
        for aid in list(order)[:20]:
            a = recent[aid]
            t.add_row(a["window_end"][5:16].replace("T", " "), a["rule"],
                      Text(a["severity"], style=SEV_STYLE.get(a["severity"], "")),
                      f"{a['subject_type']} {a['subject_id']}", a.get("summary", ""))
        return Group(head, t)

    tasks = [asyncio.create_task(feed()), asyncio.create_task(watch())]
    try:
        with Live(render(), console=console, refresh_per_second=4, transient=False) as live:
            while duration_s is None or time.monotonic() - stats["t0"] < duration_s:
                for tsk in tasks:
                    if tsk.done() and tsk.exception():
                        raise tsk.exception()
                live.update(render())
                await asyncio.sleep(0.25)
    finally:
        for tsk in tasks:
            tsk.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()
        await consumer.stop()
    console.print(f"demo stopped: {stats['sent']:,} settlements, {len(recent)} alerts "
                  f"(stored in {s.store_url_resolved}; `claimwatch alerts export` lists them)")
