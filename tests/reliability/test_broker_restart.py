"""The broker goes away for 30 s and comes back: the worker resumes by itself."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson

from alerts.store import AlertStore
from claimwatch.runtime import WorkerProcess
from stream.topics import ensure_topics
from tests.helpers import T0, make_event, produce
from tests.reliability.conftest import wait_ready

DOWN_S = 30.0


def _hopper(card):
    return [orjson.dumps(make_event(card, f"P{k:03d}", T0 + k * 1200)) for k in range(13)]


def _wait_alert(store, card, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store.query(run_id="live", subject_id=card, rule="card_hopping"):
            return True
        time.sleep(0.5)
    return False


def test_worker_resumes_after_the_broker_was_away_30_s(isolated, broker_restartable, tmp_path):
    s = isolated.model_copy(update={"kafka_url": broker_restartable.kafka_url})
    topics = [s.topic_settlements, s.topic_replay, s.topic_alerts, s.topic_dlq]
    asyncio.run(ensure_topics(s.bootstrap_servers, topics, s.topic_partitions))
    store = AlertStore(s.store_url_resolved)
    w = WorkerProcess(s, index=6, log_dir=tmp_path)
    try:
        wait_ready(w)
        before = "BEFORE" + uuid.uuid4().hex[:6]
        asyncio.run(produce(s.bootstrap_servers, s.topic_settlements, _hopper(before), [before.encode()] * 13))
        assert _wait_alert(store, before, 60), w.log_tail()

        broker_restartable.stop_broker()
        time.sleep(DOWN_S)
        assert w.alive(), "worker died while the broker was away:\n" + w.log_tail()
        broker_restartable.start_broker()
        asyncio.run(ensure_topics(s.bootstrap_servers, topics, s.topic_partitions))

        after = "AFTER" + uuid.uuid4().hex[:6]
        asyncio.run(produce(s.bootstrap_servers, s.topic_settlements, _hopper(after), [after.encode()] * 13))
        assert _wait_alert(store, after, 120), "no alert after the broker came back:\n" + w.log_tail(6000)
        assert w.alive()
    finally:
        w.stop()
        store.close()
