"""A real Prometheus scrapes a real worker while a replay runs; the shipped config and rules pass promtool.

Prometheus and promtool are the Debian package ``prometheus`` (``make test`` installs it through
``scripts/install-system-deps.sh``; this module installs it itself when it runs as root with apt-get
and it is missing). The tests skip, saying so, only when it is absent and cannot be installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from stream.embedded import free_port
from tests.helpers import T0, make_event, run_cli

ROOT = Path(__file__).resolve().parent.parent
PROM_CONFIG = ROOT / "configs" / "prometheus" / "prometheus.yml"
PROM_RULES = ROOT / "configs" / "prometheus" / "rules"


def _find(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    p = Path("/usr/bin") / name
    return str(p) if p.exists() else None


@pytest.fixture(scope="module")
def prom_bins() -> tuple[str, str]:
    """(prometheus, promtool), installing the Debian package when missing and possible."""
    prom, tool = _find("prometheus"), _find("promtool")
    if prom and tool:
        return prom, tool
    why = "not root or no apt-get"
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        res = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
                             env=env, capture_output=True, text=True, timeout=600)
        # Debian starts its own daemon on :9090 where it can; these tests start theirs on a free port.
        subprocess.run(["systemctl", "stop", "prometheus"], capture_output=True, timeout=60)
        why = f"apt-get install prometheus exited {res.returncode}: {res.stderr[-500:]}"
        prom, tool = _find("prometheus"), _find("promtool")
        if prom and tool:
            return prom, tool
    pytest.skip(f"Prometheus is not installed and could not be installed ({why}); "
                "install the Debian package `prometheus` (make system-deps) to run these tests")


# --------------------------------------------------------------------------- a real Prometheus


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str, job: str = "claimwatch") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROM_RULES / "*.yml")],
            "scrape_configs": [{"job_name": job, "scrape_interval": "1s", "scrape_timeout": "1s",
                                "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited:\n" + self.log()
            try:
                if urllib.request.urlopen(self.base + "/-/ready", timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail("prometheus never became ready:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params) -> dict:
        url = f"{self.base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def scalar(self, promql: str) -> float | None:
        """The value of a query returning at most one series (None when it returns none)."""
        res = self.query(promql)
        assert len(res) <= 1, res
        return float(res[0]["value"][1]) if res else None

    def wait_for(self, promql: str, pred, timeout_s: float = 30.0) -> float | None:
        deadline = time.monotonic() + timeout_s
        v = None
        while time.monotonic() < deadline:
            v = self.scalar(promql)
            if pred(v):
                return v
            time.sleep(0.5)
        pytest.fail(f"{promql} never satisfied the condition; last value {v}\n" + self.log())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture
def prometheus(prom_bins, worker, tmp_path):
    p = Prometheus(prom_bins[0], tmp_path, f"127.0.0.1:{worker.web_port}")
    yield p
    p.stop()


def _replay_file(path: Path, card: str) -> int:
    """A hopping card (13 institutions in 4 h) and 30 ordinary cards, one settlement each; returns the count."""
    evs = [make_event(card, f"P{k:03d}", T0 + k * 1200) for k in range(13)]
    evs += [make_event(f"ORD{uuid.uuid4().hex[:8]}", f"P{100 + k:03d}", T0 + k * 5400) for k in range(30)]
    path.write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in evs) + "\n", encoding="utf-8")
    return len(evs)


def test_prometheus_sees_a_replay_move_the_counters_and_the_latency_histogram(prometheus, worker, cli_env,
                                                                                tmp_path):
    prom = prometheus
    # the worker is a healthy scrape target of the shipped job name
    prom.wait_for('up{job="claimwatch"}', lambda v: v == 1.0)
    targets = prom.api("targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets

    # the shipped rule files load into this real Prometheus
    groups = {g["name"]: g for g in prom.api("rules")["groups"]}
    assert {"claimwatch", "claimwatch-recording"} <= set(groups)
    loaded = {r["name"] for g in groups.values() for r in g["rules"]}
    assert {"ClaimwatchWorkerDown", "ClaimwatchNoSettlements", "ClaimwatchRedisErrors"} <= loaded
    assert all(not r.get("lastError") for g in groups.values() for r in g["rules"]), groups

    time.sleep(2.5)  # at least two scrapes before the replay: the baseline and rate() windows start here
    processed0 = prom.scalar("sum(claimwatch_settlements_processed_total) or vector(0)")
    batches0 = prom.scalar("claimwatch_batch_duration_seconds_count")
    alerts0 = prom.scalar('sum(claimwatch_alerts_total{rule="card_hopping"}) or vector(0)')
    assert batches0 is not None, "claimwatch_batch_duration_seconds_count not scraped"

    run = "prom-" + uuid.uuid4().hex[:8]
    card = "PROM" + uuid.uuid4().hex[:8]
    f = tmp_path / "small.jsonl"
    n = _replay_file(f, card)
    t_replay = time.monotonic()
    p = run_cli("replay", str(f), "--run-id", run, "--workers", "0", "--alerts-out", str(tmp_path / "a.jsonl"),
                env=cli_env, timeout=120)
    assert p.returncode == 0, p.stderr.decode() + worker.log_tail()
    print(f"replay of {n} events through the CLI: {time.monotonic() - t_replay:.1f} s")
    alerts = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert ("card_hopping", card) in {(a["rule"], a["subject_id"]) for a in alerts}
    assert {a["subject_id"] for a in alerts if a["rule"] == "card_hopping"} == {card}
    assert {a["run_id"] for a in alerts} == {run}

    # through Prometheus' HTTP API: exactly this run's events, more processed, more batches, more alerts
    prom.wait_for(f'claimwatch_replay_events_processed_total{{run="{run}"}}', lambda v: v == n)
    processed1 = prom.wait_for("sum(claimwatch_settlements_processed_total)", lambda v: v and v >= processed0 + n)
    assert processed1 - processed0 >= n
    assert prom.scalar('sum(claimwatch_settlements_processed_total{stream="replay"})') >= n
    assert prom.scalar("claimwatch_batch_duration_seconds_count") > batches0
    assert prom.wait_for('sum(claimwatch_alerts_total{rule="card_hopping"})', lambda v: v and v >= alerts0 + 1)

    # a latency percentile over the histogram's buckets is a number (seconds, loopback: small)
    for q in ("0.5", "0.99"):
        v = prom.scalar(f"histogram_quantile({q}, sum by (le) "
                        "(increase(claimwatch_processing_latency_seconds_bucket[1m])))")
        assert v is not None and math.isfinite(v) and 0 <= v < 60, (q, v)
    v = prom.scalar("histogram_quantile(0.9, sum by (le) (increase(claimwatch_batch_duration_seconds_bucket[1m])))")
    assert v is not None and math.isfinite(v) and v >= 0
    # the worker is not down, so the shipped worker-down alert is not pending or firing
    assert prom.query('ALERTS{alertname="ClaimwatchWorkerDown"}') == []


# --------------------------------------------------------------------------- promtool on the shipped files


def test_promtool_check_config_on_a_copy(prom_bins, tmp_path):
    cfg = yaml.safe_load(PROM_CONFIG.read_text(encoding="utf-8"))
    # rule_files point into the container (/etc/prometheus/rules): the copy points at the repo
    assert cfg["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    cfg["rule_files"] = [str(PROM_RULES / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    res = subprocess.run([prom_bins[1], "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    n_rules = sum(len(g["rules"]) for f in PROM_RULES.glob("*.yml")
                  for g in yaml.safe_load(f.read_text(encoding="utf-8"))["groups"])
    assert f"SUCCESS: {n_rules} rules found" in out


def test_promtool_check_rules(prom_bins):
    files = sorted(str(p) for p in PROM_RULES.glob("*.yml"))
    assert files
    res = subprocess.run([prom_bins[1], "check", "rules", *files], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"SUCCESS: \d+ rules found", res.stdout)


# --------------------------------------------------------------------------- the alert logic (promtool test rules)

# Synthetic series in, alerts out, evaluated by Prometheus' rule engine. Annotations are dropped
# from the rule copy under test (promtool compares them verbatim; test_dashboard checks them).
UNIT_TESTS = """
evaluation_interval: 1m
tests:
  - name: a worker stops answering scrapes
    interval: 1m
    input_series:
      - series: 'up{job="claimwatch", instance="worker-1:6066"}'
        values: '1 1 0 0 0 0 0 0'
      - series: 'up{job="claimwatch", instance="worker-2:6066"}'
        values: '1x8'
    alert_rule_test:
      - {eval_time: 3m, alertname: ClaimwatchWorkerDown, exp_alerts: []}
      - eval_time: 5m
        alertname: ClaimwatchWorkerDown
        exp_alerts:
          - exp_labels: {severity: critical, job: claimwatch, instance: "worker-1:6066"}

  - name: the live feed stops, then the workers too
    interval: 1m
    input_series:
      - series: 'claimwatch_settlements_processed_total{stream="live", instance="w1", job="claimwatch"}'
        values: '0+600x20 12000x40'
      - series: 'claimwatch_settlements_processed_total{stream="replay", instance="w1", job="claimwatch"}'
        values: '0+5000x60'
      - series: 'up{job="claimwatch", instance="w1"}'
        values: '1x50 0x10'
    alert_rule_test:
      - {eval_time: 20m, alertname: ClaimwatchNoSettlements, exp_alerts: []}
      - {eval_time: 37m, alertname: ClaimwatchNoSettlements, exp_alerts: []}
      - eval_time: 45m
        alertname: ClaimwatchNoSettlements
        exp_alerts:
          - exp_labels: {severity: critical}
      - {eval_time: 58m, alertname: ClaimwatchNoSettlements, exp_alerts: []}

  - name: lag above 10k and growing fires; high but steady lag does not
    interval: 1m
    input_series:
      - series: 'claimwatch_consumergroup_lag{topic="settlements", partition="0", instance="w1", job="claimwatch"}'
        values: '0+1000x40'
      - series: 'claimwatch_consumergroup_lag{topic="settlements-replay", partition="0", instance="w1", job="claimwatch"}'
        values: '50000x40'
    alert_rule_test:
      - {eval_time: 15m, alertname: ClaimwatchConsumerLagGrowing, exp_alerts: []}
      - eval_time: 25m
        alertname: ClaimwatchConsumerLagGrowing
        exp_alerts:
          - exp_labels: {severity: warning, topic: settlements}

  - name: dead letters above 1 percent fire; a trickle does not
    interval: 1m
    input_series:
      - series: 'claimwatch_settlements_consumed_total{topic="settlements", instance="w1", job="claimwatch"}'
        values: '0+6000x30'
      - series: 'claimwatch_settlements_invalid_total{reason="missing_field", instance="w1", job="claimwatch"}'
        values: '0+600x30'
    alert_rule_test:
      - {eval_time: 5m, alertname: ClaimwatchDeadLetterRateHigh, exp_alerts: []}
      - eval_time: 15m
        alertname: ClaimwatchDeadLetterRateHigh
        exp_alerts:
          - exp_labels: {severity: warning}
  - name: a dead-letter trickle stays quiet
    interval: 1m
    input_series:
      - series: 'claimwatch_settlements_consumed_total{topic="settlements", instance="w1", job="claimwatch"}'
        values: '0+6000x30'
      - series: 'claimwatch_settlements_invalid_total{reason="missing_field", instance="w1", job="claimwatch"}'
        values: '0+5x30'
    alert_rule_test:
      - {eval_time: 25m, alertname: ClaimwatchDeadLetterRateHigh, exp_alerts: []}

  - name: a rule firing 10x its per-settlement normal after a day of normal
    interval: 1m
    input_series:
      - series: 'claimwatch_settlements_processed_total{stream="live", instance="w1", job="claimwatch"}'
        values: '0+6000x1560'
      - series: 'claimwatch_alerts_total{rule="card_hopping", severity="high", instance="w1", job="claimwatch"}'
        values: '0+6x1440 8640+60x120'
      - series: 'claimwatch_alerts_total{rule="other_rule", severity="low", instance="w1", job="claimwatch"}'
        values: '0+6x1560'
    alert_rule_test:
      - {eval_time: 1430m, alertname: ClaimwatchAlertRateAbnormal, exp_alerts: []}
      - eval_time: 1510m
        alertname: ClaimwatchAlertRateAbnormal
        exp_alerts:
          - exp_labels: {severity: warning, rule: card_hopping}

  - name: repeated Redis errors fire, one blip does not
    interval: 1m
    input_series:
      - series: 'claimwatch_redis_errors_total{instance="w1", job="claimwatch"}'
        values: '0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1+2x20'
    alert_rule_test:
      - {eval_time: 14m, alertname: ClaimwatchRedisErrors, exp_alerts: []}
      - eval_time: 30m
        alertname: ClaimwatchRedisErrors
        exp_alerts:
          - exp_labels: {severity: critical}

  - name: slow Redis round trips
    interval: 1m
    input_series:
      - series: 'claimwatch_redis_latency_seconds_bucket{le="0.5", instance="w1", job="claimwatch"}'
        values: '0+10x10 100x20'
      - series: 'claimwatch_redis_latency_seconds_bucket{le="1.0", instance="w1", job="claimwatch"}'
        values: '0+10x10 100x20'
      - series: 'claimwatch_redis_latency_seconds_bucket{le="2.5", instance="w1", job="claimwatch"}'
        values: '0+10x10 100+10x20'
      - series: 'claimwatch_redis_latency_seconds_bucket{le="+Inf", instance="w1", job="claimwatch"}'
        values: '0+10x10 100+10x20'
    alert_rule_test:
      - {eval_time: 10m, alertname: ClaimwatchRedisSlow, exp_alerts: []}
      - eval_time: 28m
        alertname: ClaimwatchRedisSlow
        exp_alerts:
          - exp_labels: {severity: warning}

  - name: a refused rule reload
    interval: 1m
    input_series:
      - series: 'claimwatch_rules_reload_errors_total{instance="w1", job="claimwatch"}'
        values: '0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
    alert_rule_test:
      - {eval_time: 2m, alertname: ClaimwatchRulesReloadRefused, exp_alerts: []}
      - eval_time: 4m
        alertname: ClaimwatchRulesReloadRefused
        exp_alerts:
          - exp_labels: {severity: warning}
      - {eval_time: 19m, alertname: ClaimwatchRulesReloadRefused, exp_alerts: []}
"""


def test_alert_rules_fire_on_synthetic_series_and_stay_quiet_otherwise(prom_bins, tmp_path):
    rules_copy = tmp_path / "rules"
    rules_copy.mkdir()
    tested = set()
    for f in sorted(PROM_RULES.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for g in doc["groups"]:
            for r in g["rules"]:
                r.pop("annotations", None)
        (rules_copy / f.name).write_text(yaml.safe_dump(doc), encoding="utf-8")
    tests = yaml.safe_load(UNIT_TESTS)
    tests["rule_files"] = [str(p) for p in sorted(rules_copy.glob("*.yml"))]
    for t in tests["tests"]:
        tested |= {a["alertname"] for a in t["alert_rule_test"]}
    shipped = {r["alert"] for f in PROM_RULES.glob("*.yml")
               for g in yaml.safe_load(f.read_text(encoding="utf-8"))["groups"] for r in g["rules"] if "alert" in r}
    assert shipped == tested, f"alert rules without a unit test here: {sorted(shipped - tested)}"
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    res = subprocess.run([prom_bins[1], "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
