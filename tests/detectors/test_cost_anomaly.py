"""cost_anomaly against the real Redis: monthly/yearly cost, 门诊大病, chronic refills, peers, idempotence, expiry."""

from __future__ import annotations

import random
import uuid
from datetime import datetime

import orjson
import pytest

from detectors.config import load_rules_text
from detectors.cost_anomaly import CostAnomaly
from tests.helpers import TZ, dumps, make_event, once_and_twice

SPECIAL = "[N18.5, N18.6, Z49, Z99.2, C, Z51.0, Z51.1, Z94, F20, F25, F31, D61, D66, D67, D68]"
RULES = f"""
lateness_s: 3600
rules:
  cost_anomaly:
    sub_rules:
      - {{name: outpatient_cost_month, window: month, min_amount_cny: 5000}}
      - {{name: outpatient_cost_year, window: year, min_amount_cny: 20000}}
    visit_types: [outpatient, emergency, pharmacy]
    special_dx_prefixes: {SPECIAL}
    peers: {{min_amount_cny: 3000, quantile: 0.99, factor: 3.0, min_peer_size: %d,
             buckets: [50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 20000]}}
"""
NOV = datetime(2026, 11, 1, tzinfo=TZ).timestamp()


@pytest.fixture
def rules():
    return load_rules_text(RULES % 30)


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def at(day: int, hour: float, month: int = 11) -> float:
    return datetime(2026, month, 1, tzinfo=TZ).timestamp() + (day - 1) * 86400 + hour * 3600


def bill(card: str, t: float, amount: float, *, vt: str = "outpatient", inst: str = "H001", dx: str | None = "K29.7",
         cat: str = "employee", born: int = 1990, fund_share: float = 0.7, **over) -> bytes:
    itype = "pharmacy" if inst.startswith("P") else "hospital"
    ev = make_event(card, inst, t, institution_type=itype, institution_level=None if itype == "pharmacy" else 3,
                    visit_type=vt, department=None if itype == "pharmacy" else "消化内科",
                    physician_id=None if itype == "pharmacy" else "D" + inst[1:] + "001",
                    diagnoses=[dx] if dx else [], total_amount=amount, fund_paid=round(amount * fund_share, 2),
                    self_paid=round(amount * (1 - fund_share), 2), insured_category=cat, birth_year=born,
                    items=[{"code": "XB05AAA030", "name": "人血白蛋白", "category": "drug", "quantity": 1,
                            "amount": amount}], **over)
    return dumps(ev)


def alerts_of(results):
    out = {}
    for r in results:
        for a in r.alerts:
            out[a.alert_id] = a
    return list(out.values())


def final(results):
    out: dict[str, tuple] = {}
    for r in results:
        for a in r.alerts:
            ev = set(a.evidence_event_ids) | (out[a.alert_id][0] if a.alert_id in out else set())
            out[a.alert_id] = (ev, a.summary, str(a.metrics), a.severity, a.window_start, a.window_end)
    return out


def test_fires_at_five_thousand_a_month_exactly_and_reports_fund_paid(process, rules):
    rid = run_id()
    evs = [bill("C5K", at(2, 9), 1800.0), bill("C5K", at(9, 9), 1700.0),
           bill("C5K", at(12, 19), 1499.99, vt="pharmacy", inst="P001")]
    assert alerts_of(process(rules, [evs], rid)) == []                          # ¥4,999.99
    a, = alerts_of(process(rules, [[bill("C5K", at(20, 9), 0.01, inst="H002")]], rid))   # exactly ¥5,000
    assert (a.rule, a.subject_type, a.subject_id) == ("cost_anomaly", "card", "C5K")
    assert a.metrics["fired"] == ["outpatient_cost_month"] and a.metrics["bucket"] == "2026-11"
    assert a.metrics["outpatient_cost_cny"] == 5000.0 and a.metrics["fund_paid_cny"] == pytest.approx(3500.0, abs=0.02)
    assert len(a.evidence_event_ids) == 4 and a.severity == "medium"
    assert "2026-11 门诊费用 ¥5,000（阈值 ¥5,000），其中统筹基金支付 ¥3,500" in a.summary
    assert a.rule_version == rules.versions["cost_anomaly"]


def test_severity_grows_and_inpatient_bills_never_count(process, rules):
    rid = run_id()
    evs = [bill("INP", at(3, 9), 30000.0, vt="inpatient", admission_id="A1")] + \
        [bill("INP", at(4, 9), 4000.0)]
    assert alerts_of(process(rules, [evs], rid)) == []
    a, = alerts_of(process(rules, [[bill("BIG", at(4, 9), 12000.0)]], rid))
    assert a.severity == "critical" and a.score == pytest.approx(2.4)


def test_year_threshold_across_months(process, rules):
    rid = run_id()
    evs = [bill("YR", at(5, 10, month=m), 4000.0) for m in range(3, 8)]             # ¥4,000 x 5 months
    alerts = alerts_of(process(rules, [evs[:4], evs[4:]], rid))
    assert [a.metrics["fired"] for a in alerts] == [["outpatient_cost_year"]]
    a = alerts[0]
    assert a.metrics["bucket"] == "2026" and a.metrics["outpatient_cost_cny"] == 20000.0
    assert "2026 年门诊费用 ¥20,000（阈值 ¥20,000）" in a.summary


def test_dialysis_and_chronic_refills_are_not_flagged(process):
    rules = load_rules_text(RULES % 3)
    rid = run_id()
    batches = []
    for w in range(6):           # haemodialysis 3x a week, ~¥740 a session: ~¥9,600 a month, N18.5
        card = f"DIA{w}"
        batches.append([bill(card, at(d, 16.5), 743.0 + w, dx="N18.5", cat="retiree", born=1957)
                        for d in range(2, 31) if (d - 2) % 7 in (0, 2, 4)])
    # a chronic patient's 90-day long prescription (insulin, statin, clopidogrel) and monthly refills
    batches.append([bill("CHRON", at(3, 9), 2860.0, dx="E11.9", cat="retiree", born=1950),
                    bill("CHRON", at(20, 9), 1200.0, inst="P002", vt="pharmacy", dx="I25.1", cat="retiree", born=1950)])
    res = process(rules, batches, rid)
    assert alerts_of(res) == []


def test_peers_flag_cost_far_above_the_group(process):
    rules = load_rules_text(RULES % 10)
    rid = run_id()
    peers = [bill(f"P{i}", at(1 + i % 4, 10), 60.0 + 7 * (i % 20), dx="J06.9") for i in range(60)]
    odd = [bill("ODD", at(5, 9), 1800.0, dx="J06.9"), bill("ODD", at(6, 9), 1500.0, dx="J06.9")]
    a, = alerts_of(process(rules, [peers, odd], rid))
    assert a.subject_id == "ODD" and a.metrics["fired"] == ["peers"]
    assert a.metrics["peer_bound_cny"] == 3000.0 and a.metrics["peers"] == 60
    assert "同类参保人（在职职工 35-44 岁 X 呼吸系统疾病，60 人）" in a.summary
    # ¥2,900 stays below the ¥3,000 floor
    rid = run_id()
    assert alerts_of(process(rules, [peers, [bill("ODD", at(5, 9), 2900.0, dx="J06.9")]], rid)) == []


def test_out_of_order_across_cards_within_lateness_gives_the_same_alerts(process):
    rules = load_rules_text(RULES % 10)
    evs = [(at(1 + i % 4, 10 + (i % 7) / 3), f"P{i}", 60.0 + 7 * (i % 20)) for i in range(60)]
    evs += [(at(5, 9), "ODD", 1800.0), (at(6, 9), "ODD", 1500.0), (at(6, 12), "ODD", 400.0)]
    evs += [(at(d, 8), "BIG", 900.0) for d in range(1, 8)]
    evs = [(t, c, bill(c, t, amt, dx="J06.9", born=1950 if c == "BIG" else 1990)) for t, c, amt in evs]
    in_order = [b for _, _, b in sorted(evs, key=lambda x: x[0])]
    rnd = random.Random(11)
    lagged = [b for _, _, b in sorted(evs, key=lambda x: x[0] + (rnd.uniform(0, 3300) if x[1].startswith("P") else 0))]
    assert lagged != in_order
    a = final(process(rules, [in_order[i:i + 9] for i in range(0, len(in_order), 9)], run_id()))
    b = final(process(rules, [lagged], run_id()))
    assert len(a) == 2
    assert sorted((sorted(v[0]),) + v[1:] for v in a.values()) == sorted((sorted(v[0]),) + v[1:] for v in b.values())


#: the card state as JSON (it is MessagePack in the card hash)
UNPACK = "local v = redis.call('HGET', KEYS[1], ARGV[1]) if v then return cjson.encode(cmsgpack.unpack(v)) end"


def card_state(redis_sync, rid: str, card: str) -> tuple[dict, dict]:
    """The card's state (its field of the card hash): years {end: [cost, fund paid]} (fen) and months
    {end: {"a", "f", "sa" (fen), "ev" (event id -> time)}}."""
    raw = redis_sync.eval(UNPACK, 1, f"cw:{rid}:h:{card}", CostAnomaly.FIELD)
    if raw is None:
        return {}, {}
    years, months = orjson.loads(raw)
    years, months = years or [], months or []   # (cjson writes an empty list as {})
    return ({y[0]: y[1:] for y in years},
            {m[0]: {"a": m[1], "f": m[2], "sa": m[3], "ev": dict(zip(m[4][0::2], m[4][1::2]))} for m in months})


def test_redelivered_events_are_summed_once(process, rules, redis_sync):
    rid = run_id()
    evs = [bill("RED", at(d, 9), 1000.0) for d in range(2, 6)]
    assert alerts_of(process(rules, [evs * 2, evs], rid)) == []                  # ¥4,000, three times
    years, months = card_state(redis_sync, rid, "RED")
    state, = months.values()
    assert state["a"] == 400000 and len(state["ev"]) == 4 and list(years.values()) == [[400000, 280000]]
    last = bill("RED", at(9, 9), 1000.0, event_id="LAST")
    first = alerts_of(process(rules, [[last]], rid))
    again = alerts_of(process(rules, [[last, last]], rid))
    assert len(first) == len(again) == 1 and first[0].alert_id == again[0].alert_id
    assert first[0].metrics == again[0].metrics and first[0].metrics["outpatient_cost_cny"] == 5000.0


def test_month_and_year_states_across_boundaries_within_lateness(process, rules, redis_sync):
    """A card keeps its previous month and year while an event can still reach them (within lateness, or
    redelivered: a day more): a late December bill still completes December's ¥5,000 after January began,
    whatever the order within lateness; the batch redelivered after a later one fires the same alert; a bill
    of a month no longer kept is ignored (it is late)."""
    jan1 = datetime(2027, 1, 1, tzinfo=TZ).timestamp()
    dec_a, jan_a = bill("YB", jan1 - 1800, 3000.0), bill("YB", jan1 + 1200, 100.0)
    dec_b, jan_b = bill("YB", jan1 - 600, 2000.0), bill("YB", jan1 + 3 * 3600, 100.0)
    jan_c = bill("YB", jan1 + 86400 + 3600, 100.0)   # a day and an hour into the new year
    states = []
    for order in ([dec_a, dec_b, jan_a], [dec_a, jan_a, dec_b]):
        rid = run_id()
        a, = alerts_of(process(rules, [order], rid))
        assert a.metrics["bucket"] == "2026-12" and a.metrics["outpatient_cost_cny"] == 5000.0
        assert len(a.evidence_event_ids) == 2
        years, months = card_state(redis_sync, rid, "YB")
        assert [m["a"] for m in months.values()] == [500000, 10000]
        assert [y[0] for y in years.values()] == [500000, 10000]
        again, = alerts_of(process(rules, [[jan_b], order], rid)[1:])   # redelivered after a later batch
        assert (again.alert_id, again.metrics, again.evidence_event_ids) == \
            (a.alert_id, a.metrics, a.evidence_event_ids)
        process(rules, [[jan_c]], rid)   # December and 2026 are no longer kept
        years, months = card_state(redis_sync, rid, "YB")
        assert [m["a"] for m in months.values()] == [30000] and [y[0] for y in years.values()] == [30000]
        states.append(redis_sync.hget(f"cw:{rid}:h:YB", CostAnomaly.FIELD))
        assert alerts_of(process(rules, [[bill("YB", jan1 - 60, 9000.0)]], rid)) == []   # late: ignored
        assert redis_sync.hget(f"cw:{rid}:h:YB", CostAnomaly.FIELD) == states[-1]
    assert states[0] == states[1]


@pytest.mark.parametrize("peers_on", [True, False])
def test_a_cards_first_bill_written_from_python_is_the_state_lua_writes(process, redis_sync, peers_on):
    """A card's only bill of a batch, its first, is written as the state Python built (no decode or encode in
    Lua): byte for byte the state the script writes when it builds it (here: the bill twice in its batch), the
    same histograms, the same alerts (month and year thresholds, peers), hostile ids, fractional times,
    门诊大病 and cards that already have a state (those take the script's path) included."""
    text = RULES % 30
    if not peers_on:
        text = text.replace("peers: {min_amount_cny", "peers: {enabled: false, min_amount_cny")
    rules = load_rules_text(text)
    peers = [bill(f"P{i}", at(2, 9) + i, 200.0) for i in range(40)]
    odd = ['"q\\', "卡/\u2028", "x" * 40, "y" * 60, "e\x7f"]   # (event ids)
    firsts = [bill("N1", at(10, 9), 100.0), bill("N2", at(10, 9.5) + 0.125, 5000.0),
              bill("N3", at(10, 10) + 0.001, 3500.0), bill("N4", at(10, 11), 21000.0, dx="N18.501"),
              bill("N5", at(10, 12), 4999.99, vt="pharmacy", inst="P002"), bill("P0", at(10, 13), 150.0),
              bill("N6", at(10, 14), 30.0, vt="emergency", dx=None, cat="retiree", born=1940),
              bill("N7", at(10, 15), 2.5, vt="inpatient")]
    firsts += [bill(f"O{j}{c[:40]}", at(10, 16) + j / 7, 6000.0 * (j + 1), event_id=c + str(j)) for j, c in enumerate(odd)]
    runs = once_and_twice(process, rules, redis_sync, [peers, firsts])
    (alerts_a, state_a, calls_a), (alerts_b, state_b, calls_b) = runs
    assert alerts_a == alerts_b
    assert calls_a - calls_b == len(peers) + len(firsts) - 1   # every first bill took the Python state's path
    fired = {c[1] for c in alerts_a}
    assert "N2" in fired and not fired & {"N1", "N4", "N6", "N7", "P0"}
    assert ("N3" in fired) == ("N5" in fired) == peers_on   # over the peer bound (¥3,000), under ¥5,000
    assert sum(c[1].startswith("O") for c in alerts_a) == 5 + 2   # a month and a year alert for the last two
    assert state_a == state_b
    assert any(":h:N1" in k for k in state_a) and any(":peer:" in k for k in state_a) == peers_on


def test_every_key_expires(process, redis_sync):
    rules = load_rules_text(RULES % 3)
    rid = run_id()
    process(rules, [[bill(f"K{i}", at(2 + i % 2, 9), 100.0 * i) for i in range(8)] +
                    [bill("KK", at(d, 9), 2000.0) for d in range(3, 7)]], rid)
    keys = list(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    assert any(b":peer:" in k for k in keys) and any(b":h:" in k for k in keys)
    assert card_state(redis_sync, rid, "KK")[0], "the year state is kept"
    for k in keys:
        ttl = redis_sync.ttl(k)
        limit = 366 * 86400 + 3600 if b":h:" in k else 31 * 86400 + 3600   # the card hash holds the year
        assert 0 < ttl <= limit, (k, ttl)


@pytest.mark.parametrize("kwargs, message", [
    ({"sub_rules": []}, "cost_anomaly: sub_rules must be a non-empty list, got []"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_amount_cny": -1}]},
     "cost_anomaly: sub_rules[0].min_amount_cny must be a positive number, got -1"),
    ({"sub_rules": [{"name": "m", "window": "quarter", "min_amount_cny": 1}]},
     "cost_anomaly: sub_rules[0].window must be 'month' or 'year', got 'quarter'"),
    ({"sub_rules": [{"name": "m", "window": "month"}]}, "cost_anomaly: sub_rules[0].min_amount_cny is required"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_amount_cny": 1, "cap": 2}]},
     "cost_anomaly: sub_rules[0] has unknown field(s) ['cap']"),
    ({"sub_rules": [{"name": "", "window": "month", "min_amount_cny": 1}]},
     "cost_anomaly: sub_rules[0].name must be a non-empty string, got ''"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_amount_cny": 1}], "visit_types": ["inpatient"]},
     "cost_anomaly: visit_types must be a non-empty list of 'outpatient', 'emergency' and/or 'pharmacy', "
     "got ['inpatient']"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_amount_cny": 1}],
      "peers": {"min_amount_cny": 3000, "quantile": 0.4}},
     "cost_anomaly: peers.quantile must be a number between 0.5 and 1 (exclusive), got 0.4"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_amount_cny": 1}],
      "peers": {"min_amount_cny": 3000, "min_peer_size": 0}},
     "cost_anomaly: peers.min_peer_size must be a positive integer, got 0"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_amount_cny": 1}], "peers": {"min_amount_cny": 3000, "x": 1}},
     "cost_anomaly: peers has unknown field(s) ['x']"),
])
def test_parameters_validated_at_construction(kwargs, message):
    with pytest.raises(ValueError) as exc:
        CostAnomaly(**kwargs)
    assert str(exc.value) == message
