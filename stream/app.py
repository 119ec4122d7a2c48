"""The Faust worker: consume settlements (live and replay), detect, publish alerts, dead-letter bad input.

``claimwatch worker`` runs :func:`run_worker`. Per fetched batch (``take_events``):
parse → one Redis round trip for all detectors → dead letters and alerts produced
→ alerts upserted in the store → replay progress recorded. The batch's offsets
are acknowledged only after all of that succeeded, so a crash redelivers the
batch, and idempotent state (event ids as window members, deterministic alert
ids, upserts) makes the redelivery harmless.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import faust
import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from mode import Service

from alerts.exemptions import ExemptionError, ExemptionRegistry, load_redis
from alerts.model import to_json
from alerts.store import AlertStore
from stream import metrics as M
from stream.ingest import DirectIngest, Producer
from claimwatch.settings import Settings
from detectors.config import ConfigError, RuleSet, load_rules
from stream.pipeline import OUTBOX_KEY, BatchResult, Message, Processor, headers_dict
from stream.topics import LIVE_RUN, H_REASON, H_RUN_ID, H_SOURCE_OFFSET, H_SOURCE_PARTITION, H_SOURCE_TOPIC

log = logging.getLogger("claimwatch.worker")

PROGRESS_TTL_S = 7 * 86400


def progress_key(run_id: str) -> str:
    return f"cw:{run_id}:progress"


def eof_key(run_id: str) -> str:
    return f"cw:{run_id}:eof"


def invalid_key(run_id: str) -> str:
    """A replay run's first :data:`INVALID_EXAMPLES` dead letters (JSON: reason, partition, offset, digest)."""
    return f"cw:{run_id}:invalid"


#: dead letters a replay run keeps as examples for its report (the dead-letter topic has them all)
INVALID_EXAMPLES = 5


def message_digest(value: bytes) -> str:
    """What a replay finds a dead-lettered message's line by (the line is published as is, stripped).

    >>> message_digest(b'{"card_id":"C1"}')
    'abb646a66c0fa510'
    """
    return hashlib.blake2b(value, digest_size=8).hexdigest()


def create_app(settings: Settings, rules: RuleSet, *, web_port: int) -> faust.App:
    data_dir = Path(settings.data_dir).resolve()
    (data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=settings.kafka_url,
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        consumer_max_fetch_size=settings.consumer_max_fetch_bytes,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 4),
        stream_buffer_maxsize=max(4096, settings.batch_max * 2),
        web_port=web_port,
        web_bind=settings.web_bind,
        web_host="127.0.0.1",
        datadir=str(data_dir / "faust"),
        producer_linger_ms=5,
    )
    settlements = app.topic(settings.topic_settlements, settings.topic_replay,
                            value_serializer="raw", key_serializer="raw")
    redis_opts = dict(socket_keepalive=True, health_check_interval=30, socket_timeout=15, socket_connect_timeout=5,
                      retry_on_timeout=False)
    redis = aioredis.from_url(settings.redis_url, **redis_opts)
    aux = aioredis.from_url(settings.redis_aux_url, **redis_opts) if settings.aux_rules else None
    store = AlertStore(settings.store_url_resolved)
    state: dict[str, Any] = {"rules": rules, "mtime": _mtime(settings.rules_path), "batches": 0}
    processor = Processor(rules, redis, max_event_bytes=settings.max_event_bytes,
                          future_tolerance_s=settings.future_tolerance_s, aux=aux, aux_rules=settings.aux_rules)
    processor.outbox = True
    app.claimwatch = {"processor": processor, "store": store, "redis": redis, "state": state}  # type: ignore[attr-defined]
    M.rules_version.labels(rules.version).set(1)
    exemptions_path = Path(settings.exemptions_path)

    async def refresh_exemptions() -> None:
        try:
            reg = ExemptionRegistry.load_file(exemptions_path)
        except ExemptionError as exc:
            log.error("exemptions file refused, keeping the previous registry: %s", exc)
            return
        try:
            reg = reg.merge(await load_redis(redis))
        except Exception as exc:  # Redis away: keep the file entries, retry next time
            log.error("could not read exemptions from Redis: %s", exc)
        processor.exemptions = reg

    @app.task
    async def _init() -> None:
        await refresh_exemptions()

    @app.timer(interval=30.0)
    async def _exemptions_timer() -> None:
        await refresh_exemptions()

    async def drain_outbox() -> int:
        """Publish and store alerts a crashed worker computed but never published (idempotent upserts)."""
        try:
            raw = await redis.hgetall(OUTBOX_KEY)
        except Exception as exc:
            log.error("could not read the alert outbox: %s", exc)
            return 0
        if not raw:
            return 0
        from alerts.model import from_json

        res = BatchResult(alerts=[from_json(v) for v in raw.values()])
        await publish(res)
        log.warning("published %d alert(s) left in the outbox by an interrupted batch", len(res.alerts))
        return len(res.alerts)

    @app.task
    async def _drain_at_start() -> None:
        await drain_outbox()

    @app.timer(interval=20.0)
    async def _drain_timer() -> None:
        await drain_outbox()

    producer = Producer(settings)
    app.claimwatch["producer"] = producer  # type: ignore[index]

    @app.service
    class _ProducerService(Service):
        async def on_start(self) -> None:
            await producer.start()

        async def on_stop(self) -> None:
            await producer.stop()

    from stream.verdicts_agent import register as register_verdicts

    verdicts = register_verdicts(app, settings, processor, store, redis)

    async def publish(res: BatchResult) -> None:
        futs = []
        if res.alerts:
            res.alerts = verdicts.prioritise(res.alerts)
        for dl in res.dead_letters:
            m = dl.message
            futs.append(await producer.send(settings.topic_dlq, key=m.key, value=m.value if m.value is not None else b"",
                                            headers=[
                (H_REASON, dl.reason.encode("utf-8", "replace")[:4000]), (H_RUN_ID, dl.run_id.encode()),
                (H_SOURCE_TOPIC, m.topic.encode()), (H_SOURCE_PARTITION, str(m.partition).encode()),
                (H_SOURCE_OFFSET, str(m.offset).encode())]))
            log.warning("dead-lettered %s[%d]@%d: %s", m.topic, m.partition, m.offset, dl.reason[:200])
            M.settlements_invalid.labels(M.reason_kind(dl.reason)).inc()
        if res.alerts:
            await asyncio.to_thread(store.upsert, res.alerts)
        now = time.time()
        for a in res.published_alerts:
            futs.append(await producer.send(settings.topic_alerts, key=a.subject_id.encode(), value=to_json(a)))
            M.alerts_emitted.labels(a.rule, a.severity).inc()
            if a.run_id == "live":
                M.event_to_alert.observe(max(0.0, now - _ts(a.window_end)))
        for a in res.alerts:
            if a.suppressed:
                M.alerts_suppressed.labels(a.rule).inc()
        if futs:
            await asyncio.gather(*futs)  # delivered (acks) before the batch's offsets are committed
        for (run, fld), counts in res.data_quality.items():
            M.data_quality.labels(fld).inc(sum(counts.values()))
        runs = set(res.processed) | set(res.invalid) | {r for r, _, _ in res.eofs}
        if res.alerts:
            await redis.hdel(OUTBOX_KEY, *{a.alert_id for a in res.alerts})
        if runs:
            async with redis.pipeline(transaction=False) as pipe:
                for run in runs:
                    pk = progress_key(run)
                    if res.processed.get(run):
                        pipe.hincrby(pk, "processed", res.processed[run])
                    if res.invalid.get(run):
                        pipe.hincrby(pk, "invalid", res.invalid[run])
                    n_alerts = sum(1 for a in res.alerts if a.run_id == run)
                    if n_alerts:
                        pipe.hincrby(pk, "alert_updates", n_alerts)
                    if res.late.get(run):
                        pipe.hincrby(pk, "late", res.late[run])
                    pipe.expire(pk, PROGRESS_TTL_S)
                # a replay reports its first few dead letters (the live stream has the topic): at most
                # INVALID_EXAMPLES of a batch per run, one push, whatever the number of invalid lines
                examples: dict[str, list[bytes]] = {}
                for dl in res.dead_letters:
                    ex = examples.setdefault(dl.run_id, [])
                    if dl.run_id != LIVE_RUN and len(ex) < INVALID_EXAMPLES:
                        m = dl.message
                        ex.append(orjson.dumps({"reason": dl.reason, "partition": m.partition, "offset": m.offset,
                                                "digest": message_digest(m.value or b"")}))
                for run, ex in examples.items():
                    if ex:
                        pipe.rpush(invalid_key(run), *ex)
                        pipe.ltrim(invalid_key(run), 0, INVALID_EXAMPLES - 1)
                        pipe.expire(invalid_key(run), PROGRESS_TTL_S)
                for (run, fld), counts in res.data_quality.items():
                    for inst, n in counts.items():
                        pipe.hincrby(f"cw:{run}:dq", f"{fld}\t{inst}", n)
                    pipe.expire(f"cw:{run}:dq", PROGRESS_TTL_S)
                for run, topic, part in res.eofs:
                    pipe.sadd(eof_key(run), f"{topic}:{part}")
                    pipe.expire(eof_key(run), PROGRESS_TTL_S)
                await pipe.execute()

    async def handle_batch(msgs: list[Message], parsed=None, pending=None) -> BatchResult:
        """Process and publish one batch; retry on Redis/broker errors; exit on a bug (crash-only).

        ``pending``: the batch's Redis round trip, already submitted (:meth:`Processor.submit`).
        """
        backoff = 0.5
        if parsed is None:
            parsed = processor.parse(msgs)
        while True:
            try:
                # every step has a deadline: a round trip that never completes (a half-dead connection
                # after a Redis restart) is retried like any other failure instead of stalling the worker
                if pending is not None:
                    started, pending = pending, None
                    res = await asyncio.wait_for(processor.finish(started), BATCH_DEADLINE_S)
                else:
                    res = await asyncio.wait_for(processor.run(parsed), BATCH_DEADLINE_S)
                await asyncio.wait_for(publish(res), BATCH_DEADLINE_S)
                state["batches"] += 1
                return res
            except (ConnectionError, OSError, aioredis.ConnectionError, aioredis.TimeoutError,
                    KafkaError, asyncio.TimeoutError) as exc:
                # Redis or broker away: keep the batch (offsets not committed) and retry with backoff.
                M.redis_errors.inc()
                log.error("batch failed (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:  # a bug: the batch is not committed and is redelivered after the restart
                log.critical("unexpected error processing a batch; exiting so it is redelivered", exc_info=True)
                logging.shutdown()
                os._exit(70)

    if settings.ingest == "faust":
        @app.agent(settlements, name="settle")
        async def settle(stream):
            async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
                t0 = time.perf_counter()
                msgs = [Message(e.value, headers_dict(e.headers), e.message.topic, e.message.partition,
                                e.message.offset, e.key, e.message.timestamp) for e in events]
                res = await handle_batch(msgs)  # acked (committed) by take_events after this returns
                _observe_batch(app.consumer, msgs, res, t0)
    else:
        ingest = DirectIngest(settings, handle_batch, processor.parse, processor.prepare, processor.execute)
        app.claimwatch["ingest"] = ingest  # type: ignore[index]
        app.service(ingest)

    @app.timer(interval=5.0)
    async def reload_rules() -> None:
        mt = _mtime(settings.rules_path)
        if mt == state["mtime"]:
            return
        state["mtime"] = mt
        try:
            new = load_rules(settings.rules_path, lang=settings.lang)
        except ConfigError as exc:
            M.rules_reload_errors.inc()
            log.error("rule configuration refused, keeping version %s: %s", processor.rules.version, exc)
            return
        old = {d.rule: d for d in processor.rules.detectors}
        for d in new.detectors:
            if hasattr(d, "adopt_state") and d.rule in old:
                d.adopt_state(old[d.rule])  # keep online models' learning across a reload
        processor.rules = new
        state["rules"] = new
        M.rules_version.clear()
        M.rules_version.labels(new.version).set(1)
        log.warning("rule configuration reloaded: version %s", new.version)

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json({"status": "ok", "pid": os.getpid()})

    @app.page("/readyz")
    async def readyz(web, request):
        checks: dict[str, Any] = {}
        async def check(name: str, ping: Any, timeout_s: float) -> bool:
            try:
                checks[name] = bool(await asyncio.wait_for(ping(), timeout_s))
            except Exception as exc:
                checks[name] = False
                checks[f"{name}_error"] = str(exc)[:200]
            return checks[name]

        ok = await check("redis", redis.ping, 2.0)
        ok = await check("broker", producer.ping, 3.0) and ok
        assigned = len(_settlement_assignment(app))
        checks["partitions_assigned"] = assigned
        ok = ok and assigned > 0
        if aux is not None:
            ok = await check("redis_aux", aux.ping, 2.0) and ok
        return web.json({"status": "ready" if ok else "not ready", **checks}, status=200 if ok else 503)

    @app.page("/metrics")
    async def metrics_page(web, request):
        body, ctype = M.render()
        return web.bytes(body, content_type=ctype.split(";")[0])

    return app


def _ts(iso_s: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso_s).timestamp()


def _settlement_assignment(app: faust.App) -> set:
    ingest = app.claimwatch.get("ingest")  # type: ignore[attr-defined]
    if ingest is not None:
        return ingest.assignment()
    return {tp for tp in app.consumer.assignment() if not tp.topic.endswith("__assignor-__leader")}


#: longest a batch's Redis round trip, or its publishing, may take before it is retried
BATCH_DEADLINE_S = 60.0


def _observe_batch(consumer, msgs: list[Message], res: BatchResult, t0: float) -> None:
    now = time.time()
    M.batch_size.observe(len(msgs))
    M.batch_duration.observe(time.perf_counter() - t0)
    M.redis_latency.observe(res.redis_s)
    topics: dict[str, int] = {}
    last: dict[tuple[str, int], int] = {}
    oldest = None
    for m in msgs:
        topics[m.topic] = topics.get(m.topic, 0) + 1
        k = (m.topic, m.partition)
        if m.offset > last.get(k, -1):
            last[k] = m.offset
        if m.timestamp and (oldest is None or m.timestamp < oldest):
            oldest = m.timestamp
    for topic, n in topics.items():
        M.settlements_consumed.labels(topic).inc(n)
    for run, n in res.processed.items():
        M.settlements_processed.labels("live" if run == "live" else "replay").inc(n)
        if run != "live":
            M.replay_processed.labels(run).inc(n)
    for run, n in res.late.items():
        M.late_events.labels("live" if run == "live" else "replay").inc(n)
    if oldest:
        M.processing_latency.observe(max(0.0, now - oldest))
    try:
        for (topic, part), off in last.items():
            hw = _highwater(consumer, topic, part)
            if hw is not None:
                M.consumer_lag.labels(topic, str(part)).set(max(0, hw - off - 1))
    except Exception:  # metrics never break processing
        pass


def _highwater(consumer, topic: str, part: int):
    from aiokafka import TopicPartition

    if hasattr(consumer, "highwater") and not isinstance(consumer, AIOKafkaConsumer):
        from faust.types import TP

        return consumer.highwater(TP(topic, part))
    return consumer.highwater(TopicPartition(topic, part))


def _mtime(p: Path) -> float:
    try:
        return Path(p).stat().st_mtime
    except OSError:
        return 0.0


#: the worker's garbage-collector thresholds: a batch creates hundreds of thousands of short-lived objects
#: (parsed events, Lua arguments, replies), and with Python's default (700) the collector ran thousands of
#: times per batch over every live object: parsing alone was 2x slower. Up to three batches are alive at
#: once (fetched, prepared, in Redis): with a young generation of 50,000 objects the collector still ran
#: 89 times over a 600,000-settlement replay, 4.7 s of the worker's 58 s of CPU, with pauses up to 317 ms,
#: only to find those batches alive; at 200,000 it ran once (86 ms). Cycles are still collected: at most
#: 200,000 container objects wait for the collector.
GC_THRESHOLDS = (200_000, 20, 20)


def tune_gc() -> None:
    """Freeze what start-up allocated (modules, rules, models) out of the collector's way; collect less often."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_worker(settings: Settings, *, web_port: int, loglevel: str = "warn") -> None:
    """Run one worker until SIGINT/SIGTERM."""
    rules = load_rules(settings.rules_path, lang=settings.lang)
    app = create_app(settings, rules, web_port=web_port)
    tune_gc()
    from stream.logs import logging_config

    level = {"crit": "CRITICAL", "warn": "WARNING"}.get(loglevel, loglevel.upper())
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, logging_config=logging_config(level))
    worker.execute_from_commandline()
