"""End to end through the real broker, a real worker process and the real Redis."""

from __future__ import annotations

import asyncio
import json
import uuid

import orjson

from alerts.store import AlertStore
from tests.helpers import T0, consume_until, make_event, produce


def test_live_settlements_become_alerts_on_the_topic_and_in_the_store(settings, worker):
    card = "LIVE" + uuid.uuid4().hex[:8]
    evs = [orjson.dumps(make_event(card, f"P{k:03d}", T0 + k * 1200)) for k in range(13)]
    bad = b'{"event_id": "broken-' + card.encode() + b'", "card_id": 5}'
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_settlements, evs + [bad, evs[0]],
                        keys=[card.encode()] * 15))

    def mine(recs):
        return [r for r in recs if orjson.loads(r.value)["subject_id"] == card
                and orjson.loads(r.value)["rule"] == "card_hopping"]

    recs = asyncio.run(consume_until(settings.bootstrap_servers, settings.topic_alerts, lambda rs: mine(rs), 60))
    got = mine(recs)
    assert got, "no alert on the alerts topic:\n" + worker.log_tail()
    a = orjson.loads(got[-1].value)
    assert a["rule"] == "card_hopping" and a["run_id"] == "live" and a["subject_type"] == "card"
    assert a["metrics"]["distinct_institutions"] >= 12
    assert got[-1].key == card.encode()

    dl = asyncio.run(consume_until(settings.bootstrap_servers, settings.topic_dlq,
                                   lambda rs: any(r.value == bad for r in rs), 30))
    [rec] = [r for r in dl if r.value == bad]  # original bytes, exactly once
    headers = dict(rec.headers)
    assert b"Expected `str`, got `int` - at `$.card_id`" in headers["cw-reason"]
    assert headers["cw-source-topic"] == settings.topic_settlements.encode()

    store = AlertStore(settings.store_url_resolved)
    stored = store.query(run_id="live", subject_id=card, rule="card_hopping")
    store.close()
    assert len(stored) == 1
    assert set(stored[0].evidence_event_ids) == {json.loads(e)["event_id"] for e in evs}


def test_worker_health_endpoint(worker):
    import urllib.request

    body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/healthz", timeout=5).read())
    assert body["status"] == "ok"


def test_metrics_and_readiness(settings, worker):
    import urllib.request

    base = f"http://127.0.0.1:{worker.web_port}"
    ready = json.loads(urllib.request.urlopen(base + "/readyz", timeout=10).read())
    assert ready["status"] == "ready" and ready["redis"] and ready["broker"] and ready["partitions_assigned"] >= 8
    body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    for name in ("claimwatch_settlements_consumed_total", "claimwatch_batch_duration_seconds_bucket",
                 "claimwatch_rules_info"):
        assert name in body
    assert "card_id" not in body


def test_verdict_cli_reaches_the_worker_and_the_store(settings, worker, cli_env):
    import time

    from tests.helpers import run_cli

    card = "VERD" + uuid.uuid4().hex[:8]
    evs = [orjson.dumps(make_event(card, f"P{k:03d}", T0 + k * 1200)) for k in range(13)]
    asyncio.run(produce(settings.bootstrap_servers, settings.topic_settlements, evs, keys=[card.encode()] * 13))
    store = AlertStore(settings.store_url_resolved)
    deadline = time.monotonic() + 60
    while not (found := store.query(run_id="live", subject_id=card, rule="card_hopping")):
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.3)
    aid = found[0].alert_id
    p = run_cli("alerts", "verdict", aid, "--fraud", "--author", "王审核", "--note", "已移送", env=cli_env)
    assert p.returncode == 0, p.stderr.decode()
    while not (got := store.query(subject_id=card, rule="card_hopping")[0]).metrics.get("verdict"):
        assert time.monotonic() < deadline + 30, worker.log_tail()
        time.sleep(0.3)
    assert got.metrics["verdict"]["verdict"] == "fraud" and got.metrics["verdict"]["author"] == "王审核"
    bad = run_cli("alerts", "verdict", "A-nope", "--fraud", "--author", "x", env=cli_env)
    assert bad.returncode == 1 and b"no alert" in bad.stderr
    store.close()


def test_a_worker_with_an_aux_redis_is_ready_on_both_and_keeps_the_aux_rules_state_there(settings, aux_redis,
                                                                                          tmp_path):
    """A worker process given CLAIMWATCH_REDIS_AUX_URL: /readyz checks both Redis servers, and a replay through it
    fires the aux rules with their state on the aux Redis only (the card hashes stay on the main one)."""
    import time
    import urllib.request

    import redis

    from claimwatch.runtime import WorkerProcess
    from replay import city
    from replay.runner import drop_run_state, replay_file
    from stream.topics import ensure_topics

    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={"app_id": f"cw-aux-{tag}", "topic_replay": f"settlements-replay-aux-{tag}",
                                    "data_dir": tmp_path / "data", "store_url": f"sqlite:///{tmp_path / 'alerts.db'}",
                                    "redis_aux_url": aux_redis})
    assert s.aux_rules == {"prescriber_volume", "trace_code_reuse", "card_ring"}   # the default list
    asyncio.run(ensure_topics(s.bootstrap_servers, [s.topic_replay], s.topic_partitions))
    events, _ = city.generate(cards=3000, days=7, seed=1)   # injects fraud for every built-in rule
    path = tmp_path / "city.jsonl"
    city.write(events, None, path)
    w = WorkerProcess(s, index=9, log_dir=tmp_path)
    run_id = f"aux-{tag}"
    try:
        deadline, ready = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            assert w.alive(), w.log_tail()
            try:
                ready = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{w.web_port}/readyz", timeout=5).read())
                break
            except OSError:
                time.sleep(0.3)
        assert ready.get("redis") is True and ready.get("redis_aux") is True, ready
        stats, alerts = replay_file(s, path, run_id, workers=0, keep_state=True)
    finally:
        w.stop()
    assert stats.processed == len(events)
    fired = {a.rule for a in alerts}
    assert {"prescriber_volume", "trace_code_reuse"} <= fired, fired

    def groups(url):
        r = redis.Redis.from_url(url)
        try:
            return {k.decode().split(":")[2] for k in r.scan_iter(match=f"cw:{run_id}:*", count=1000)}
        finally:
            r.close()
    on_main, on_aux = groups(s.redis_url), groups(aux_redis)
    assert on_aux and on_aux <= s.aux_rules, on_aux
    assert not on_main & s.aux_rules and {"c", "h"} <= on_main, on_main
    asyncio.run(drop_run_state(s.redis_urls, run_id))
    assert not groups(s.redis_url) and not groups(aux_redis)   # the run's state dropped on both
