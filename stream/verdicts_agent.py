"""The ``verdicts`` agent: inspectors' verdicts in, a better-ranked alert queue out.

:func:`register` adds to the Faust app

* an agent on the ``verdicts`` topic (raw JSON, one verdict per message, see
  :mod:`alerts.verdicts`) that validates each verdict (a bad one is logged and counted,
  never fatal), looks its alert up in the store and records the verdict there
  (``AlertStore.set_verdict``), teaches the :class:`~alerts.verdicts.PriorityModel`, and
  saves the model in Redis (``cw:priority_model``, version in ``cw:priority_model:version``, verdicts learned in
  the hash ``cw:verdicts``);
  a verdict already learned (same alert, same content) is not learned again;
* a task that restores the model on start, a timer that adopts the model another worker
  saved (every 30 s), and a timer that re-ranks the live open alerts of the last 7 days
  after the model changed (every 5 min).

The worker calls :meth:`VerdictService.prioritise` on every batch's alerts before it stores
and publishes them, so each alert carries ``metrics["priority"]``.

The topic should have **one partition** (``ensure_topics([...'verdicts'], 1)``): one worker
then learns every verdict, in order, and the others follow its saved model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

from alerts.model import Alert
from alerts.verdicts import REDIS_KEY, SEEN_KEY, InvalidVerdict, PriorityModel, parse_verdict, verdict_json

log = logging.getLogger("claimwatch.verdicts")

REFRESH_S = 30.0
RERANK_S = 300.0
RERANK_WINDOW_S = 7 * 86400
RERANK_LIMIT = 20_000


from stream.metrics import verdicts as VERDICTS_TOTAL  # noqa: E402


class VerdictService:
    """Learns from verdicts and prioritises alerts; transport-free (the agent and tests drive it)."""

    def __init__(self, store: Any, redis: Any, model: PriorityModel | None = None, *,
                 model_key: str = REDIS_KEY, seen_key: str = SEEN_KEY) -> None:
        self.store = store
        self.redis = redis
        self.model = model or PriorityModel()
        self.model_key = model_key
        self.version_key = model_key + ":version"
        self.seen_key = seen_key
        self.counts: Counter[str] = Counter()
        self.version = 0          # of the model in Redis that self.model corresponds to
        self._ranked_version = -1
        self._learned: dict[str, bytes] = {}   # alert id -> verdict learned in memory (retry-safe)

    def _count(self, outcome: str) -> str:
        self.counts[outcome] += 1
        if VERDICTS_TOTAL is not None:
            VERDICTS_TOTAL.labels(outcome).inc()
        return outcome

    async def load(self) -> None:
        """Restore the persisted model (fresh when there is none)."""
        raw = await self.redis.get(self.version_key)
        self.model = await PriorityModel.load(self.redis, self.model_key)
        self.version = int(raw or 0)
        log.info("priority model restored: %d verdicts learned (version %d)", self.model.n_learned, self.version)

    async def refresh(self) -> bool:
        """Adopt the model another worker saved since; True when it changed."""
        raw = await self.redis.get(self.version_key)
        v = int(raw or 0)
        if v == self.version:
            return False
        self.model = await PriorityModel.load(self.redis, self.model_key)
        self.version = v
        return True

    async def handle(self, raw: bytes | str | None) -> str:
        """Process one message; return the outcome (``learned``, ``duplicate``, ``unknown_alert``, ``invalid``)."""
        try:
            v = parse_verdict(raw)  # type: ignore[arg-type]
        except InvalidVerdict as exc:
            shown = raw[:200] if isinstance(raw, (bytes, str)) else raw
            log.warning("invalid verdict refused (%s): %r", exc, shown)
            return self._count("invalid")
        payload = verdict_json(v)
        prev = await self.redis.hget(self.seen_key, v.alert_id)
        if prev == payload:
            return self._count("duplicate")
        if self._learned.get(v.alert_id) != payload:  # not when retrying a save that failed
            alert = await asyncio.to_thread(self.store.set_verdict, v.alert_id, v.verdict, v.author,
                                            v.time.isoformat(), v.note)
            if alert is None:
                log.warning("verdict for unknown alert %s by %s ignored", v.alert_id, v.author)
                return self._count("unknown_alert")
            self.model.learn(alert, v.fraud)
            self._learned[v.alert_id] = payload
            if len(self._learned) > 10_000:
                self._learned.pop(next(iter(self._learned)))
            log.info("verdict %s on %s (%s) by %s learned; %d verdicts so far", v.verdict, v.alert_id, alert.rule,
                     v.author, self.model.n_learned)
        blob = self.model.dumps()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.seen_key, v.alert_id, payload)
            pipe.set(self.model_key, blob)
            pipe.incr(self.version_key)
            res = await pipe.execute()
        self.version = int(res[-1])
        return self._count("learned")

    def prioritise(self, alerts: Sequence[Alert]) -> list[Alert]:
        """The hook the worker calls before storing / publishing: sets ``metrics["priority"]`` (0-1)."""
        if not alerts:
            return list(alerts)
        return self.model.prioritise(alerts)

    async def rerank_open(self, run_id: str = "live", window_s: float = RERANK_WINDOW_S,
                          limit: int = RERANK_LIMIT) -> int:
        """Recompute the priority of recent open alerts after the model changed; return how many changed."""
        if self._ranked_version == self.version:
            return 0
        since = (datetime.now(timezone.utc) - timedelta(seconds=window_s)).astimezone(
            timezone(timedelta(hours=8))).isoformat(timespec="seconds")

        def work() -> int:
            alerts = self.store.query(run_id=run_id, status="open", since=since, limit=limit)
            todo = {a.alert_id: self.model.priority(a) for a in alerts if "verdict" not in a.metrics}
            return self.store.set_priority(todo)

        n = await asyncio.to_thread(work)
        self._ranked_version = self.version
        return n


def register(app: Any, settings: Any, processor: Any, store: Any, redis: Any) -> VerdictService:
    """Add the verdicts agent and its timers to ``app``; return the service (call its ``prioritise``).

    ``processor`` is accepted for symmetry with the settlements agent; the service is also
    left on ``app.claimwatch["verdicts"]`` when the app carries that dict.
    """
    import redis.asyncio as aioredis

    topic_name = getattr(settings, "topic_verdicts", "verdicts")
    topic = app.topic(topic_name, value_serializer="raw", key_serializer="raw")
    svc = VerdictService(store, redis)
    holder = getattr(app, "claimwatch", None)
    if isinstance(holder, dict):
        holder["verdicts"] = svc

    @app.task
    async def _load_priority_model() -> None:
        try:
            await svc.load()
        except Exception as exc:  # Redis away at start: the refresh timer retries
            log.error("could not restore the priority model yet: %s", exc)

    @app.agent(topic, name="verdicts")
    async def verdicts(stream):
        async for value in stream:
            backoff = 0.5
            while True:
                try:
                    await svc.handle(value)
                    break
                except (ConnectionError, OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                    log.error("verdict not processed (%s); retrying in %.1f s", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                except Exception:  # never let one verdict stop the worker
                    log.error("verdict could not be processed; skipped", exc_info=True)
                    svc._count("error")
                    break

    @app.timer(interval=REFRESH_S)
    async def _refresh_priority_model() -> None:
        try:
            if await svc.refresh():
                log.info("priority model updated from Redis (version %d)", svc.version)
        except Exception as exc:
            log.error("priority model refresh failed: %s", exc)

    @app.timer(interval=RERANK_S)
    async def _rerank_open_alerts() -> None:
        t0 = time.perf_counter()
        try:
            n = await svc.rerank_open()
            if n:
                log.info("re-ranked %d open alerts in %.1f s", n, time.perf_counter() - t0)
        except Exception as exc:
            log.error("re-ranking open alerts failed: %s", exc)

    return svc
