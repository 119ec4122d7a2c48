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
