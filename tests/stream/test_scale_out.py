"""Scale-out: two worker processes in one consumer group share a 4-partition topic on the real broker.

The two workers run with their own app id (so their own consumer group) and their own topics,
next to the session worker, which keeps consuming the default topics: nothing of one group reaches
the other. A generated city is replayed through the CLI once to the two workers and once to the
single session worker; the alerts must be the same.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from claimwatch.runtime import WorkerProcess, settings_env
from replay import city
from stream.topics import ensure_topics
from tests.helpers import TIMING_DEPENDENT, run_cli

PARTITIONS = 4
SCALE = {
    "app_id": "cw-scale",
    "topic_settlements": "cw-scale-settlements",
    "topic_replay": "cw-scale-replay",
    "topic_alerts": "cw-scale-alerts",
    "topic_dlq": "cw-scale-dlq",
    "topic_partitions": PARTITIONS,
}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:  # /readyz answers 503 while not ready
        return e.code, e.read().decode()


def readyz(w: WorkerProcess) -> dict:
    status, body = _get(f"http://127.0.0.1:{w.web_port}/readyz")
    d = json.loads(body)
    d["http_status"] = status
    return d


def consumed(w: WorkerProcess, topic: str) -> float:
    """This worker's ``claimwatch_settlements_consumed_total{topic=...}`` from its own /metrics."""
    _, body = _get(f"http://127.0.0.1:{w.web_port}/metrics")
    m = re.search(r'^claimwatch_settlements_consumed_total\{topic="%s"\} (\S+)$' % re.escape(topic), body, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def scale_settings(settings, tmp_path_factory):
    s = settings.model_copy(update={**SCALE, "data_dir": tmp_path_factory.mktemp("scale")})
    asyncio.run(ensure_topics(s.bootstrap_servers, [s.topic_settlements, s.topic_replay, s.topic_alerts,
                                                    s.topic_dlq], PARTITIONS))
    return s


@pytest.fixture(scope="module")
def two_workers(scale_settings):
    """Two ``claimwatch worker`` processes of app ``cw-scale``, each with its own data dir and web port."""
    procs = []
    try:
        for i in range(2):
            s = scale_settings.model_copy(update={"data_dir": Path(scale_settings.data_dir) / f"w{i}"})
            procs.append(WorkerProcess(s, index=i))
        # both ready, each with some partitions, together all of them: the group has settled
        want = 2 * PARTITIONS  # the live and the replay topic
        deadline = time.monotonic() + 60
        states: list = []
        while time.monotonic() < deadline:
            for w in procs:
                assert w.alive(), "scale worker exited:\n" + w.log_tail()
            try:
                states = [readyz(w) for w in procs]
            except (OSError, ValueError):
                time.sleep(0.5)
                continue
            counts = [st.get("partitions_assigned", 0) for st in states]
            if all(st["http_status"] == 200 for st in states) and all(counts) and sum(counts) == want:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the two workers never shared the {want} partitions: {states}\n"
                        + "\n".join(w.log_tail(2000) for w in procs))
        yield procs
    finally:
        for w in procs:
            w.stop()


@pytest.fixture(scope="module")
def city_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale-city")
    events, labels = city.generate(cards=5000, days=7, seed=17)
    city.write(events, labels, d / "city.jsonl.gz", d / "labels.json")
    return d / "city.jsonl.gz", labels


def _replay(path: Path, run_id: str, env: dict, out: Path) -> tuple[list[dict], float]:
    t0 = time.monotonic()
    p = run_cli("replay", str(path), "--run-id", run_id, "--workers", "0", "--alerts-out", str(out),
                env=env, timeout=180)
    assert p.returncode == 0, p.stderr.decode()
    return [json.loads(x) for x in out.read_text().splitlines()], time.monotonic() - t0


def _key(alerts: list[dict]) -> set[tuple]:
    """What must not depend on the number of workers: the rules outside TIMING_DEPENDENT (whose verdicts
    depend on how partitions interleave: README, Guarantees, known gap) alert on the same windows."""
    return {(a["rule"], a["subject_id"], a["window_start"], a["window_end"]) for a in alerts
            if a["rule"] not in TIMING_DEPENDENT}


def test_two_workers_share_the_partitions_and_alert_like_one(two_workers, scale_settings, worker, cli_env,
                                                             city_file, tmp_path):
    path, labels = city_file
    n = labels["n_events"]
    before = [consumed(w, scale_settings.topic_replay) for w in two_workers]

    two, t_two = _replay(path, "scale-two", settings_env(scale_settings), tmp_path / "two.jsonl")
    after = [consumed(w, scale_settings.topic_replay) for w in two_workers]
    done = [a - b for a, b in zip(after, before)]
    # both workers did part of the run (every partition of the replay topic carries cards), and
    # together they consumed every settlement (plus one end-of-run marker per partition)
    assert all(d > 0 for d in done), f"a worker consumed nothing of the run: {done}"
    assert sum(done) >= n + PARTITIONS, (done, n)
    for w in two_workers:
        st = readyz(w)
        assert st["status"] == "ready" and st["partitions_assigned"] > 0, st

    one, t_one = _replay(path, "scale-one", cli_env, tmp_path / "one.jsonl")  # the single session worker
    rules = Counter(a["rule"] for a in two)
    print(f"\n{n} settlements: two workers {t_two:.1f} s, one worker {t_one:.1f} s (CLI wall clock); "
          f"split {done}; alerts {dict(rules)}")

    assert two, "the replay raised no alert"
    assert _key(two) == _key(one), (f"only with two workers: {sorted(_key(two) - _key(one))[:5]}; "
                                    f"only with one: {sorted(_key(one) - _key(two))[:5]}")
    assert (sum(a["rule"] not in TIMING_DEPENDENT for a in two)
            == sum(a["rule"] not in TIMING_DEPENDENT for a in one))
    assert {a["run_id"] for a in two} == {"scale-two"} and {a["run_id"] for a in one} == {"scale-one"}
    hoppers = {f["subject_id"] for f in labels["frauds"] if f["rule"] == "card_hopping"}
    assert hoppers and hoppers <= {a["subject_id"] for a in two if a["rule"] == "card_hopping"}
    # same evidence, too: each alert is built from the same settlements whoever processed the card
    def k(a):
        return a["rule"], a["subject_id"], a["window_start"], a["window_end"]

    ev = {k(a): sorted(a["evidence_event_ids"]) for a in one}
    assert all(ev[k(a)] == sorted(a["evidence_event_ids"]) for a in two)
