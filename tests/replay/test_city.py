"""Tests for the synthetic city (replay/city.py): determinism, contract, labels, and
that ordinary people stay clear of every rule while each injected fraud meets its own."""

from __future__ import annotations

import doctest
import gzip
import json
import re
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from replay import city
from replay.city import DEFAULT_START, DRUGS, RESALE_PRONE, RULES, TZ, district_distance_km

from tests.conftest import CONTRACT  # noqa: E402

SCHEMA_PATH = CONTRACT / "settlement-event.schema.json"
CARDS, DAYS, SEED = 20_000, 7, 1
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _format_checker() -> FormatChecker:
    checker = FormatChecker()
    if "date-time" not in checker.checkers:        # rfc3339-validator not installed: check it ourselves

        @checker.checks("date-time", raises=ValueError)
        def _date_time(value: object) -> bool:
            if not isinstance(value, str):
                return True
            if not _RFC3339.match(value):
                raise ValueError(f"not RFC 3339: {value!r}")
            datetime.fromisoformat(value)
            return True

    return checker


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    v = Draft202012Validator(schema, format_checker=_format_checker())
    assert not v.is_valid({**_minimal_event(), "event_time": "2026-11-24 09:13"}), "date-time format is not checked"
    return v


def _minimal_event() -> dict:
    return {"event_id": "E1", "event_time": "2026-11-24T09:13:05+08:00", "card_id": "C1", "institution_id": "H1",
            "institution_type": "hospital", "district": "310104", "visit_type": "outpatient", "items": [],
            "total_amount": 0.0, "fund_paid": 0.0}


@pytest.fixture(scope="module")
def world():
    events, labels = city.generate(cards=CARDS, days=DAYS, seed=SEED)
    return events, labels


def _ts(ev: dict) -> float:
    return datetime.fromisoformat(ev["event_time"]).timestamp()


@pytest.fixture(scope="module")
def index(world):
    events, labels = world
    by_id = {e["event_id"]: e for e in events}
    by_card: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        by_card[e["card_id"]].append(e)
    fraud_cards = {m for f in labels["frauds"] for m in f["member_ids"]}
    fraud_cards |= {f["subject_id"] for f in labels["frauds"] if f["subject_type"] == "card"}
    ordinary = {c: evs for c, evs in by_card.items() if c not in fraud_cards}
    return by_id, by_card, fraud_cards, ordinary


def _max_distinct(evs: list[dict], window_s: float) -> int:
    best, j = 0, 0
    for i in range(len(evs)):
        while _ts(evs[i]) - _ts(evs[j]) >= window_s:
            j += 1
        if i - j + 1 > best:
            best = max(best, len({x["institution_id"] for x in evs[j:i + 1]}))
    return best


# ----------------------------------------------------------------------------- determinism and output

def test_same_seed_same_bytes_different_seed_differs(world, tmp_path: Path):
    events, labels = world
    again, labels2 = city.generate(cards=CARDS, days=DAYS, seed=SEED)
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    city.write(events, labels, a, tmp_path / "a.json")
    city.write(again, labels2, b, tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    other, _ = city.generate(cards=CARDS, days=DAYS, seed=SEED + 1)
    city.write(other, None, tmp_path / "c.jsonl.gz")
    assert (tmp_path / "c.jsonl.gz").read_bytes() != a.read_bytes()
    assert {e["card_id"] for e in other[:200]} != {e["card_id"] for e in events[:200]}


def test_write_plain_and_gzip_round_trip(world, tmp_path: Path):
    events, labels = world
    plain, gz, lab = tmp_path / "out" / "e.jsonl", tmp_path / "e.jsonl.gz", tmp_path / "l.json"
    city.write(events, labels, plain, lab)
    city.write(events, labels, gz)
    raw = plain.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == len(events)
    assert gzip.decompress(gz.read_bytes()) == raw
    assert [orjson.loads(line) for line in raw.splitlines()[:50]] == events[:50]
    assert json.loads(lab.read_text(encoding="utf-8")) == labels


def test_rate_mix_and_day_profile(world):
    events, labels = world
    per_card_day = len(events) / CARDS / DAYS
    assert 0.03 <= per_card_day <= 0.06
    kinds = Counter(e["visit_type"] for e in events)
    assert set(kinds) == {"outpatient", "emergency", "inpatient", "pharmacy"}
    hours = Counter(int(e["event_time"][11:13]) for e in events)
    assert sum(hours[h] for h in range(8, 18)) > 0.7 * len(events)
    assert sum(hours[h] for h in range(0, 6)) < 0.01 * len(events)
    assert len({e["district"] for e in events}) == 16
    assert all(e["event_time"].endswith("+08:00") for e in events)


# ----------------------------------------------------------------------------- contract

def test_events_validate_against_schema(world, validator):
    events, labels = world
    step = max(1, len(events) // 3000)
    sample = events[::step] + [e for e in events if e["event_id"] in set(labels["fraud_event_ids"])]
    for ev in sample:
        errors = list(validator.iter_errors(ev))
        assert not errors, (ev["event_id"], [e.message for e in errors])


def test_ids_unique_and_sorted_by_time(world):
    events, _ = world
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"E\d{8}\d{9}", i) for i in ids)
    times = [_ts(e) for e in events]
    assert times == sorted(times)
    assert times[0] >= DEFAULT_START.timestamp()
    assert times[-1] < (DEFAULT_START + timedelta(days=DAYS)).timestamp()


def test_money_adds_up(world):
    events, _ = world
    for e in events:
        assert abs(sum(i["amount"] for i in e["items"]) - e["total_amount"]) < 0.011, e["event_id"]
        if e.get("self_paid") is not None:
            assert abs(e["fund_paid"] + e["self_paid"] - e["total_amount"]) < 0.011, e["event_id"]
        assert 0 <= e["fund_paid"] <= e["total_amount"]
        assert 0.4 <= e["fund_paid"] / e["total_amount"] <= 0.95 if e["total_amount"] else True


def test_realistic_fields(world):
    events, _ = world
    for e in events[:3000]:
        assert re.fullmatch(r"3101(19|20)\d{2}[01]\d[0-3]\d{5}", e["card_id"])
        if e.get("birth_year"):
            assert e["card_id"][4:8] == str(e["birth_year"])
        if e.get("insured_category") == "child":
            assert 2026 - e["birth_year"] < 18
        if e.get("insured_category") == "retiree":
            assert 2026 - e["birth_year"] >= 55
        assert re.fullmatch(r"[HCP]31\d{4}\d{3}", e["institution_id"])
        assert e["district"] == e["institution_id"][1:7]
        if e["institution_type"] == "pharmacy":
            assert e["physician_id"] is None and e["institution_level"] is None
        for it in e["items"]:
            if it["category"] == "drug":
                assert it["days_supply"] >= 1
                for code in it.get("trace_codes", ()):
                    assert re.fullmatch(r"8\d{19}", code)
    drug_lines = [it for e in events for it in e["items"] if it["category"] == "drug"]
    assert sum("trace_codes" in it for it in drug_lines) > 0.7 * len(drug_lines)
    placeholders = Counter(e.get("physician_id") for e in events if e.get("physician_id") in ("未知", "0000"))
    assert placeholders, "noise: some placeholder physician ids"
    assert any("person_id" not in e for e in events), "noise: some optional fields missing"


def test_inpatient_stays_are_consistent(world):
    events, _ = world
    stays: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        if e["visit_type"] == "inpatient":
            stays[e["admission_id"]].append(e)
    assert len(stays) > 20
    for aid, evs in stays.items():
        assert len({(e["card_id"], e["institution_id"], e["admitted_at"]) for e in evs}) == 1, aid
        closed = [e for e in evs if e["discharged_at"] is not None]
        assert len(closed) <= 1 and (not closed or closed[0] is evs[-1]), aid
        assert all(e["admitted_at"] <= e["event_time"] for e in evs)
        assert any(it["category"] == "bed" for e in evs for it in e["items"])


# ----------------------------------------------------------------------------- labels

def test_labels_reference_existing_events(world, index):
    events, labels = world
    by_id, by_card, _, _ = index
    assert labels["n_events"] == len(events)
    assert (labels["seed"], labels["cards"], labels["days"]) == (SEED, CARDS, DAYS)
    assert labels["start"] == DEFAULT_START.isoformat()
    union = set()
    fraud_ids = [f["fraud_id"] for f in labels["frauds"]]
    assert len(set(fraud_ids)) == len(fraud_ids)
    for f in labels["frauds"]:
        assert f["rule"] in RULES
        assert f["subject_type"] in ("card", "physician", "institution", "ring")
        assert f["event_ids"] and all(i in by_id for i in f["event_ids"])
        assert all(i in by_id for i in f.get("context_event_ids", ()))
        times = [by_id[i]["event_time"] for i in f["event_ids"]]
        assert (f["window_start"], f["window_end"]) == (min(times), max(times))
        assert f["member_ids"] and all(m in by_card for m in f["member_ids"])
        if f["subject_type"] == "card":
            assert f["member_ids"] == [f["subject_id"]]
            assert all(by_id[i]["card_id"] == f["subject_id"] for i in f["event_ids"])
        union.update(f["event_ids"])
    assert set(labels["fraud_event_ids"]) == union
    assert len(union) < 0.15 * len(events)


def test_every_rule_has_injected_fraud(world):
    _, labels = world
    per_rule = Counter(f["rule"] for f in labels["frauds"])
    assert set(per_rule) == set(RULES)
    assert all(1 <= n <= 10 for n in per_rule.values()), per_rule
    kinds = {f.get("kind") for f in labels["frauds"] if f["rule"] == "shared_card"}
    assert kinds == {"impossible_travel", "inpatient_overlap", "child_adult_drug"}
    assert {f.get("kind") for f in labels["frauds"] if f["rule"] == "card_hopping"} == {"24h", "7d"}


def test_lookalikes_present_and_disjoint_from_fraud(world, index):
    _, labels = world
    by_id, by_card, fraud_cards, _ = index
    kinds = Counter(l["kind"] for l in labels["lookalikes"])
    assert {"dialysis", "family", "chronic_long_rx", "busy_physician", "referral"} <= set(kinds)
    physicians = {e.get("physician_id") for e in by_id.values()}
    for l in labels["lookalikes"]:
        members = l.get("member_ids", [l["subject_id"]])
        if l["kind"] == "busy_physician":
            assert l["subject_id"] in physicians
            continue
        assert not fraud_cards.intersection(members), l
        assert any(m in by_card for m in members), l


# ----------------------------------------------------------------------------- ordinary people stay clear

def test_ordinary_cards_never_hop(index):
    _, _, _, ordinary = index
    worst_day = max(_max_distinct(evs, 86400) for evs in ordinary.values())
    worst_week = max(_max_distinct(evs, 7 * 86400) for evs in ordinary.values())
    assert worst_day < 12 and worst_week < 25
    assert worst_day <= 5 and worst_week <= 10, (worst_day, worst_week)


def test_ordinary_cards_travel_plausibly_and_not_while_in_hospital(index):
    _, _, _, ordinary = index
    for card, evs in ordinary.items():
        open_stays: dict[str, str] = {}
        for a, b in zip(evs, evs[1:]):
            hours = (_ts(b) - _ts(a)) / 3600
            km = district_distance_km(a["district"], b["district"])
            assert km < 15 or km / max(hours, 1e-9) < 40, (card, a["event_id"], b["event_id"])
        for e in evs:
            if e["visit_type"] == "inpatient":
                if e["discharged_at"] is None:
                    open_stays[e["admission_id"]] = e["institution_id"]
                else:
                    open_stays.pop(e["admission_id"], None)
            else:
                assert not open_stays or e["institution_id"] in open_stays.values(), (card, e["event_id"])


def test_ordinary_cards_no_ring_duplicate_reuse_or_child_adult_drug(world, index):
    events, _ = world
    _, _, fraud_cards, ordinary = index
    codes = Counter(c for e in events for it in e["items"] for c in it.get("trace_codes", ()))
    for card, evs in ordinary.items():
        for e in evs:
            for it in e["items"]:
                assert all(codes[c] == 1 for c in it.get("trace_codes", ())), e["event_id"]
                if e.get("insured_category") == "child" or int(e["card_id"][4:8]) > 2008:
                    assert it["code"] not in RESALE_PRONE, e["event_id"]
        for a, b in zip(evs, evs[1:]):
            assert not (a["institution_id"] == b["institution_id"] and _ts(b) - _ts(a) < 600), (a["event_id"], b["event_id"])
    buys: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    for e in events:
        if e["institution_type"] == "pharmacy" and e["card_id"] not in fraud_cards:
            for it in e["items"]:
                if it["code"] in RESALE_PRONE:
                    buys[(e["institution_id"], it["code"])].append((_ts(e), e["card_id"]))
    for key, lst in buys.items():
        for t, _ in lst:
            assert len({c for s, c in lst if t <= s < t + 3600}) < 4, key


def test_ordinary_visit_frequency_and_cost(index, world):
    _, labels = world
    _, _, _, ordinary = index
    dialysis = {l["subject_id"] for l in labels["lookalikes"] if l["kind"] == "dialysis"}
    for card, evs in ordinary.items():
        visits = [e for e in evs if e["visit_type"] in ("outpatient", "emergency")]
        per_day = Counter(e["event_time"][:10] for e in visits)
        assert max(per_day.values(), default=0) <= 4, card
        if card in dialysis:
            assert all("N18.5" in e.get("diagnoses", ["N18.5"]) for e in visits if e["items"][0]["code"] == "T0101")
            continue
        assert len(visits) < 15, card
        assert sum(e["total_amount"] for e in visits) < 5000, card


# ----------------------------------------------------------------------------- each fraud meets its rule

def test_each_fraud_meets_its_rule(world, index):
    events, labels = world
    by_id, by_card, _, _ = index
    codes_seen = Counter(c for e in events for it in e["items"] for c in it.get("trace_codes", ()))
    phys_daily: dict[str, Counter] = defaultdict(Counter)
    fraud_ids = set(labels["fraud_event_ids"])
    for e in events:
        if e.get("physician_id") and e["event_id"] not in fraud_ids:
            phys_daily[e["physician_id"]][e["event_time"][:10]] += 1
    for f in labels["frauds"]:
        evs = [by_id[i] for i in f["event_ids"]]
        rule, kind = f["rule"], f.get("kind")
        if rule == "card_hopping":
            if kind == "24h":
                assert _max_distinct(evs, 86400) >= 12
            else:
                assert _max_distinct(evs, 7 * 86400) >= 25 and _max_distinct(evs, 86400) < 12
            assert len({e["district"] for e in evs}) >= 2
            assert all(any(it["code"] in RESALE_PRONE for it in e["items"]) for e in evs)
        elif rule == "overdispensing":
            drug_lines = [it for e in evs for it in e["items"] if it["code"] == f["drug"]]
            elapsed = (_ts(evs[-1]) - _ts(evs[0])) / 86400 + 1
            assert sum(it["days_supply"] for it in drug_lines) > 3 * elapsed
            assert len({e["institution_id"] for e in evs}) >= 2
        elif rule == "shared_card" and kind == "impossible_travel":
            pairs = list(zip(evs[::2], evs[1::2]))
            assert all(district_distance_km(a["district"], b["district"]) >= 50 and
                       20 * 60 <= _ts(b) - _ts(a) <= 40 * 60 for a, b in pairs)
        elif rule == "shared_card" and kind == "inpatient_overlap":
            stay = [by_id[i] for i in f["context_event_ids"]]
            assert stay[0]["discharged_at"] is None and _ts(stay[0]) < _ts(evs[0])
            closed = [s for s in stay if s["discharged_at"]]
            assert all(e["institution_id"] != stay[0]["institution_id"] for e in evs)
            assert not closed or all(_ts(e) < _ts(closed[0]) for e in evs)
        elif rule == "shared_card":
            assert all(e["insured_category"] == "child" and e["birth_year"] >= 2014 for e in evs)
            assert all(it["code"] in ("XA10AEA004", "XC10AAA003", "XB01ACA002") for e in evs for it in e["items"]
                       if it["category"] == "drug")
        elif rule == "card_ring":
            assert len({e["institution_id"] for e in evs}) == 1
            days = defaultdict(set)
            for e in evs:
                days[e["event_time"][:10]].add(e["card_id"])
            assert len(days) >= 2 and all(len(c) >= 8 for c in days.values())
            for d in days:
                ts = [_ts(e) for e in evs if e["event_time"][:10] == d]
                assert max(ts) - min(ts) <= 3600
        elif rule == "prescriber_volume":
            spike = Counter(e["event_time"][:10] for e in evs)
            base = [n for d, n in phys_daily[f["subject_id"]].items() if d not in spike]
            mean = sum(base) / max(1, DAYS - len(spike))
            for d, extra in spike.items():
                assert phys_daily[f["subject_id"]][d] + extra >= 3 * mean
            assert sum(any(it["code"] in RESALE_PRONE for it in e["items"]) for e in evs) > 0.6 * len(evs)
        elif rule == "visit_frequency":
            per_day = Counter(e["event_time"][:10] for e in evs)
            if kind == "A":
                assert sum(n > 4 for n in per_day.values()) >= 3
                inst_day = defaultdict(set)
                for e in evs:
                    inst_day[e["event_time"][:10]].add(e["institution_id"])
                assert sum(len(s) > 3 for s in inst_day.values()) >= 3
            else:
                assert len(evs) >= 15 and all(e["visit_type"] == "outpatient" for e in evs)
        elif rule == "cost_anomaly":
            assert sum(e["total_amount"] for e in evs) >= 5000
            assert all(e["visit_type"] == "outpatient" for e in evs)
        elif rule == "duplicate_billing":
            pairs = defaultdict(list)
            for e in evs:
                pairs[e["card_id"]].append(e)
            assert len(pairs) == len(evs) // 2
            for a, b in pairs.values():
                assert a["event_id"] != b["event_id"] and 60 <= _ts(b) - _ts(a) <= 300
                assert (a["card_id"], a["institution_id"], a["items"]) == (b["card_id"], b["institution_id"], b["items"])
        elif rule == "trace_code_reuse":
            first, second = evs
            assert first["card_id"] != second["card_id"] and first["institution_id"] != second["institution_id"]
            reused = [c for it in second["items"] for c in it.get("trace_codes", ())]
            assert reused and all(codes_seen[c] == 2 for c in reused)
            assert set(reused) <= {c for it in first["items"] for c in it.get("trace_codes", ())}


# ----------------------------------------------------------------------------- small cities, live, fast path

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cards=st.integers(1, 3000), days=st.integers(1, 4), seed=st.integers(0, 2**32))
def test_any_small_city_is_well_formed(cards, days, seed):
    events, labels = city.generate(cards=cards, days=days, seed=seed)
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids) == labels["n_events"]
    times = [_ts(e) for e in events]
    assert times == sorted(times)
    assert set(labels["fraud_event_ids"]) <= set(ids)
    for e in events:
        assert abs(sum(i["amount"] for i in e["items"]) - e["total_amount"]) < 0.011


def test_iter_live_is_endless_ordered_and_unique():
    chunks: list[dict] = []
    start = datetime(2026, 12, 1, 9, 30, tzinfo=TZ)
    events = []
    for e in city.iter_live(3000, seed=5, start=start, labels_sink=chunks.append):
        events.append(e)
        if len(chunks) == 4:
            break
    assert len(chunks) == 4
    times = [_ts(e) for e in events]
    assert times == sorted(times) and times[0] >= start.timestamp()
    assert len({e["event_id"] for e in events}) == len(events)
    assert len({f["fraud_id"] for c in chunks for f in c["frauds"]}) == sum(len(c["frauds"]) for c in chunks)
    assert all(c["frauds"] for c in chunks), "new fraud in every chunk"
    assert [c["start"] for c in chunks] == [(start + timedelta(days=k)).isoformat() for k in range(4)]


def test_generate_day_fast(validator):
    t0 = time.perf_counter()
    lines = list(city.generate_day_fast(30_000, seed=3))
    rate = len(lines) / (time.perf_counter() - t0)
    assert len(lines) == 30_000 and all(line.endswith(b"\n") for line in lines)
    events = [orjson.loads(line) for line in lines]
    assert len({e["event_id"] for e in events}) == len(events)
    assert [e["event_time"] for e in events] == sorted(e["event_time"] for e in events)
    assert {e["event_time"][:10] for e in events} == {"2026-11-01"}
    for e in events[::100]:
        assert validator.is_valid(e), e
    codes = [c for e in events for it in e["items"] for c in it.get("trace_codes", ())]
    assert len(codes) == len(set(codes))
    assert len({e["card_id"] for e in events}) > 25_000
    assert list(city.generate_day_fast(500, seed=3)) == list(city.generate_day_fast(500, seed=3))
    assert list(city.generate_day_fast(500, seed=3)) != list(city.generate_day_fast(500, seed=4))
    assert rate > 10_000, f"{rate:.0f} events/s"


def test_build_city_shape():
    c = city.build_city(20_000, seed=1)
    assert len(c.institutions) >= 60 and {i.district for i in c.institutions} == {d.code for d in city.DISTRICTS}
    assert {i.level for i in c.institutions if i.type == "hospital"} == {1, 2, 3}
    assert all("社区卫生服务中心" in i.name for i in c.institutions if i.type == "community")
    assert len({p.physician_id for p in c.physicians}) == len(c.physicians)
    ids = [c.cards[i].card_id for i in range(len(c.cards))]
    assert len(set(ids)) == len(ids) and all(len(x) == 16 for x in ids)
    assert {d.name for d in DRUGS.values() if d.resale_prone} == {
        "阿托伐他汀钙片", "硫酸氢氯吡格雷片", "甘精胰岛素注射液", "恩替卡韦片", "利伐沙班片"}
    big = city.build_city(300_000, seed=1, personas=False)
    assert len(big.institutions) == 100 and len(big.cards[299_999].card_id) == 16


def test_docstring_examples_run():
    result = doctest.testmod(city, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0
