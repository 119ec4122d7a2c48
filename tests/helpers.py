"""Test helpers: build settlements, run the CLI, consume topics (a sink that collects)."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import uuid
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

# Verdicts of these rules depend on more than the events: prescriber_volume on when every partition's
# watermark passes a day (how a replay's partitions interleave), visit_frequency and cost_anomaly on the
# peer-group state (all partitions) at the moment a card is judged, ml_outlier on the model checkpoint a
# restarted worker resumes from. Tests comparing two runs exclude them (README, Guarantees: known gap).
TIMING_DEPENDENT = {"prescriber_volume", "ml_outlier", "visit_frequency", "cost_anomaly"}

TZ = timezone(timedelta(hours=8))
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=TZ).timestamp()
_seq = itertools.count(1)


def make_event(card: str = "C1", inst: str = "P001", t: float = T0, **over: Any) -> dict:
    """A valid settlement (pharmacy purchase) with overridable fields."""
    ev = {
        "event_id": over.pop("event_id", f"T{next(_seq):08d}"),
        "event_time": datetime.fromtimestamp(t, TZ).isoformat(),
        "card_id": card, "institution_id": inst, "institution_type": "pharmacy", "district": "310101",
        "visit_type": "pharmacy", "physician_id": None,
        "items": [{"code": "XB01ACA002", "name": "硫酸氢氯吡格雷片", "category": "drug", "quantity": 1,
                   "amount": 96.0, "days_supply": 28}],
        "total_amount": 96.0, "fund_paid": 67.2, "self_paid": 28.8,
    }
    ev.update(over)
    return ev


def dumps(ev: dict) -> bytes:
    return orjson.dumps(ev)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "claimwatch", *args], env=env, cwd=cwd, capture_output=True,
                          timeout=timeout)


async def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes | None] | None = None,
                  headers: list[tuple[str, bytes]] | None = None) -> None:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await p.start()
    try:
        for i, v in enumerate(values):
            await p.send(topic, v, key=keys[i] if keys else None, headers=headers)
        await p.flush()
    finally:
        await p.stop()


async def consume_until(bootstrap: str, topic: str, pred, timeout_s: float = 60.0) -> list:
    """Read ``topic`` from the beginning until ``pred(records)`` is true; return the records."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         enable_auto_commit=False, group_id=None)
    await c.start()
    out: list = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            batch = await c.getmany(timeout_ms=500)
            for recs in batch.values():
                out.extend(recs)
            if pred(out):
                return out
        return out
    finally:
        await c.stop()


@pytest.fixture
def event_factory():
    return make_event


def run_state(redis_sync, rid: str) -> dict[str, object]:
    """Every key of a run (prefix made neutral): hashes as dicts (byte values), other keys by type."""
    out: dict[str, object] = {}
    for k in redis_sync.scan_iter(match=f"cw:{rid}:*"):
        name = k.decode("utf-8", "surrogateescape").replace(rid, "RUN")
        out[name] = redis_sync.hgetall(k) if redis_sync.type(k) == b"hash" else redis_sync.type(k)
    return out


def once_and_twice(process, rules, redis_sync, batches: list[list[bytes]]) -> list[tuple[list, dict, int]]:
    """Run ``batches`` in a fresh run twice: each settlement once in its batch, then twice (a card's only
    settlement of a batch takes a rule's first-settlement path, a repeated one the script's own). Per run:
    the alerts' content, the run's Redis state (:func:`run_state`) and the HSETNX calls it made."""
    runs = []
    for twice in (False, True):
        rid = f"t{uuid.uuid4().hex[:10]}"
        calls = redis_sync.info("commandstats").get("cmdstat_hsetnx", {}).get("calls", 0)
        res = process(rules, [[b for b in batch for _ in range(1 + twice)] for batch in batches], rid)
        alerts = {a.alert_id: a for r in res for a in r.alerts}.values()
        content = sorted((a.rule, a.subject_id, a.summary, str(a.metrics), tuple(a.evidence_event_ids), a.score)
                         for a in alerts)
        calls = redis_sync.info("commandstats").get("cmdstat_hsetnx", {}).get("calls", 0) - calls
        runs.append((content, run_state(redis_sync, rid), calls))
    return runs
