"""`claimwatch bench …` end to end at a small size (CI checks the commands work; speed is never asserted)."""

from __future__ import annotations

import json
import os

from tests.helpers import run_cli


def _embedded_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAIMWATCH_")}
    env["CLAIMWATCH_DATA_DIR"] = str(tmp_path / "data")
    return env


def _cpu_measured(cpu: dict) -> None:
    # every process of the embedded stack did work for these settlements (the publisher: this CLI), the
    # embedded aux Redis (the rules of CLAIMWATCH_REDIS_AUX_RULES) included
    assert set(cpu) == {"workers", "redis", "redis_aux", "broker", "publisher"}
    assert cpu["workers"] > 0 and cpu["redis"] > 0 and cpu["redis_aux"] > 0 and cpu["publisher"] > 0, cpu
    assert cpu["broker"] is not None and cpu["broker"] >= 0, cpu


def test_bench_throughput_small(tmp_path):
    out = tmp_path / "throughput.json"
    env = _embedded_env(tmp_path)
    env["CLAIMWATCH_BATCH_MAX"] = "500"  # several batches: the backlog drain has batches after its first
    p = run_cli("bench", "throughput", "--events", "3000", "--latency-seconds", "3", "--repeat", "2",
                "--json-out", str(out), env=env)
    text = p.stdout.decode() + p.stderr.decode()
    assert p.returncode == 0, text
    rep = json.loads(out.read_text())
    assert rep["raw"]["produce_per_s"] > 0 and rep["raw"]["consume_parse_per_s"] > 0
    runs = rep["pipeline_runs"]
    assert len(runs) == 2 and all(r["processed"] == 3000 for r in runs)   # every settlement, every run
    assert rep["pipeline"] in runs and rep["pipeline"]["per_s"] == min(r["per_s"] for r in runs)  # lower median of 2
    assert rep["ratio_pipeline_to_raw"] > 0
    for r in runs:
        _cpu_measured(r["cpu_us_per_settlement"])
    lat = rep["latency"]
    assert lat["probes"] > 0 and lat["alerts_seen"] == lat["probes"], lat   # every probe's alert arrived
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert rep["active_cards"] > 0 and rep["redis_bytes_per_active_card"] > 0
    # the two card hashes (main Redis) and the aux rules' state (aux Redis) were measured
    assert {"c", "h", "prescriber_volume", "trace_code_reuse"} <= set(rep["redis_bytes_by_key_group"])
    assert "CPU per settlement" in text and "every run" in text
    drain = rep["drain"]   # the backlog published first, then drained by freshly started workers: all of it
    assert drain["first_batch"] > 0 and drain["first_batch"] + drain["settlements"] == 3000, drain
    assert drain["settlements"] > 0 and drain["per_s"] > 0 and drain["seconds"] > 0
    assert drain["cpu_us_per_settlement"]["workers"] > 0 and drain["cpu_us_per_settlement"]["redis"] > 0
    assert "backlog drained" in text


def test_bench_day_small(tmp_path):
    out = tmp_path / "day.json"
    p = run_cli("bench", "day", "--events", "3000", "--json-out", str(out), env=_embedded_env(tmp_path))
    text = p.stdout.decode() + p.stderr.decode()
    assert p.returncode == 0, text
    rep = json.loads(out.read_text())
    assert rep["events"] == 3000 and rep["processed"] == 3000
    assert rep["seconds"] > 0 and rep["per_s"] > 0
    _cpu_measured(rep["cpu_us_per_settlement"])
    assert "target ≤ 180 s" in text
