"""Batch processing, independent of the transport: a fetched batch in, alerts and dead letters out.

One Redis round trip per batch for all detectors (each queues its Lua script on a
shared pipeline), whatever the number of events. The Faust agent in
:mod:`stream.app` and the tests drive the same :class:`Processor`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson

from alerts.model import Alert
from redis.exceptions import NoScriptError, ResponseError

from alerts.exemptions import ExemptionRegistry
from alerts.model import to_json
from detectors.base import CARD_HASHES, TOUCH_LUA, Detector, Namespace
from detectors.drugs import is_placeholder
from detectors.config import RuleSet
from stream.events import InvalidEvent, Settlement, parse_event
from stream.topics import CONTROL_EOF, H_CONTROL, H_RUN_ID, LIVE_RUN

log = logging.getLogger("claimwatch.pipeline")

_TOUCH_SHA = Detector.sha(TOUCH_LUA)

#: alerts computed but not yet published and stored (alert_id -> alert JSON)
OUTBOX_KEY = "cw:outbox"


@dataclass
class Message:
    """One consumed record, transport-neutral."""

    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    topic: str = ""
    partition: int = 0
    offset: int = -1
    key: bytes | None = None
    timestamp: float | None = None  # broker append time, seconds


@dataclass
class DeadLetter:
    message: Message
    reason: str
    run_id: str


@dataclass
class BatchResult:
    alerts: list[Alert] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    eofs: list[tuple[str, str, int]] = field(default_factory=list)  # (run_id, topic, partition)
    processed: dict[str, int] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)
    late: dict[str, int] = field(default_factory=dict)
    data_quality: dict[tuple[str, str], Counter] = field(default_factory=dict)  # (run, field) -> institution counts
    redis_s: float = 0.0

    @property
    def published_alerts(self) -> list[Alert]:
        return [a for a in self.alerts if not a.suppressed]


@dataclass
class Pending:
    """A batch whose Redis round trip is under way (see :meth:`Processor.submit`)."""

    by_run: dict[str, list[Settlement]]
    res: BatchResult
    plan: list[tuple[Any, Namespace, list[Settlement], int, int, int]]  # det, ns, events, pipe, first reply, replies
    pipe: Any  # the queued pipelines, one per Redis (None: nothing to send)
    task: "asyncio.Future | None"  # their round trips, once sent: one list of replies per pipeline
    t0: float

    def failed(self) -> bool:
        return self.task is not None and self.task.done() and not self.task.cancelled() and self.task.exception() is not None

    async def wait(self) -> None:
        """Until the round trip ended, whatever its outcome (:meth:`Processor.finish` raises its error)."""
        if self.task is not None:
            await asyncio.wait([self.task])


async def send_pipeline(pipe: Any) -> "asyncio.Future[list[Any]]":
    """Write a queued (non-transactional) redis-py pipeline's commands now; a task reads the replies.

    ``await pipe.execute()`` as a task would write only when the event loop next runs it. The replies
    are those of ``pipe.execute()``: response callbacks applied, the first error raised after every
    reply was read (the connection never desyncs); a broken connection is dropped, not reused.
    """
    cmds = list(pipe.command_stack)  # kept on the pipe: a failed send can be sent again
    pool = pipe.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(conn.pack_commands([args for args, _ in cmds]))
    except BaseException:
        await conn.disconnect()
        await pool.release(conn)
        raise

    async def replies() -> list[Any]:
        out: list[Any] = []
        try:
            for args, options in cmds:
                try:
                    out.append(await pipe.parse_response(conn, args[0], **options))
                except ResponseError as exc:
                    out.append(exc)
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        for i, r in enumerate(out):
            if isinstance(r, ResponseError):
                pipe.annotate_exception(r, i + 1, cmds[i][0])
                raise r
        return out

    return asyncio.ensure_future(replies())


async def send_pipelines(pipes: Sequence[Any]) -> "asyncio.Future[list[list[Any]]]":
    """:func:`send_pipeline` for pipelines on different Redis servers, all written now: a task reads every
    reply (the replies of each pipeline, in order) and raises the first error once all round trips ended."""
    futs = []
    for p in pipes:
        try:
            futs.append(await send_pipeline(p))
        except BaseException:
            for f in futs:   # a failed write: the ones already sent are read, not left dangling
                f.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
    async def every() -> list[list[Any]]:
        done = await asyncio.gather(*futs, return_exceptions=True)
        for r in done:
            if isinstance(r, BaseException):
                raise r
        return list(done)
    return asyncio.ensure_future(every())


def headers_dict(headers: Any) -> dict[str, bytes]:
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, dict) else headers
    return {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in items}


_RUN_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def run_id_of(headers: dict[str, bytes]) -> str:
    """The run a message belongs to: its ``cw-run-id`` header, ``live`` without one.

    A header that is not a valid run id (it names Redis keys) is mapped to ``invalid-run`` so it
    can never address another run's state.
    """
    raw = headers.get(H_RUN_ID)
    if not raw:
        return LIVE_RUN
    rid = _RUN_IDS.get(raw)
    if rid is None:
        rid = raw.decode("utf-8", "replace")
        if len(rid) > 64 or not set(rid) <= _RUN_OK or rid[0] in "._-":
            rid = "invalid-run"
        if len(_RUN_IDS) < 10_000:  # every message of a run carries the same header
            _RUN_IDS[raw] = rid
    return rid


_RUN_IDS: dict[bytes, str] = {}


class Processor:
    """Parse, validate and run every detector over a batch (see module docstring)."""

    def __init__(self, rules: RuleSet, redis: Any, *, max_event_bytes: int = 256 * 1024,
                 future_tolerance_s: float = 86_400, aux: Any = None, aux_rules: frozenset[str] = frozenset()) -> None:
        self.rules = rules
        self.redis = redis
        #: a second Redis (``CLAIMWATCH_REDIS_AUX_URL``) holding the state of the rules in ``aux_rules``: each
        #: batch makes one round trip to each, sent together, so the two Redis processes work in parallel
        self.aux = aux if aux_rules else None
        self.aux_rules = frozenset(aux_rules) if aux is not None else frozenset()
        self.max_event_bytes = max_event_bytes
        self.future_tolerance_s = future_tolerance_s
        self._loaded: set[str] = set()
        self._want: tuple[Any, set[str]] = (None, set())
        self.exemptions = ExemptionRegistry()
        self.outbox = False  # the worker turns it on; in-process runs (tests, quality) need none
        self._watermarks: dict[tuple[str, str, int], float] = {}

    async def load_scripts(self) -> None:
        """Load every detector's Lua scripts (again after a Redis restart emptied the script cache)."""
        for src in (TOUCH_LUA, *(src for det in self.rules.detectors for src in det.scripts)):
            sha = await self.redis.script_load(src)
            if self.aux is not None:
                await self.aux.script_load(src)
            self._loaded.add(sha)

    def parse(self, msgs: Sequence[Message]) -> tuple[dict[str, list[Settlement]], BatchResult]:
        res = BatchResult()
        by_run: dict[str, list[Settlement]] = {}
        now = time.time()
        max_bytes, tolerance, lateness = self.max_event_bytes, self.future_tolerance_s, self.rules.lateness_s
        processed = res.processed
        watermarks = self._watermarks
        # a fetched batch comes partition by partition: the current partition's run, list and watermark
        # stay in locals until the partition (or run) changes
        wk: tuple[str, str, int] | None = None
        wm = 0.0
        out: list[Settlement] = []
        for m in msgs:
            headers = m.headers
            run = run_id_of(headers)
            if headers.get(H_CONTROL) == CONTROL_EOF:
                res.eofs.append((run, m.topic, m.partition))
                continue
            try:
                if m.value is None:
                    raise InvalidEvent("empty message (no value)")
                ev = parse_event(m.value, max_bytes=max_bytes, future_tolerance_s=tolerance, now=now)
            except InvalidEvent as exc:
                res.dead_letters.append(DeadLetter(m, str(exc), run))
                res.invalid[run] = res.invalid.get(run, 0) + 1
                continue
            except Exception as exc:  # whatever a hostile message does, it is dead-lettered, never fatal
                res.dead_letters.append(DeadLetter(m, f"unparseable message ({type(exc).__name__})", run))
                res.invalid[run] = res.invalid.get(run, 0) + 1
                continue
            part = ev.partition = m.partition
            processed[run] = processed.get(run, 0) + 1
            if wk is None or wk[2] != part or wk[0] != run or wk[1] != m.topic:
                if wk is not None:
                    watermarks[wk] = wm
                wk = (run, m.topic, part)
                wm = watermarks.get(wk, 0.0)
                out = by_run.setdefault(run, [])
            ts = ev.ts
            if ts > wm:
                wm = ts
            elif ts < wm - lateness:
                res.late[run] = res.late.get(run, 0) + 1
            if self._data_quality(ev, run, res):
                continue  # no usable subject: counted as a data-quality finding, never blamed on anyone
            out.append(ev)
        if wk is not None:
            watermarks[wk] = wm
        for run in [r for r, evs in by_run.items() if not evs]:
            del by_run[run]  # a run whose only events were unusable has nothing to run
        return by_run, res

    @staticmethod
    def _data_quality(ev: Settlement, run: str, res: BatchResult) -> bool:
        """Count placeholder ids; return True when the card itself is unusable."""
        card, inst = is_placeholder(ev.card_id), is_placeholder(ev.institution_id)
        # over-the-counter sale: no physician is normal
        phys = ev.physician_id is not None and is_placeholder(ev.physician_id)
        if not (card or inst or phys):
            return False
        for fld, bad in (("card_id", card), ("institution_id", inst), ("physician_id", phys)):
            if bad:
                res.data_quality.setdefault((run, fld), Counter())[ev.institution_id] += 1
        return card or inst

    async def process(self, msgs: Sequence[Message]) -> BatchResult:
        """Parse and run a batch (see :meth:`run`)."""
        return await self.run(self.parse(msgs))


    async def run(self, parsed: tuple[dict[str, list[Settlement]], BatchResult]) -> BatchResult:
        """Run parsed events through every detector with one Redis round trip; safe to retry."""
        return await self.finish(await self.submit(parsed))

    async def submit(self, parsed: tuple[dict[str, list[Settlement]], BatchResult]) -> "Pending":
        """Queue every detector's work for a parsed batch and send it to Redis; :meth:`finish` collects.

        The round trip runs as a task, so the caller can do other work meanwhile (the worker
        publishes the previous batch and parses the next one while Redis runs this one). Submit
        a batch only after the previous batch's round trip completed: per-card order is batch order.
        """
        return await self.execute(await self.prepare(parsed))

    async def prepare(self, parsed: tuple[dict[str, list[Settlement]], BatchResult], *,
                      gate: Any = None) -> "Pending":
        """Queue a parsed batch's Redis work without sending it (:meth:`execute` sends): the worker
        prepares batch N+1 while Redis still runs batch N, so Redis never waits for Python to build it."""
        by_run, res = parsed
        res.alerts = []
        if self._want[0] is not self.rules:  # the scripts' digests, once per rule set (reloads replace it)
            self._want = (self.rules, {Detector.sha(src) for det in self.rules.detectors for src in det.scripts}
                          | {_TOUCH_SHA})
        if by_run and not self._want[1] <= self._loaded:
            await self.load_scripts()
        return await self._queue(by_run, res, gate)

    @staticmethod
    async def execute(pending: "Pending") -> "Pending":
        """Send a prepared batch to Redis; returns once its commands are written (replies are read by a task).

        Writing before returning matters: the caller goes on with long synchronous work (collecting and
        publishing the previous batch), and a pipeline left to a task would sit unsent in the event loop
        meanwhile, leaving Redis idle."""
        if pending.pipe is not None and pending.task is None:
            pending.t0 = time.perf_counter()
            pending.task = await send_pipelines(pending.pipe)
        return pending

    async def finish(self, pending: "Pending") -> BatchResult:
        """Wait for a submitted batch's replies and turn them into alerts (outbox written when on)."""
        try:
            replies = await (await self.execute(pending)).task if pending.pipe is not None else []
        except NoScriptError:  # Redis restarted and lost its script cache: load and redo (idempotent)
            self._loaded.clear()
            await self.load_scripts()
            pending = await self.execute(await self._queue(pending.by_run, pending.res))
            replies = await pending.task if pending.task is not None else []
        res = pending.res
        res.redis_s = time.perf_counter() - pending.t0
        for det, ns, events, pi, start, k in pending.plan:
            res.alerts.extend(det.collect(events, replies[pi][start:start + k] if k else [], ns))
        if len(self.exemptions):
            res.alerts = [self._exempt(a) for a in res.alerts]
        if res.alerts and self.outbox:
            # Outbox: some rules fire once (a swept day, a month bucket) and record that in Redis; a crash
            # before the alert is published would lose it, since the redelivered batch no longer fires.
            # The alerts wait here until published and stored (see stream.app); a restarted worker drains it.
            await self.redis.hset(OUTBOX_KEY, mapping={a.alert_id: to_json(a) for a in res.alerts})
        return res

    async def _queue(self, by_run: dict[str, list[Settlement]], res: BatchResult, gate: Any = None) -> "Pending":
        """Queue every detector's work for a batch on one pipeline per Redis (not sent), giving the event loop a
        turn after each detector: a batch whose round trip just ended is then followed by the next one within
        one detector's queueing time, not a whole batch's. ``gate``: awaited before going on (the worker holds
        it while writing a batch to Redis)."""
        plan: list[tuple[Any, Namespace, list[Settlement], int, int, int]] = []
        t0 = time.perf_counter()
        pipes = [self.redis.pipeline(transaction=False)]
        if self.aux is not None:
            pipes.append(self.aux.pipeline(transaction=False))
        where = [1 if det.rule in self.aux_rules else 0 for det in self.rules.detectors]
        card_ttls = [self.card_ttls(on) for on in range(len(pipes))]
        counts = [0] * len(pipes)
        for run, events in by_run.items():
            ns = Namespace(run)
            for det, pi in zip(self.rules.detectors, where):
                k = det.queue(pipes[pi], events, ns)
                plan.append((det, ns, events, pi, counts[pi], k))
                counts[pi] += k
                await asyncio.sleep(0)
                if gate is not None:
                    await gate()
            cards_json = None
            for pi, ttls in enumerate(card_ttls):
                if ttls and counts[pi]:
                    cards_json = cards_json or orjson.dumps(list(dict.fromkeys(ev.card_id for ev in events)))
                    for h, ttl in ttls.items():  # after the rules' scripts: new card hashes get their TTL too
                        pipes[pi].evalsha(_TOUCH_SHA, 0, ns.card_prefix(h), ttl, cards_json)
                        counts[pi] += 1
        if not any(counts):
            return Pending(by_run, res, plan, None, None, t0)
        # (a pipeline with nothing queued is not sent; the plan's indexes count the ones sent)
        sent = [i for i, k in enumerate(counts) if k]
        plan = [(det, ns, evs, sent.index(pi) if counts[pi] else 0, st, k) for det, ns, evs, pi, st, k in plan]
        return Pending(by_run, res, plan, [pipes[i] for i in sent], None, t0)

    def card_ttls(self, on: int | None = None) -> dict[str, int]:
        """TTL of each per-card hash in use: the largest ``card_ttl_s`` of the detectors keeping state there
        (``on``: only the detectors on the main Redis, 0, or on the aux Redis, 1)."""
        out: dict[str, int] = {}
        for det in self.rules.detectors:
            h = det.card_hash
            if on is not None and (det.rule in self.aux_rules) != (on == 1):
                continue
            if h:
                if h not in CARD_HASHES:
                    raise ValueError(f"{det.rule}: card_hash must be one of {CARD_HASHES}, got {h!r}")
                out[h] = max(out.get(h, 1), int(det.card_ttl_s))
        return out

    def _exempt(self, a: Alert) -> Alert:
        from datetime import datetime

        import msgspec

        hit = self.exemptions.match(a.subject_id, a.rule, datetime.fromisoformat(a.window_end).timestamp())
        if hit is None:
            return a
        return msgspec.structs.replace(a, suppressed=True, metrics={**a.metrics, "exemption": hit})
