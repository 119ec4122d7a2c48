"""shared_card against the real Redis: impossible travel, settlements during a stay, a child's card
buying adult drugs; neighbours and feasible trips, the hospital's own events, type-1 diabetes;
boundaries, order, redelivery, episodes, expiry, validation."""

from __future__ import annotations

import math
import random
import uuid
from datetime import datetime

import orjson
import pytest

from detectors.config import load_rules_text
from detectors.shared_card import SharedCard
from tests.helpers import T0, TZ, dumps, make_event

DISTRICTS = {
    "310101": {"name": "黄浦区", "lat": 31.2317, "lon": 121.4846, "neighbours": ["310115"]},
    "310115": {"name": "浦东新区", "lat": 31.1812, "lon": 121.6223, "neighbours": ["310101", "310120", "310151"]},
    "310116": {"name": "金山区", "lat": 30.7920, "lon": 121.2510, "neighbours": ["310120"]},
    "310120": {"name": "奉贤区", "lat": 30.9180, "lon": 121.5180, "neighbours": ["310115", "310116"]},
    "310151": {"name": "崇明区", "lat": 31.6230, "lon": 121.5650, "neighbours": ["310115"]},
}


def rules_text(districts=None, **over) -> str:
    lines = ["lateness_s: 3600", "rules:", "  shared_card:"]
    cfg = {"max_speed_kmh": 60, "min_distance_km": 20, "slack_s": 600, "history_s": 21600, "stay_grace_s": 7200,
           "max_stay_s": 5184000, "episode_s": 604800, "child_max_age": 14, "min_days_supply": 14, **over}
    for k, v in cfg.items():
        lines.append(f"    {k}: {v}")
    lines.append("    districts:")
    for code, d in (districts or DISTRICTS).items():
        nb = ", ".join(f'"{x}"' for x in d["neighbours"])
        lines.append(f'      "{code}": {{name: {d["name"]}, lat: {d["lat"]}, lon: {d["lon"]}, neighbours: [{nb}]}}')
    return "\n".join(lines) + "\n"


@pytest.fixture
def rules():
    return load_rules_text(rules_text())


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


RECENT, STAYS = "shared_card:recent:21600", "shared_card:stays:21600,5184000"  # card-hash field, stays key


def card_state(redis_sync, rid, card):
    """The card's recent settlements (t, event_id, district, visit, institution) and stays (score, member)."""
    rec, st = redis_sync.hget(f"cw:{rid}:c:{card}", RECENT), redis_sync.get(f"cw:{rid}:{STAYS}:{card}")
    rec = orjson.loads(rec) if rec is not None else []
    st = orjson.loads(st) if st is not None else []
    return [rec[k:k + 5] for k in range(0, len(rec), 5)], [st[k:k + 2] for k in range(0, len(st), 2)]


def alerts_of(results):
    out = {}
    for r in results:
        for a in r.alerts:
            out[a.alert_id] = a
    return list(out.values())


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, TZ).isoformat()


def visit(card, inst, t, district, **over):
    """An outpatient visit (registration + amoxicillin) at ``inst`` in ``district``."""
    ev = make_event(card, inst, t, district=district, institution_type="hospital", visit_type="outpatient",
                    physician_id="D1", items=[{"code": "R0001", "category": "registration", "quantity": 1, "amount": 20.0},
                                              {"code": "XJ01CAA015", "name": "阿莫西林胶囊", "category": "drug",
                                               "quantity": 1, "amount": 8.5, "days_supply": 7}],
                    total_amount=28.5, fund_paid=20.0, self_paid=8.5)
    ev.update(over)
    return ev


def bill(card, inst, t, admitted, discharged=None, aid="A20261102001", district="310101"):
    return make_event(card, inst, t, district=district, institution_type="hospital", visit_type="inpatient",
                      physician_id="D9", admission_id=aid, admitted_at=iso(admitted),
                      discharged_at=iso(discharged) if discharged is not None else None,
                      items=[{"code": "B0001", "category": "bed", "quantity": 1, "amount": 90.0}],
                      total_amount=90.0, fund_paid=76.5, self_paid=13.5)


def drug(card, t, code, name, days, *, birth_year=None, category=None, dx=None, inst="P001", district="310101"):
    ev = make_event(card, inst, t, district=district, birth_year=birth_year, insured_category=category,
                    items=[{"code": code, "name": name, "category": "drug", "quantity": 1, "amount": 90.0,
                            "days_supply": days}])
    if dx is not None:
        ev["diagnoses"] = dx
    return ev


# ------------------------------------------------------------------------------ (a) travel

def test_impossible_travel_fires_with_the_numbers(process, rules):
    rid = run_id()
    evs = [visit("TRV", "H310151001", T0, "310151"), drug("TRV", T0 + 30 * 60, "XB01ACA002", "硫酸氢氯吡格雷片", 28,
                                                          inst="P310120003", district="310120")]
    alerts = alerts_of(process(rules, [[dumps(e) for e in evs]], rid))
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.subject_type, a.subject_id) == ("shared_card", "card", "TRV")
    assert a.metrics["kind"] == "impossible_travel"
    assert a.metrics["distance_km"] == pytest.approx(78.7, abs=0.5)
    assert a.metrics["gap_s"] == 1800
    assert sorted(a.evidence_event_ids) == sorted(e["event_id"] for e in evs)
    assert "崇明区" in a.summary and "奉贤区" in a.summary and "30 分钟" in a.summary and "79 公里" in a.summary
    assert a.severity == "high"  # 79 km in 30 + 10 min = 118 km/h, almost twice the limit
    assert a.metrics["implied_speed_kmh"] == pytest.approx(118, abs=1)
    assert (a.window_start, a.window_end) == (iso(T0), iso(T0 + 1800)) and a.rule_version == rules.versions["shared_card"]


def test_feasible_trips_and_neighbouring_districts_never_fire(process, rules):
    rid = run_id()
    evs = [
        # neighbours: 黄浦 -> 浦东 in 5 minutes (across the river; centroids 14 km apart)
        visit("NB", "H310101001", T0, "310101"), visit("NB", "H310115001", T0 + 300, "310115"),
        # 崇明 -> 浦东 (tunnel-bridge) in 20 minutes: 49 km between centroids but neighbours
        visit("NB2", "H310151001", T0, "310151"), visit("NB2", "H310115002", T0 + 1200, "310115"),
        # 崇明 -> 奉贤, 79 km, in 90 minutes: fast, but feasible at 60 km/h with the slack
        visit("FAR", "H310151001", T0, "310151"), visit("FAR", "H310120001", T0 + 90 * 60, "310120"),
        # same district, minutes apart (community centre then hospital)
        visit("SAME", "C310101001", T0, "310101"), visit("SAME", "H310101001", T0 + 120, "310101"),
        # unknown district code: never blamed
        visit("UNK", "H1", T0, "999999"), visit("UNK", "H2", T0 + 60, "310151"),
    ]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_boundary_exactly_at_the_travel_time_does_not_fire(process):
    rules = load_rules_text(rules_text({"AAAAAA": {"name": "A", "lat": 31.2317, "lon": 121.4846, "neighbours": []},
                                        "310116": {"name": "金山区", "lat": 30.7920, "lon": 121.2510, "neighbours": []}}))
    det = next(d for d in rules.detectors if isinstance(d, SharedCard))
    need = det.distance_km("AAAAAA", "310116") / 60 * 3600 - 600   # seconds the trip needs beyond the slack
    assert need > 0 and need != int(need)
    rid = run_id()
    at = [visit("AT", "H1", T0, "AAAAAA"), visit("AT", "H2", T0 + math.ceil(need), "310116")]
    below = [visit("BELOW", "H1", T0, "AAAAAA"), visit("BELOW", "H2", T0 + math.floor(need), "310116")]
    alerts = alerts_of(process(rules, [[dumps(e) for e in at + below]], rid))
    assert [a.subject_id for a in alerts] == ["BELOW"]


# ------------------------------------------------------------------------------ (b) inpatient stay

def test_pharmacy_elsewhere_during_an_open_stay_fires(process, rules):
    rid = run_id()
    adm = T0
    evs = [bill("STAY", "H1", adm + 3600, adm), drug("STAY", adm + 86400 + 7 * 3600, "XC10AAA003", "阿托伐他汀钙片", 28,
                                                    inst="P9")]
    alerts = alerts_of(process(rules, [[dumps(e) for e in evs]], rid))
    assert len(alerts) == 1
    a = alerts[0]
    assert a.metrics["kind"] == "inpatient_overlap"
    assert a.metrics["inpatient_institution_id"] == "H1" and a.metrics["settlements_during_stay"] == 1
    assert sorted(a.evidence_event_ids) == sorted(e["event_id"] for e in evs)
    assert "H1 住院期间" in a.summary and "未出院" in a.summary


def test_stay_lookalikes_never_fire(process, rules):
    rid = run_id()
    adm = T0
    evs = [
        visit("OWN", "C1", adm - 3600, "310101"),                      # before admission (referred, then admitted)
        bill("OWN", "H1", adm + 3600, adm),
        visit("OWN", "C1", adm + 3000, "310101"),                       # within the admission-day grace ...
        visit("OWN", "H1", adm + 86400, "310101"),                      # the hospital's own outpatient pharmacy
        bill("OWN", "H1", adm + 4 * 86400, adm, discharged=adm + 4 * 86400),    # discharge closes the stay
        drug("OWN", adm + 4 * 86400 + 3600, "XC10AAA003", "阿托伐他汀钙片", 28, inst="P9"),   # after discharge
        visit("OWN", "C1", adm + 5 * 86400, "310101"),
    ]
    evs.sort(key=lambda e: e["event_time"])
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_settlement_between_admission_and_first_bill_is_found_by_the_bill(process, rules):
    rid = run_id()
    adm = T0
    p = drug("RETRO", adm + 3 * 3600, "XC10AAA003", "阿托伐他汀钙片", 28, inst="P9")   # the bill comes later
    b = bill("RETRO", "H1", adm + 5 * 3600, adm)
    res = process(rules, [[dumps(p)], [dumps(b)]], rid)
    assert res[0].alerts == []
    alerts = alerts_of(res)
    assert len(alerts) == 1 and sorted(alerts[0].evidence_event_ids) == sorted([p["event_id"], b["event_id"]])


def test_a_second_stay_without_admission_id_reopens(process, rules):
    rid = run_id()
    adm1, adm2 = T0, T0 + 10 * 86400
    first = [bill("NOAID", "H1", adm1 + 3600, adm1, aid=None),
             bill("NOAID", "H1", adm1 + 3 * 86400, adm1, discharged=adm1 + 3 * 86400, aid=None)]
    second = [bill("NOAID", "H1", adm2 + 3600, adm2, aid=None),
              drug("NOAID", adm2 + 86400, "XC10AAA003", "阿托伐他汀钙片", 28, inst="P9")]
    alerts = alerts_of(process(rules, [[dumps(e) for e in first + second]], rid))
    assert len(alerts) == 1 and alerts[0].metrics["admitted_at"].startswith("2026-11-12")


# ------------------------------------------------------------------------------ (c) child's card

def test_child_card_buying_statins_fires(process, rules):
    rid = run_id()
    evs = [drug("KID", T0, "XC10AAA003", "阿托伐他汀钙片", 56, birth_year=2020, category="child"),
           drug("KID", T0 + 86400, "XA10AEA004", "甘精胰岛素注射液", 15, birth_year=2020, category="child",
                dx=["E11.9"])]                                                # type-2 diabetes at six
    alerts = alerts_of(process(rules, [[dumps(e) for e in evs]], rid))
    assert len(alerts) == 1
    a = alerts[0]
    assert a.metrics["kind"] == "child_adult_drug" and a.metrics["child_age"] == 6
    assert a.metrics["days_supply"] == 71 and a.metrics["adult_drugs"] == ["阿托伐他汀钙片", "甘精胰岛素注射液"]
    assert a.metrics["adult_diagnoses"] == ["E11.9"]
    assert "6 岁儿童" in a.summary and "71 天" in a.summary and "诊断 E11.9" in a.summary


def test_child_lookalikes_never_fire(process, rules):
    rid = run_id()
    evs = [
        drug("T1D", T0, "XA10AEA004", "甘精胰岛素注射液", 15, birth_year=2016, category="child", dx=["E10.9"]),
        drug("T1D", T0 + 86400, "XA10AEA004", "甘精胰岛素注射液", 30, birth_year=2016, category="child"),
        drug("KIDOTC", T0, "XJ01CAA015", "阿莫西林胶囊", 7, birth_year=2019, category="child"),
        drug("ADULT", T0, "XC10AAA003", "阿托伐他汀钙片", 28, birth_year=1960, category="retiree"),
        drug("TEEN", T0, "XC10AAA003", "阿托伐他汀钙片", 28, birth_year=2010, category="child"),     # 16: over the age limit
        drug("SAMPLE", T0, "XC10AAA003", "阿托伐他汀钙片", 7, birth_year=2020, category="child"),    # below min_days_supply
    ]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_child_category_counts_only_when_birth_year_is_missing(process, rules):
    rid = run_id()
    ev = drug("NOBY", T0, "XB01ACA002", "硫酸氢氯吡格雷片", 28, category="child")
    alerts = alerts_of(process(rules, [[dumps(ev)]], rid))
    assert len(alerts) == 1 and alerts[0].metrics["child_age"] is None and "少儿" in alerts[0].summary


def test_exactly_min_days_supply_counts(process, rules):
    rid = run_id()
    ev = drug("EDGE", T0, "XC10AAA003", "阿托伐他汀钙片", 14, birth_year=2018, category="child")
    assert len(alerts_of(process(rules, [[dumps(ev)]], rid))) == 1


# ------------------------------------------------------------------------------ episodes, order, idempotence

def test_one_alert_per_episode_with_every_sign_and_a_new_one_later(process, rules):
    rid = run_id()
    by = 2019
    ep1 = [visit("EPI", "H1", T0, "310151", birth_year=by, insured_category="child"),
           drug("EPI", T0 + 1800, "XC10AAA003", "阿托伐他汀钙片", 28, birth_year=by, category="child",
                inst="P2", district="310120")]
    ep2 = [drug("EPI", T0 + 9 * 86400, "XB01ACA002", "硫酸氢氯吡格雷片", 28, birth_year=by, category="child")]
    alerts = alerts_of(process(rules, [[dumps(e) for e in ep1], [dumps(e) for e in ep2]], rid))
    assert len(alerts) == 2
    first = next(a for a in alerts if len(a.evidence_event_ids) == 2)
    assert first.metrics["kinds"] == ["impossible_travel", "child_adult_drug"]
    assert first.metrics["kind"] == "impossible_travel+child_adult_drug"
    assert first.severity in ("high", "critical")


def _scenario():
    adm = T0
    cards = []
    cards += [visit("O1", "H310151001", T0, "310151"), visit("O1", "H310120001", T0 + 1500, "310120")]
    cards += [bill("O2", "H1", adm + 3600, adm), drug("O2", adm + 86400, "XC10AAA003", "阿托伐他汀钙片", 28, inst="P9")]
    cards += [drug("O3", T0 + 600, "XB01AFA006", "利伐沙班片", 28, birth_year=2021, category="child")]
    cards += [visit("O4", "C1", T0 + k * 900, "310101") for k in range(6)]
    return cards


def test_out_of_order_across_cards_gives_the_same_alerts(process, rules):
    evs = _scenario()
    raw = [dumps(e) for e in evs]

    def run(order):
        res = alerts_of(process(rules, order, run_id()))
        return sorted((a.subject_id, a.metrics["kind"], tuple(sorted(a.evidence_event_ids)), a.window_start, a.window_end)
                      for a in res)

    ref = run([raw])
    assert len(ref) == 3
    rng = random.Random(5)
    for _ in range(3):
        # cards interleave arbitrarily (each card's own events stay in order), in several batches
        per_card: dict[str, list[bytes]] = {}
        for e, r in zip(evs, raw):
            per_card.setdefault(e["card_id"], []).append(r)
        merged: list[bytes] = []
        queues = list(per_card.values())
        while any(queues):
            q = rng.choice([q for q in queues if q])
            merged.append(q.pop(0))
        cut = rng.randrange(1, len(merged))
        assert run([merged[:cut], merged[cut:]]) == ref


def test_redelivered_events_change_nothing(process, rules, redis_sync):
    rid = run_id()
    raw = [dumps(e) for e in _scenario()]
    first = alerts_of(process(rules, [raw], rid))
    again = alerts_of(process(rules, [raw, raw[::-1][:3] + raw], rid))
    key = lambda a: (a.alert_id, tuple(a.evidence_event_ids), a.metrics["kind"], a.window_start, a.window_end)
    assert sorted(map(key, first)) == sorted(map(key, again))
    recent, _ = card_state(redis_sync, rid, "O4")
    assert len(recent) == 6 and len({r[1] for r in recent}) == 6


def test_placeholder_card_is_never_blamed(process, rules):
    rid = run_id()
    evs = [visit("未知", "H310151001", T0, "310151"), visit("未知", "H310120001", T0 + 600, "310120"),
           visit("0000", "H310151001", T0, "310151"), visit("0000", "H310120001", T0 + 600, "310120")]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_every_key_expires(process, rules, redis_sync):
    rid = run_id()
    process(rules, [[dumps(e) for e in _scenario()]], rid)
    keys = list(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    assert any(k.endswith(b":ep") for k in keys)
    _, stays = card_state(redis_sync, rid, "O2")
    assert len(stays) == 1 and stays[0][1].startswith("A20261102001\tH1\t")      # the open stay ...
    assert stays[0][0] == T0 + 3600 + 5184000                                     # ... matters max_stay_s after its bill
    stay_key = f"cw:{rid}:{STAYS}:O2"
    assert redis_sync.ttl(stay_key) > 21600 + 3600                                # kept as long as a stay ...
    assert 0 < redis_sync.ttl(f"cw:{rid}:c:O2") <= 21600 + 3600                   # ... the card hash history_s only
    for k in keys:
        ttl = redis_sync.ttl(k)
        assert 0 < ttl <= 5184000 + 3600, (k, ttl)


def test_recent_settlements_are_pruned_by_event_time(process, rules, redis_sync):
    # the card hash may live longer (other rules); the settlements in it are kept history_s of event time only
    rid = run_id()
    first = [visit("PR", "C1", T0 + k * 900, "310101") for k in range(3)]
    later = visit("PR", "C1", T0 + 1800 + 21600, "310101")          # exactly history_s after the third
    process(rules, [[dumps(e) for e in first], [dumps(later)]], rid)
    recent, stays = card_state(redis_sync, rid, "PR")
    assert [r[1] for r in recent] == [first[2]["event_id"], later["event_id"]] and stays == []
    assert recent[0] == [T0 + 1800, first[2]["event_id"], "310101", "o", "C1"]
    # a stay closed by its discharge is scored history_s after it and dropped history_s after its score
    adm = T0 + 2 * 86400
    process(rules, [[dumps(bill("PR", "H1", adm + 3600, adm, discharged=adm + 3600))]], rid)
    assert card_state(redis_sync, rid, "PR")[1][0][0] == adm + 3600 + 21600
    process(rules, [[dumps(visit("PR", "C1", adm + 3600 + 2 * 21600, "310101"))]], rid)
    assert len(card_state(redis_sync, rid, "PR")[1]) == 1
    process(rules, [[dumps(visit("PR", "C1", adm + 3600 + 2 * 21600 + 1, "310101"))]], rid)
    recent, stays = card_state(redis_sync, rid, "PR")
    assert stays == [] and len(recent) == 2
    assert redis_sync.hexists(f"cw:{rid}:c:PR", STAYS) is False


def test_fractional_event_times_are_kept_exactly(process, rules, redis_sync):
    rid = run_id()
    t1, t2 = T0 + 0.123456, T0 + 1500.654321
    evs = [visit("FRAC", "H310151001", t1, "310151"), visit("FRAC", "H310120001", t2, "310120")]
    alerts = alerts_of(process(rules, [[dumps(e) for e in evs]], rid))
    assert len(alerts) == 1 and alerts[0].metrics["gap_s"] == int(t2 - t1)
    recent, _ = card_state(redis_sync, rid, "FRAC")
    assert [float(r[0]) for r in recent] == [t1, t2]


# ------------------------------------------------------------------------------ parameters

@pytest.mark.parametrize("over, message", [
    ({"max_speed_kmh": 0}, "shared_card: max_speed_kmh must be a positive number, got 0"),
    ({"min_distance_km": -1}, "shared_card: min_distance_km must be a non-negative number, got -1"),
    ({"slack_s": 1.5}, "shared_card: slack_s must be a non-negative integer, got 1.5"),
    ({"history_s": 0}, "shared_card: history_s must be a positive integer, got 0"),
    ({"history_s": 60}, "shared_card: history_s must cover the longest trip ("),
    ({"stay_grace_s": -5}, "shared_card: stay_grace_s must be a non-negative integer, got -5"),
    ({"episode_s": "week"}, "shared_card: episode_s must be a positive integer, got 'week'"),
    ({"child_max_age": 30}, "shared_card: child_max_age must be <= 18, got 30"),
    ({"adult_diagnoses": "E11"}, "shared_card: adult_diagnoses must be a list of ICD-10 code prefixes, got 'E11'"),
    ({"adult_drugs": {"codes": ["X"]}}, "shared_card: adult_drugs must be a mapping with code_prefixes and name_keywords"),
    ({"districts": {}}, "shared_card: districts must be a non-empty mapping of district code to {lat, lon}, got {}"),
    ({"districts": {"310101": {"lat": 131.2, "lon": 121.4}}},
     "shared_card: districts['310101'].lat must be a number in [-90, 90], got 131.2"),
    ({"districts": {"310101": {"lat": 31.2, "lon": 121.4, "neighbours": ["310999"]}}},
     "shared_card: districts['310101'].neighbours has unknown district(s) ['310999']"),
    ({"districts": {"310101": {"lat": 31.2, "lon": 121.4, "radius": 3}}},
     "shared_card: districts['310101'] has unknown field(s) ['radius']"),
])
def test_parameters_validated_at_construction(over, message):
    kw = {"districts": DISTRICTS, **over}
    with pytest.raises(ValueError) as exc:
        SharedCard(**kw)
    assert str(exc.value).startswith(message)


def test_stored_text_is_the_same_whichever_way_it_was_written(process, rules, redis_sync):
    """A first settlement's text is built in Python, a later one appended to it; cjson re-encodes when one goes
    in earlier. All three must write what cjson writes, byte for byte, hostile ids included."""
    a = visit("TXT", 'H/1"\\\x7f\x01é', T0, "310101", event_id='E/1"\\\x7f\x02中')
    b = visit("TXT", "H\x03/2", T0 + 60.5, "310115", event_id="E/2\x7f")
    texts = []
    for order in ([[dumps(a)], [dumps(b)]], [[dumps(a), dumps(b)]], [[dumps(b)], [dumps(a)]]):
        rid = run_id()
        process(rules, order, rid)
        texts.append(redis_sync.hget(f"cw:{rid}:c:TXT", RECENT))
        assert len(card_state(redis_sync, rid, "TXT")[0]) == 2
    assert texts[0] == texts[1] == texts[2]
    assert redis_sync.eval("return cjson.encode(cjson.decode(ARGV[1]))", 0, texts[0]) == texts[0]
    one = run_id()
    process(rules, [[dumps(a)]], one)
    text = redis_sync.hget(f"cw:{one}:c:TXT", RECENT)
    assert b"\\/" in text and b"\\u007f" in text
    assert redis_sync.eval("return cjson.encode(cjson.decode(ARGV[1]))", 0, text) == text


def test_settlements_out_of_reach_of_the_next_one_are_dropped_but_an_inpatient_bill_still_sees_them(
        process, rules, redis_sync):
    # the card hash outlives history_s when other rules keep it: the next settlement finds only stale ones
    rid = run_id()
    old = [visit("OLD", "C1", T0 + k * 900, "310101") for k in range(3)]
    new = visit("OLD", "C2", T0 + 1800 + 21600 + 0.5, "310115")   # just past history_s after the newest
    process(rules, [[dumps(e) for e in old], [dumps(new)]], rid)
    recent, _ = card_state(redis_sync, rid, "OLD")
    assert recent == [[f"{T0 + 1800 + 21600 + 0.5:.17g}", new["event_id"], "310115", "o", "C2"]]
    assert redis_sync.eval("return cjson.encode(cjson.decode(ARGV[1]))", 0,
                           redis_sync.hget(f"cw:{rid}:c:OLD", RECENT)) == redis_sync.hget(f"cw:{rid}:c:OLD", RECENT)
    # an inpatient bill looks back over the recent settlements the card still holds, stale or not
    rid = run_id()
    adm = T0 - 86400
    process(rules, [[dumps(bill("OLD", "H1", adm + 3600, adm))], [dumps(e) for e in old]], rid)
    bill_late = bill("OLD", "H1", T0 + 1800 + 21600 + 60, adm)
    alerts = alerts_of(process(rules, [[dumps(bill_late)]], rid))
    assert alerts and "inpatient_overlap" in alerts[0].metrics["kinds"]
    assert card_state(redis_sync, rid, "OLD")[0] == []
