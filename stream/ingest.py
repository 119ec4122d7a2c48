"""The settlement hot path: a batched aiokafka consumer and producer running inside the Faust app.

Why not a Faust agent? Faust moves every message through its conductor, channel and stream
one at a time (several asyncio hops per event); measured here it tops out near 10,000
events/s with no work at all, below the city's needs once detectors run. The Faust app still
provides the worker (web server with /metrics, timers for rule reloads, the verdicts agent);
settlements are fetched a batch at a time (``getmany``), processed with one Redis round trip,
their alerts and dead letters produced and acknowledged, and only then are the batch's offsets
committed. ``CLAIMWATCH_INGEST=faust`` switches to the agent (``take_events``) for comparison.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from mode import Service

from claimwatch.settings import Settings
from stream.pipeline import BatchResult, Message, Pending

log = logging.getLogger("claimwatch.ingest")


class Producer:
    """One aiokafka producer for alerts and dead letters (batched, acks=all)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._p: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._p = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap_servers, linger_ms=5, acks="all",
                                   max_batch_size=512 * 1024, max_request_size=8 * 1024 * 1024,
                                   request_timeout_ms=30_000, retry_backoff_ms=200)
        await self._p.start()

    async def stop(self) -> None:
        if self._p is not None:
            await self._p.stop()
            self._p = None

    async def send(self, topic: str, *, key: bytes | None, value: bytes, headers=None) -> asyncio.Future:
        assert self._p is not None, "producer not started"
        return await self._p.send(topic, value=value, key=key, headers=headers)

    async def ping(self) -> bool:
        assert self._p is not None
        await self._p.client.fetch_all_metadata()
        return True


class _Listener(ConsumerRebalanceListener):
    def __init__(self, ingest: "DirectIngest") -> None:
        self.ingest = ingest

    async def on_partitions_revoked(self, revoked) -> None:
        from stream import metrics as M

        log.info("partitions revoked: %s", sorted(revoked))
        for tp in revoked:
            try:
                M.consumer_lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        M.partitions_assigned.set(len(self.ingest.assignment()) - len(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        from stream import metrics as M

        log.info("partitions assigned: %s", sorted(assigned))
        M.partitions_assigned.set(len(self.ingest.assignment()))


class DirectIngest(Service):
    """Consume settlement topics in batches; commit offsets only after a batch is fully handled."""

    def __init__(self, settings: Settings, handle: Callable[..., Awaitable[BatchResult]],
                 parse: Callable | None = None, prepare: Callable[..., Awaitable[Pending]] | None = None,
                 execute: Callable[[Pending], Awaitable[Pending]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.handle = handle
        self.parse = parse
        self.prepare = prepare
        self.execute = execute
        self.consumer: AIOKafkaConsumer | None = None
        #: clear while a batch is being written to Redis: the fetcher's long synchronous steps (parse,
        #: prepare) wait for it, or they would hold the event loop with Redis idle and the batch unsent
        self._sent = asyncio.Event()
        self._sent.set()

    def assignment(self) -> set:
        return set(self.consumer.assignment()) if self.consumer is not None else set()

    async def on_start(self) -> None:
        from stream.topics import ensure_topics

        s = self.settings
        try:
            await ensure_topics(s.bootstrap_servers, [s.topic_settlements, s.topic_replay, s.topic_alerts,
                                                      s.topic_dlq], s.topic_partitions)
            await ensure_topics(s.bootstrap_servers, [s.topic_verdicts], 1)
        except Exception as exc:  # the broker may refuse (ACLs) or be away: topics may exist already
            log.warning("could not ensure topics: %s", exc)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers, group_id=f"{s.app_id}-settlements",
            enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_bytes=s.consumer_max_fetch_bytes, max_partition_fetch_bytes=s.consumer_max_fetch_bytes // 2,
            max_poll_records=s.batch_max, fetch_max_wait_ms=int(s.batch_within_s * 1000),
            session_timeout_ms=int(s.session_timeout_s * 1000), rebalance_timeout_ms=int(s.rebalance_timeout_s * 1000),
            heartbeat_interval_ms=int(min(3.0, s.session_timeout_s / 4) * 1000),
            max_poll_interval_ms=600_000)
        await self.consumer.start()
        self.consumer.subscribe([s.topic_settlements, s.topic_replay], listener=_Listener(self))

    async def on_stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    @Service.timer(10.0)
    async def _refresh_lag(self) -> None:
        """Lag of every assigned partition, even when no batch arrives (a stuck worker shows growing lag)."""
        from stream import metrics as M

        c = self.consumer
        if c is None:
            return
        try:
            tps = list(c.assignment())
            if not tps:
                return
            end = await c.end_offsets(tps)
            for tp in tps:
                committed = await c.committed(tp)
                pos = committed if committed is not None else 0
                M.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, end[tp] - pos))
        except Exception as exc:  # never let metrics break ingestion
            log.debug("lag refresh failed: %s", exc)

    @Service.task
    async def _run(self) -> None:
        """Fetch, parse and prepare batches (one waits, prepared, for Redis) while :meth:`_drive` runs them."""
        c = self.consumer
        assert c is not None
        timeout_ms = int(self.settings.batch_within_s * 1000)
        ready: asyncio.Queue = asyncio.Queue(maxsize=1)
        driver = asyncio.ensure_future(self._drive(c, ready))
        try:
            while not self.should_stop:
                if driver.done():
                    driver.result()  # a driver failure is a worker failure
                try:
                    got = await c.getmany(timeout_ms=timeout_ms, max_records=self.settings.batch_max)
                except KafkaError as exc:
                    log.error("fetch failed (%s); retrying", exc)
                    await asyncio.sleep(1.0)
                    continue
                if not got:
                    continue
                t0 = time.perf_counter()
                await self._sent.wait()
                msgs: list[Message] = []
                offsets: dict[TopicPartition, int] = {}
                for tp, recs in got.items():
                    topic, part = tp.topic, tp.partition
                    msgs.extend([Message(r.value, dict(r.headers) if r.headers else {}, topic, part, r.offset, r.key,
                                         r.timestamp / 1000.0 if r.timestamp else None) for r in recs])
                    offsets[tp] = recs[-1].offset + 1
                await self._sent.wait()
                parsed = self.parse(msgs) if self.parse is not None else None
                await self._sent.wait()
                pending = await self._prepare(parsed)
                await ready.put([msgs, offsets, parsed, t0, pending])
        finally:
            if not driver.done():  # drain: the driver handles what is queued, then stops
                try:
                    await asyncio.wait_for(ready.put(None), timeout=30)
                    await asyncio.wait_for(asyncio.shield(driver), timeout=60)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    driver.cancel()  # uncommitted batches are redelivered: nothing is lost

    async def _drive(self, c: AIOKafkaConsumer, ready: asyncio.Queue) -> None:
        """Run prepared batches in order, keeping Redis busy: as soon as batch N's round trip ends,
        batch N+1 (if fetched) is sent, then N's replies become alerts, are published and committed.
        Offsets are committed in batch order, each after its batch was fully handled."""
        try:
            await self._drive_batches(c, ready)
        except Exception:  # a bug: crash-only, the uncommitted batches are redelivered after the restart
            log.critical("batch driver failed; exiting so uncommitted batches are redelivered", exc_info=True)
            logging.shutdown()
            os._exit(70)

    async def _drive_batches(self, c: AIOKafkaConsumer, ready: asyncio.Queue) -> None:
        inflight: list | None = None
        while True:
            if inflight is None:
                inflight = await ready.get()
                if inflight is None:
                    return
                await self._execute(inflight[4])
            pending = inflight[4]
            if pending is not None:
                await pending.wait()
            nxt = ready.get_nowait() if not ready.empty() else False
            if nxt and pending is not None and not pending.failed():
                await self._execute(nxt[4])  # Redis starts on N+1 before N is collected and published
            await self._finish(c, inflight)
            if nxt is None:
                return
            inflight = nxt or None
            if inflight is not None:
                await self._execute(inflight[4])

    async def _prepare(self, parsed) -> Pending | None:
        """Queue a batch's Redis work; on trouble leave it to ``handle`` (which retries)."""
        if self.prepare is None or parsed is None:
            return None
        try:
            return await self.prepare(parsed, gate=self._sent.wait)
        except Exception as exc:  # Redis away (loading scripts): handle() retries with backoff
            log.warning("could not prepare a batch for Redis yet (%s)", exc)
            return None

    async def _execute(self, pending: Pending | None) -> None:
        """Send a prepared batch to Redis; on trouble leave it unsent to ``handle`` (which retries)."""
        if pending is not None and self.execute is not None:
            self._sent.clear()
            try:
                await self.execute(pending)
            except Exception as exc:
                log.warning("could not send a batch to Redis yet (%s)", exc)
            finally:
                self._sent.set()

    async def _finish(self, c: AIOKafkaConsumer, inflight) -> None:
        from stream.app import _observe_batch

        msgs, offsets, parsed, t0, pending = inflight
        res = await self.handle(msgs, parsed, pending)
        try:
            await c.commit(offsets)
        except CommitFailedError as exc:  # rebalanced meanwhile: the new owner reprocesses, idempotently
            log.warning("offset commit failed after a rebalance (%s); batch will be redelivered", exc)
        except KafkaError as exc:
            log.error("offset commit failed (%s); batch may be redelivered", exc)
        _observe_batch(c, msgs, res, t0)
