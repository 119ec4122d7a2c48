"""Replay a settlements file through the broker to the workers, isolated from live state.

Events go to the replay topic with the run id in a header; workers keep that
run's windows under ``cw:{run}:`` and tag its alerts with ``run_id``. After the
last event the replay writes an end-of-run marker to every partition; a worker
records a marker only after everything before it on that partition was
processed and its alerts stored, so "all markers seen" means "run complete".
"""

from __future__ import annotations

import asyncio
import gzip
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from claimwatch.settings import Settings
from stream.app import INVALID_EXAMPLES, eof_key, invalid_key, message_digest, progress_key
from stream.events import InvalidEvent, event_key
from stream.topics import CONTROL_EOF, H_CONTROL, H_REASON, H_RUN_ID, H_SOURCE_TOPIC, ensure_topics, key_partitions

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: valid lines partitioned together (Kafka's default murmur2 partitioner, vectorised)
PUBLISH_CHUNK = 4096


class ReplayError(RuntimeError):
    pass


def check_run_id(run_id: str) -> str:
    """Run ids name Redis keys and files: letters, digits, ``_ . -``, at most 64.

    >>> check_run_id("case-2026-11")
    'case-2026-11'
    >>> check_run_id("../x")
    Traceback (most recent call last):
    ...
    replay.runner.ReplayError: invalid run id '../x': use 1-64 letters, digits, '_', '.', '-' (not 'live')
    """
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or run_id == "live":
        raise ReplayError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '_', '.', '-' (not 'live')")
    return run_id


def open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        for line in fh:
            yield line


@dataclass
class ReplayStats:
    run_id: str
    lines: int = 0
    blank: int = 0
    invalid: int = 0
    published: int = 0
    processed: int = 0
    alerts: int = 0
    seconds: float = 0.0
    invalid_examples: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[str, int, int | None], None]


async def publish_file(settings: Settings, path: Path, run_id: str, stats: ReplayStats,
                       progress: ProgressFn | None = None) -> None:
    """Publish every line of ``path`` as run ``run_id``, keyed by card, then the end-of-run markers.

    A line is checked only for what partitioning needs (size, JSON, a ``card_id``: a line failing that
    is dead-lettered here with its line number); the workers validate every settlement in full, as
    they do live, and :func:`replay_file` adds their dead letters to the run's report."""
    topic = settings.topic_replay
    await ensure_topics(settings.bootstrap_servers, [topic, settings.topic_alerts, settings.topic_dlq,
                                                     settings.topic_settlements], settings.topic_partitions)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=20,
                                max_batch_size=1024 * 1024, max_request_size=16 * 1024 * 1024,
                                acks="all", enable_idempotence=False)
    await producer.start()
    try:
        parts = sorted(await producer.partitions_for(topic))
        batches: dict[int, object] = {}
        pending: list = []
        headers = [(H_RUN_ID, run_id.encode())]
        max_bytes = settings.max_event_bytes
        chunk: list[tuple[bytes, bytes]] = []   # (key, line): partitioned together (key_partitions)

        async def flush(p: int) -> None:
            b = batches.pop(p, None)
            if b is not None and b.record_count():
                pending.append(await producer.send_batch(b, topic, partition=p))

        async def publish_chunk() -> None:
            for (key, line), pi in zip(chunk, key_partitions([k for k, _ in chunk], len(parts))):
                p = parts[pi]
                b = batches.get(p)
                if b is None:
                    b = batches[p] = producer.create_batch()
                if b.append(key=key, value=line, timestamp=None, headers=headers) is None:
                    await flush(p)
                    b = batches[p] = producer.create_batch()
                    b.append(key=key, value=line, timestamp=None, headers=headers)
                stats.published += 1
            chunk.clear()
            if len(pending) > 64:
                await asyncio.gather(*pending)
                pending.clear()

        for raw in open_lines(path):
            stats.lines += 1
            line = raw.strip()
            if not line:
                stats.blank += 1
                continue
            try:
                key = event_key(line, max_bytes=max_bytes)
            except InvalidEvent as exc:
                stats.invalid += 1
                if len(stats.invalid_examples) < INVALID_EXAMPLES:
                    stats.invalid_examples.append(f"line {stats.lines}: {exc}")
                await producer.send(settings.topic_dlq, value=line, headers=[
                    (H_REASON, f"line {stats.lines}: {exc}".encode()[:4000]), (H_RUN_ID, run_id.encode()),
                    (H_SOURCE_TOPIC, str(path.name).encode())])
                continue
            chunk.append((key, line))
            if len(chunk) >= PUBLISH_CHUNK:
                await publish_chunk()
            if progress and stats.lines % 5000 == 0:
                progress("publish", stats.lines, None)
        await publish_chunk()
        for p in list(batches):
            await flush(p)
        await asyncio.gather(*pending)
        eof_headers = [(H_RUN_ID, run_id.encode()), (H_CONTROL, CONTROL_EOF)]
        for p in parts:
            await producer.send_and_wait(topic, value=b"", key=None, partition=p, headers=eof_headers)
        if progress:
            progress("publish", stats.lines, stats.lines)
    finally:
        await producer.stop()


async def wait_done(settings: Settings, run_id: str, stats: ReplayStats, *, idle_timeout_s: float = 120.0,
                    progress: ProgressFn | None = None, alive: Callable[[], bool] | None = None,
                    poll_s: float = 0.1) -> None:
    r = aioredis.from_url(settings.redis_url)
    try:
        want = settings.topic_partitions
        last, last_change = -1, time.monotonic()
        while True:
            done = await r.scard(eof_key(run_id))
            prog = await r.hgetall(progress_key(run_id))
            processed = int(prog.get(b"processed", 0))
            stats.processed = processed
            if progress:
                progress("process", processed, stats.published)
            if done >= want:
                return
            if processed != last or done:
                if processed != last:
                    last, last_change = processed, time.monotonic()
            if time.monotonic() - last_change > idle_timeout_s:
                raise ReplayError(f"workers made no progress for {idle_timeout_s:.0f} s "
                                  f"({processed}/{stats.published} processed, {done}/{want} partitions done): "
                                  "are workers running against this broker and Redis?")
            if alive is not None and not alive():
                raise ReplayError("the worker process(es) of this replay exited")
            await asyncio.sleep(poll_s)
    finally:
        await r.aclose()


async def drop_run_state(redis_url: str | Sequence[str], run_id: str) -> int:
    """Delete every Redis key of a run (``cw:{run}:*``) on one Redis or on each of several
    (:attr:`Settings.redis_urls <claimwatch.settings.Settings.redis_urls>`)."""
    n = 0
    for url in [redis_url] if isinstance(redis_url, str) else redis_url:
        r = aioredis.from_url(url)
        try:
            batch = []
            async for k in r.scan_iter(match=f"cw:{run_id}:*", count=1000):
                batch.append(k)
                if len(batch) >= 1000:
                    n += await r.unlink(*batch)
                    batch.clear()
            if batch:
                n += await r.unlink(*batch)
        finally:
            await r.aclose()
    return n


def replay_file(settings: Settings, path: Path, run_id: str, *, workers: int = 1, keep_state: bool = False,
                idle_timeout_s: float = 120.0, progress: ProgressFn | None = None,
                log: Callable[[str], None] | None = None) -> tuple[ReplayStats, list]:
    """Publish ``path`` as run ``run_id``, wait until every event is processed, return (stats, alerts).

    Starts the embedded broker/Redis when the settings have no URLs, and ``workers`` worker
    processes (0 = use the workers already running against the configured services).
    """
    from alerts.store import AlertStore
    from claimwatch import runtime

    check_run_id(run_id)
    stats = ReplayStats(run_id)
    t0 = time.perf_counter()
    with runtime.services(settings) as s2, runtime.workers(s2, workers) as procs:
        store = AlertStore(s2.store_url_resolved)
        try:
            if store.count(run_id):
                store.delete_run(run_id)  # a run id replayed again starts clean
            asyncio.run(drop_run_state(s2.redis_urls, run_id))
            asyncio.run(publish_file(s2, path, run_id, stats, progress))
            alive = (lambda: any(p.alive() for p in procs)) if procs else None
            try:
                asyncio.run(wait_done(s2, run_id, stats, idle_timeout_s=idle_timeout_s, progress=progress,
                                      alive=alive))
            except ReplayError:
                if log:
                    for p in procs:
                        log(f"worker log {p.log_path}:\n{p.log_tail(2000)}")
                raise
            stats.seconds = time.perf_counter() - t0
            asyncio.run(_worker_invalid(s2.redis_url, path, stats))
            alerts = store.query(run_id=run_id)
            stats.alerts = len(alerts)
            stats.extra = asyncio.run(_run_report(s2.redis_url, run_id))
            if not keep_state:
                asyncio.run(drop_run_state(s2.redis_urls, run_id))
        finally:
            store.close()
    return stats, alerts


async def _worker_invalid(redis_url: str, path: Path, stats: ReplayStats) -> None:
    """Add what the workers dead-lettered to the replay's invalid lines, with the lines of the first few.

    The replay checks only what partitioning needs (:func:`stream.events.event_key`); the workers validate
    every settlement and keep a run's first dead letters with a digest of the message, which is the line
    as published: the file is read again, only when there are any, to name their lines."""
    r = aioredis.from_url(redis_url)
    try:
        n = int(await r.hget(progress_key(stats.run_id), "invalid") or 0)
        raw = await r.lrange(invalid_key(stats.run_id), 0, -1)
    finally:
        await r.aclose()
    if not n:
        return
    stats.invalid += n
    examples = [orjson.loads(x) for x in raw]
    want = {e["digest"] for e in examples}
    where: dict[str, int] = {}
    for no, line in enumerate(open_lines(path), 1):
        d = message_digest(line.strip())
        if d in want and d not in where:
            where[d] = no
            if len(where) == len(want):
                break
    found = sorted((where.get(e["digest"], 1 << 62), i, e) for i, e in enumerate(examples))
    for no, _, e in found[:max(0, INVALID_EXAMPLES - len(stats.invalid_examples))]:
        at = f"line {no}" if e["digest"] in where else f"partition {e['partition']} offset {e['offset']}"
        stats.invalid_examples.append(f"{at}: {e['reason']}")


async def _run_report(redis_url: str, run_id: str) -> dict:
    """Late events and data-quality findings the workers recorded for a run."""
    r = aioredis.from_url(redis_url)
    try:
        prog = await r.hgetall(progress_key(run_id))
        dq = await r.hgetall(f"cw:{run_id}:dq")
    finally:
        await r.aclose()
    findings: dict[str, dict[str, int]] = {}
    for k, v in dq.items():
        fld, inst = k.decode().split("\t", 1)
        findings.setdefault(fld, {})[inst] = int(v)
    return {"late": int(prog.get(b"late", 0)), "data_quality": findings}
