"""The alert store: upsert merges, filters are bound parameters, exports follow the contract."""

from __future__ import annotations

import json

import jsonschema
import pytest

from alerts.model import Alert, to_dict
from alerts.store import AlertStore
from tests.conftest import CONTRACT

SCHEMA = json.loads((CONTRACT / "alert.schema.json").read_text())


def mk(aid="A-1", run="r1", rule="card_hopping", subject="C1", ev=("E1",), end="2026-11-24T18:00:00+08:00", **kw):
    return Alert(alert_id=aid, rule=rule, severity="high", subject_type="card", subject_id=subject,
                 window_start="2026-11-24T09:00:00+08:00", window_end=end, evidence_event_ids=list(ev), run_id=run,
                 **kw)


@pytest.fixture
def store(tmp_path):
    s = AlertStore(f"sqlite:///{tmp_path / 'a.db'}")
    yield s
    s.close()


def test_upsert_merges_evidence_and_keeps_one_row(store):
    store.upsert([mk(ev=("E1", "E2"), detected_at="2026-11-24T10:00:00+00:00")])
    store.upsert([mk(ev=("E2", "E3"), end="2026-11-24T19:00:00+08:00", detected_at="2026-11-24T11:00:00+00:00")])
    [a] = store.query(run_id="r1")
    assert a.evidence_event_ids == ["E1", "E2", "E3"]
    assert a.window_end == "2026-11-24T19:00:00+08:00"
    assert a.detected_at == "2026-11-24T10:00:00+00:00"  # first detection kept


def test_filters(store):
    store.upsert([mk("A-1", rule="card_hopping"), mk("A-2", rule="shared_card"), mk("A-3", run="r2")])
    assert [a.alert_id for a in store.query(rule="shared_card")] == ["A-2"]
    assert {a.alert_id for a in store.query(run_id="r1")} == {"A-1", "A-2"}
    assert store.count() == 3


@pytest.mark.parametrize("evil", ["' OR '1'='1", "r1'; DROP TABLE alerts; --", "\" OR 1=1 --", "%", "r1\x00"])
def test_filters_are_bound_parameters(store, evil):
    store.upsert([mk("A-1")])
    for field in ("run_id", "rule", "severity", "subject_id"):
        assert store.query(**{field: evil}) == []
    for field in ("since", "until"):
        with pytest.raises(ValueError, match=f"--{field} must be an ISO 8601"):
            store.query(**{field: evil})
    assert store.count() == 1  # table intact


def test_exported_alerts_follow_the_contract(store):
    store.upsert([mk(summary="卡 C1 …", score=1.2, rule_version="abc")])
    for a in store.query():
        jsonschema.validate(to_dict(a), SCHEMA)


def test_a_store_from_an_older_schema_is_migrated(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE alerts (alert_id VARCHAR(64) PRIMARY KEY, run_id VARCHAR(128) NOT NULL, "
                "rule VARCHAR(64) NOT NULL, severity VARCHAR(16) NOT NULL, subject_type VARCHAR(16) NOT NULL, "
                "subject_id VARCHAR(256) NOT NULL, window_start VARCHAR(40) NOT NULL, window_end VARCHAR(40) NOT NULL, "
                "detected_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL, status VARCHAR(32) NOT NULL "
                "DEFAULT 'open', suppressed BOOLEAN NOT NULL DEFAULT 0, doc TEXT NOT NULL)")
    from alerts.model import to_json

    old = mk("A-old")
    con.execute("INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                ("A-old", "r1", "card_hopping", "high", "card", "C1", old.window_start, old.window_end, "x", "x",
                 "open", 0, to_json(old).decode()))
    con.commit()
    con.close()
    st = AlertStore(f"sqlite:///{db}")
    st.upsert([mk("A-new")])
    assert sorted(a.alert_id for a in st.query(since="2026-11-24T17:00:00+08:00")) == ["A-new", "A-old"]
    assert st.query(since="2026-11-24T18:00:01+08:00") == []
    st.close()
