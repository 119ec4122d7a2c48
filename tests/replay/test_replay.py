"""`claimwatch replay` end to end: real broker, real worker processes, real Redis."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from replay import city
from tests.helpers import TIMING_DEPENDENT, make_event, run_cli


@pytest.fixture(scope="module")
def week(tmp_path_factory):
    """A generated week of a 20,000-card city, with its labels."""
    d = tmp_path_factory.mktemp("week")
    events, labels = city.generate(cards=20_000, days=7, seed=11)
    city.write(events, labels, d / "week.jsonl.gz", d / "labels.json")
    return d / "week.jsonl.gz", labels


def replay(path, run_id, out, env, *extra):
    p = run_cli("replay", str(path), "--run-id", run_id, "--alerts-out", str(out), *extra, env=env)
    assert p.returncode == 0, p.stderr.decode()
    return [json.loads(x) for x in out.read_text().splitlines()], p.stderr.decode()


def fraud_cards(labels) -> set[str]:
    out = set()
    for f in labels["frauds"]:
        if f["subject_type"] == "card":
            out.add(f["subject_id"])
        out.update(f.get("member_ids") or [])
    return out


def test_generated_week_catches_every_hopper_and_no_ordinary_card(week, worker, cli_env, tmp_path):
    path, labels = week
    alerts, err = replay(path, "week-a", tmp_path / "a.jsonl", cli_env, "--workers", "0")
    hoppers = {f["subject_id"] for f in labels["frauds"] if f["rule"] == "card_hopping"}
    assert len(hoppers) >= 2
    hop_alerts = [a for a in alerts if a["rule"] == "card_hopping"]
    assert hoppers <= {a["subject_id"] for a in hop_alerts}, "missed an injected card-hopping card"
    assert {a["subject_id"] for a in hop_alerts} <= fraud_cards(labels), "alert on an ordinary card"
    assert all(a["run_id"] == "week-a" for a in alerts)
    assert f"{labels['n_events']:,} processed" in err


def test_same_file_two_run_ids_same_alerts(week, worker, cli_env, tmp_path):
    path, _ = week
    a, _ = replay(path, "same-1", tmp_path / "1.jsonl", cli_env, "--workers", "0")
    b, _ = replay(path, "same-2", tmp_path / "2.jsonl", cli_env, "--workers", "0")

    def key(x):
        return sorted((y["rule"], y["subject_id"], y["window_start"], y["window_end"], y.get("window_s"),
                       tuple(sorted(y["evidence_event_ids"]))) for y in x if y["rule"] not in TIMING_DEPENDENT)

    assert key(a) and key(a) == key(b)  # rules whose verdicts depend on partition interleaving excepted
    assert {x["alert_id"] for x in a}.isdisjoint({x["alert_id"] for x in b})  # runs never share alerts


def test_blank_and_invalid_lines_are_counted_and_skipped(worker, cli_env, tmp_path, settings):
    good = [json.dumps(make_event("BL" + str(k), f"P{k:03d}")) for k in range(20)]
    # a card id but no UTC offset: published (partitioning needs only the card), dead-lettered by the worker
    naive = json.dumps(make_event("BLX", "P999", event_time="2026-11-01T09:00:00"))
    lines = good[:10] + ["", "   ", "{oops", '{"event_id": 1}', naive] + good[10:]
    f = tmp_path / "mixed.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    alerts, err = replay(f, "mixed", tmp_path / "m.jsonl", cli_env, "--workers", "0")
    flat = err.replace("\n", " ")
    assert "25 lines, 21 published, 2 blank and 3 invalid lines skipped" in flat
    assert "20 processed" in err
    assert "line 13: not valid JSON" in flat and "line 14: Object missing required field `card_id`" in flat
    assert "line 15: event_time has no UTC offset" in flat  # found by the worker, named by its line


def test_bad_run_id_and_missing_file_are_refused(cli_env, tmp_path):
    p = run_cli("replay", str(tmp_path / "nope.jsonl"), "--run-id", "x", env=cli_env)
    assert p.returncode == 2 and b"no such file" in p.stderr
    f = tmp_path / "e.jsonl"
    f.write_text("")
    p = run_cli("replay", str(f), "--run-id", "../../etc", env=cli_env)
    assert p.returncode == 2 and b"invalid run id" in p.stderr


def test_replay_with_nothing_configured_starts_and_stops_its_own_stack(tmp_path):
    """The embedded default: no URLs set, the CLI starts Tansu, Redis and a worker, then stops them."""
    events = [make_event("SOLO", f"P{k:03d}", 1793577600.0 + k * 1800) for k in range(13)]
    f = tmp_path / "solo.jsonl"
    f.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAIMWATCH_")}
    env["CLAIMWATCH_DATA_DIR"] = str(tmp_path / "data")
    alerts, err = replay(f, "solo", tmp_path / "solo-alerts.jsonl", env)
    assert [(a["rule"], a["subject_id"]) for a in alerts if a["rule"] == "card_hopping"] == [("card_hopping", "SOLO")]
    assert _procs_with_env(env["CLAIMWATCH_DATA_DIR"]) == set(), "left a process running"


def _procs_with_env(marker: str) -> set[str]:
    """Processes that inherited this test's unique data dir (the CLI's broker, Redis and workers)."""
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read()
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker.encode() in environ:
                out.add(pid + " " + cmd)
    return out
