"""visit_frequency against the real Redis: Shanghai's thresholds, visits, 门诊大病, peers, idempotence, expiry."""

from __future__ import annotations

import random
import uuid
from datetime import datetime

import orjson
import pytest

from detectors.config import load_rules_text
from detectors.visit_frequency import VisitFrequency
from tests.helpers import TZ, dumps, make_event, once_and_twice

SPECIAL = "[N18.5, N18.6, Z49, Z99.2, C, Z51.0, Z51.1, Z94, F20, F25, F31, D61, D66, D67, D68]"
RULES = f"""
lateness_s: 3600
rules:
  visit_frequency:
    sub_rules:
      - {{name: outpatient_month, window: month, min_visits: 15, visit_types: [outpatient]}}
      - {{name: outpatient_emergency_month, window: month, min_visits: 20, visit_types: [outpatient, emergency]}}
      - {{name: busy_days_month, window: month, min_days: 3, min_visits_per_day: 5}}
      - {{name: multi_institution_days_month, window: month, min_days: 3, min_institutions_per_day: 4}}
      - {{name: visits_year, window: year, min_visits: 100, visit_types: [outpatient, emergency]}}
    special_dx_prefixes: {SPECIAL}
    peers: {{min_visits: 8, quantile: 0.99, factor: 3.0, min_peer_size: %d}}
"""
NOV = datetime(2026, 11, 1, tzinfo=TZ).timestamp()   # a Sunday


@pytest.fixture
def rules():
    return load_rules_text(RULES % 30)


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def at(day: int, hour: float) -> float:
    """Event time: November ``day`` 2026 at ``hour`` (+08:00)."""
    return NOV + (day - 1) * 86400 + hour * 3600


def visit(card: str, inst: str, t: float, *, dept: str = "全科", dx: str = "J06.9", vt: str = "outpatient",
          reg: bool = True, amount: float = 40.0, cat: str = "employee", born: int = 1985, **over) -> bytes:
    items = [{"code": "R0001", "name": "普通门诊挂号", "category": "registration", "quantity": 1, "amount": 14.0}] \
        if reg else []
    items.append({"code": "XJ01CAA015", "name": "阿莫西林胶囊", "category": "drug", "quantity": 1, "amount": amount})
    total = round(sum(i["amount"] for i in items), 2)
    ev = make_event(card, inst, t, institution_type="community" if inst.startswith("C") else "hospital",
                    institution_level=1 if inst.startswith("C") else 2, visit_type=vt, department=dept,
                    physician_id="D" + inst[1:] + "001", diagnoses=[dx], items=items, total_amount=total,
                    fund_paid=round(total * 0.7, 2), self_paid=round(total * 0.3, 2), insured_category=cat,
                    birth_year=born, **over)
    return dumps(ev)


def alerts_of(results):
    out = {}
    for r in results:
        for a in r.alerts:
            out[a.alert_id] = a
    return list(out.values())


def final(results):
    """alert_id -> (evidence set, summary, metrics): what the store ends up with (evidence merged)."""
    out: dict[str, tuple] = {}
    for r in results:
        for a in r.alerts:
            ev = set(a.evidence_event_ids) | (out[a.alert_id][0] if a.alert_id in out else set())
            out[a.alert_id] = (ev, a.summary, a.metrics, a.severity, a.window_start, a.window_end)
    return out


def test_fires_at_fifteen_outpatient_visits_in_a_month_not_fourteen(process, rules):
    rid = run_id()
    evs = [visit("V15", f"C00{d % 3}", at(d, 9)) for d in range(1, 16)]
    assert alerts_of(process(rules, [evs[:14]], rid)) == []      # 14: exactly one below
    alerts = alerts_of(process(rules, [evs[14:]], rid))
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.subject_type, a.subject_id) == ("visit_frequency", "card", "V15")
    assert a.metrics["fired"] == ["outpatient_month"] and a.metrics["outpatient_month"] == 15
    assert a.metrics["bucket"] == "2026-11" and a.window_s == 30 * 86400
    assert len(a.evidence_event_ids) == 15
    assert "2026-11 门诊就诊 15 次（阈值 15 次）" in a.summary
    assert a.window_start.startswith("2026-11-01T09:00") and a.window_end.startswith("2026-11-15T09:00")
    assert a.rule_version == rules.versions["visit_frequency"]


def test_emergency_visits_count_towards_twenty_but_not_fifteen(process, rules):
    rid = run_id()
    evs = [visit("VE", "H001", at(d, 9)) for d in range(1, 15)]                       # 14 outpatient
    evs += [visit("VE", "H002", at(d, 22), vt="emergency", dept="急诊科") for d in range(1, 6)]   # + 5 emergency
    assert alerts_of(process(rules, [evs], rid)) == []
    a, = alerts_of(process(rules, [[visit("VE", "H002", at(6, 22), vt="emergency", dept="急诊科")]], rid))
    assert a.metrics["fired"] == ["outpatient_emergency_month"] and a.metrics["outpatient_emergency_month"] == 20
    assert "门急诊就诊 20 次" in a.summary


def test_busy_days_more_than_four_visits_a_day_on_three_days(process, rules):
    rid = run_id()
    depts = ["全科", "中医科", "康复科"]

    def day(d, n):  # n visits at two institutions, different departments (emergency ones: 19 < 20 in total)
        return [visit("BUSY", f"C00{k % 2}", at(d, 8 + k), dept=depts[k // 2], vt="emergency" if k > 1 else "outpatient")
                for k in range(n)]
    assert alerts_of(process(rules, [day(2, 5) + day(3, 5) + day(4, 4)], rid)) == []   # 4 a day is not > 4
    a, = alerts_of(process(rules, [day(9, 5)], rid))
    assert a.metrics["fired"] == ["busy_days_month"] and a.metrics["busy_days_month"] == 3
    assert "3 天单日就诊超过 4 次" in a.summary


def test_more_than_three_institutions_a_day_on_three_days(process, rules):
    rid = run_id()
    def day(d, n):
        return [visit("HOPV", f"H{k:03d}", at(d, 8 + 2 * k), vt="emergency" if k else "outpatient") for k in range(n)]
    assert alerts_of(process(rules, [day(2, 4) + day(5, 4) + day(6, 3)], rid)) == []
    a, = alerts_of(process(rules, [day(7, 4)], rid))
    assert a.metrics["fired"] == ["multi_institution_days_month"]
    assert "超过 3 家机构" in a.summary and "阈值 3 天" in a.summary


def test_one_visit_settled_in_parts_or_twice_counts_once(process, rules):
    rid = run_id()
    evs = []
    for d in range(1, 15):
        evs.append(visit("PARTS", "H001", at(d, 9)))
        evs.append(visit("PARTS", "H001", at(d, 10), reg=False, amount=80))      # tests paid separately
    bill = orjson.loads(visit("PARTS", "H001", at(15, 9)))
    dup = dict(bill, event_id="DUP-" + bill["event_id"], event_time=datetime.fromtimestamp(at(15, 9.05), TZ).isoformat())
    evs += [dumps(bill), dumps(dup)]                                              # the same bill settled twice
    evs += [dumps(make_event("PARTS", "P001", at(d, 18))) for d in range(1, 10)]   # pharmacy purchases: not visits
    a, = alerts_of(process(rules, [evs], rid))
    assert a.metrics["outpatient_month"] == 15
    # a second registration at the same place and day is a second visit
    a, = alerts_of(process(rules, [[visit("PARTS", "H001", at(16, 9)), visit("PARTS", "H001", at(16, 14), amount=55)]],
                           rid))
    assert a.metrics["outpatient_month"] == 17
    # so is a bill without a registration for another diagnosis (the same one is part of the visit)
    a, = alerts_of(process(rules, [[visit("PARTS", "H001", at(16, 15), reg=False, dx="M54.5"),
                                    visit("PARTS", "H001", at(16, 16), reg=False, dx="M54.5", amount=12)]], rid))
    assert a.metrics["outpatient_month"] == 18


def test_dialysis_patients_are_compared_with_dialysis_patients_not_flagged(process):
    rules = load_rules_text(RULES % 3)
    rid = run_id()
    batches = []
    for w in range(5):            # Mon/Wed/Fri sessions all month + a cold: 14 dialysis visits, 2 others
        card = f"DIA{w}"
        evs = [visit(card, "H009", at(d, 16.5), dept="肾内科", dx="N18.5", cat="retiree", born=1958)
               for d in range(2, 31) if (d - 2) % 7 in (0, 2, 4)]
        evs += [visit(card, "C001", at(10, 9), dx="J06.9", cat="retiree", born=1958),
                visit(card, "H001", at(10, 14), dx="J06.9", dept="呼吸内科", cat="retiree", born=1958)]
        batches.append(sorted(evs, key=lambda b: orjson.loads(b)["event_time"]))
    res = process(rules, batches, rid)
    assert alerts_of(res) == []


def test_peers_flag_a_card_far_above_its_group(process):
    rules = load_rules_text(RULES % 5)
    rid = run_id()
    peers = [visit(f"PEER{i}", "C001", at(1 + i % 3, 9 + i % 5)) for i in range(40)]
    odd = [visit("ODD", f"C00{k % 4}", at(3 + k // 3, 9 + 3 * (k % 3))) for k in range(8)]
    res = process(rules, [peers, odd], rid)
    a, = alerts_of(res)
    assert a.subject_id == "ODD" and a.metrics["fired"] == ["peers"]
    assert a.metrics["peers"] >= 5 and a.metrics["peer_p99_visits"] == 1 and a.metrics["peer_bound_visits"] == 8
    assert "同类参保人（在职职工 35-44 岁 X 呼吸系统疾病" in a.summary
    # 7 visits: below the floor of 8, whatever the peers do
    rid = run_id()
    assert alerts_of(process(rules, [peers, odd[:7]], rid)) == []


def test_out_of_order_across_cards_within_lateness_gives_the_same_alerts(process):
    rules = load_rules_text(RULES % 5)
    evs = [(at(1 + i % 3, 9 + i % 5), f"PEER{i}") for i in range(40)]
    evs += [(at(3 + k // 3, 9 + 3 * (k % 3)), "ODD") for k in range(9)]
    evs += [(at(d, 8), "FIFT") for d in range(1, 17)]
    evs = [(t, card, visit(card, "C001" if card.startswith("PEER") else f"C00{i % 4}", t,
                           born=1950 if card == "FIFT" else 1985)) for i, (t, card) in enumerate(evs)]
    in_order = [b for _, _, b in sorted(evs, key=lambda x: x[0])]
    # the peers' partition lags by up to 50 minutes (each card's own events stay in order)
    rnd = random.Random(7)
    lagged = [b for _, _, b in sorted(evs, key=lambda x: x[0] + (rnd.uniform(0, 3000) if x[1].startswith("PEER") else 0))]
    assert lagged != in_order
    a = final(process(rules, [in_order[i:i + 7] for i in range(0, len(in_order), 7)], run_id()))
    b = final(process(rules, [lagged], run_id()))
    assert len(a) == len(b) == 2
    assert sorted((sorted(v[0]), v[1], v[3], v[4], v[5]) for v in a.values()) == \
        sorted((sorted(v[0]), v[1], v[3], v[4], v[5]) for v in b.values())
    assert sorted(str(v[2]) for v in a.values()) == sorted(str(v[2]) for v in b.values())


#: the card state as JSON (it is MessagePack in the card hash)
UNPACK = "local v = redis.call('HGET', KEYS[1], ARGV[1]) if v then return cjson.encode(cmsgpack.unpack(v)) end"


def card_state(redis_sync, rid: str, card: str) -> tuple[dict, dict]:
    """The card's state (its field of the card hash): years {end: [outpatient, emergency]} and months
    {end: {"o", "em", "pv", "ev" (event id -> time), "days" (day -> [visits, institutions])}}."""
    raw = redis_sync.eval(UNPACK, 1, f"cw:{rid}:h:{card}", VisitFrequency.FIELD)
    if raw is None:
        return {}, {}
    years, months = orjson.loads(raw)
    years, months = years or [], months or []   # (cjson writes an empty list as {})
    return ({y[0]: y[1:] for y in years},
            {m[0]: {"o": m[1], "em": m[2], "pv": m[3], "ev": dict(zip(m[4][0::2], m[4][1::2])),
                    "days": {d: m[6][i + 1:i + 3] for i, d in enumerate(m[6]) if i % 3 == 0}} for m in months})


def test_redelivered_events_change_nothing(process, rules, redis_sync):
    rid = run_id()
    evs = [visit("RED", "C001", at(d, 9)) for d in range(1, 15)]
    assert alerts_of(process(rules, [evs * 3, evs], rid)) == []                   # 14 visits, four times
    years, months = card_state(redis_sync, rid, "RED")
    state, = months.values()
    assert state["o"] == 14 and len(state["ev"]) == 14 and list(years.values()) == [[14, 0]]
    first = alerts_of(process(rules, [[visit("RED", "C001", at(20, 9), event_id="LAST")]], rid))
    again = alerts_of(process(rules, [[visit("RED", "C001", at(20, 9), event_id="LAST")]], rid))
    assert len(first) == len(again) == 1 and first[0].alert_id == again[0].alert_id
    assert first[0].metrics == again[0].metrics and first[0].evidence_event_ids == again[0].evidence_event_ids


def test_year_rule_and_month_buckets(process, rules):
    rid = run_id()
    evs = []
    for month in range(1, 11):                     # 10 visits a month Jan-Oct: no month fires, the year does
        t0 = datetime(2026, month, 3, tzinfo=TZ).timestamp()
        evs += [visit("YEAR", f"C00{k % 3}", t0 + k * 86400 + 9 * 3600) for k in range(10)]
    alerts = alerts_of(process(rules, [evs[:99], evs[99:]], rid))
    assert [a.metrics["fired"] for a in alerts] == [["visits_year"]]
    a = alerts[0]
    assert a.metrics["bucket"] == "2026" and a.metrics["visits_year"] == 100 and a.window_s == 365 * 86400
    assert "2026 年门急诊就诊 100 次（阈值 100 次）" in a.summary
    # a new month starts from zero
    rid = run_id()
    split = [visit("SPLIT", "C001", at(d, 9)) for d in range(20, 31)] + \
        [visit("SPLIT", "C001", datetime(2026, 12, d, 9, tzinfo=TZ).timestamp()) for d in range(1, 6)]
    assert alerts_of(process(rules, [split], rid)) == []


def test_month_and_year_states_across_boundaries_within_lateness(process, rules, redis_sync):
    """A card keeps its previous month only while an event can still reach it (within lateness, or
    redelivered: a day more): the arrival order within lateness changes nothing, a redelivered batch gives
    the same verdicts, and an event of a month no longer kept is ignored (it is late)."""
    def ev(inst, t, **kw):
        return visit("MB", inst, t, **kw)
    dec1 = datetime(2026, 12, 1, tzinfo=TZ).timestamp()
    nov, dec = dec1, dec1 + 31 * 86400          # month ends
    nov_a, dec_a = ev("C001", dec1 - 1800), ev("C002", dec1 + 1200)
    nov_b, dec_b = ev("C003", dec1 - 600), ev("C004", dec1 + 3600)
    dec_c = ev("C005", dec1 + 86400 + 3600)     # a day and an hour past the end of November
    states = []
    for order in ([nov_a, nov_b, dec_a], [nov_a, dec_a, nov_b]):
        rid = run_id()
        process(rules, [order], rid)
        years, months = card_state(redis_sync, rid, "MB")
        assert {e: (m["o"], m["pv"], sorted(m["days"])) for e, m in months.items()} == \
            {nov: (2, 2, [30]), dec: (1, 1, [1])}
        assert list(years.values()) == [[3, 0]]
        kept = redis_sync.hget(f"cw:{rid}:h:MB", VisitFrequency.FIELD)
        process(rules, [[dec_b], order], rid)   # the batch again after a later one: November is still there
        years, months = card_state(redis_sync, rid, "MB")
        assert (months[nov]["o"], months[dec]["o"], list(years.values())) == (2, 2, [[4, 0]])
        process(rules, [[dec_c]], rid)
        years, months = card_state(redis_sync, rid, "MB")
        assert list(months) == [dec] and months[dec]["o"] == 3 and list(years.values()) == [[5, 0]]
        states.append(redis_sync.hget(f"cw:{rid}:h:MB", VisitFrequency.FIELD))
        assert states[-1] != kept
        assert alerts_of(process(rules, [[ev("C006", dec1 - 60)]], rid)) == []   # late: ignored
        assert redis_sync.hget(f"cw:{rid}:h:MB", VisitFrequency.FIELD) == states[-1]
    assert states[0] == states[1]


@pytest.mark.parametrize("variant", ["default", "no_days_no_peers", "first_visit_fires"])
def test_a_cards_first_visit_written_from_python_is_the_state_lua_writes(process, redis_sync, variant):
    """A card's only settlement of a batch, its first, is written as the state Python built (no decode or
    encode in Lua): byte for byte the state the script writes when it builds it (here: the settlement twice in
    its batch), the same histograms, the same alerts, hostile ids, fractional times, visits with and without a
    registration line, emergency and 门诊大病 visits and cards that already have a state included."""
    text = RULES % 30
    if variant == "no_days_no_peers":
        text = "\n".join(ln for ln in text.split("\n") if "min_days" not in ln)
        text = text.replace("peers: {min_visits", "peers: {enabled: false, min_visits")
    elif variant == "first_visit_fires":
        text = text.replace("min_visits: 15,", "min_visits: 1,").replace("peers: {min_visits: 8", "peers: {min_visits: 1")
    rules = load_rules_text(text)
    peers = [visit(f"P{i}", "H001", at(2, 9) + i) for i in range(40)]
    firsts = [visit("N1", "H001", at(10, 9)), visit("N2", "H002", at(10, 9.5) + 0.125, reg=False),
              visit("N3", "C003", at(10, 10) + 0.001, vt="emergency"), visit("N4", "H001", at(10, 11), dx="N18.501"),
              visit("N5", "H001", at(10, 12), dx="N18.5", reg=False), visit("P0", "H003", at(10, 13)),
              visit("N6", "H002", at(10, 14), dept="儿科", cat="child", born=2020, dx="Z00.1")]
    odd = ['"q\\', "卡/\u2028", "x" * 40, "y" * 60, "e\x7f"]   # (event ids)
    firsts += [visit(f"O{j}{c[:40]}", "H00" + str(j), at(10, 16) + j / 7, event_id=c + str(j))
               for j, c in enumerate(odd)]
    runs = once_and_twice(process, rules, redis_sync, [peers, firsts])
    (alerts_a, state_a, calls_a), (alerts_b, state_b, calls_b) = runs
    assert alerts_a == alerts_b
    assert calls_a - calls_b == len(peers) + len(firsts)   # every card's first visit took the Python state's path
    fired = {c[1] for c in alerts_a}
    if variant == "first_visit_fires":
        assert {"N1", "N2", "P0"} <= fired and not fired & {"N3", "N4", "N5"}   # (emergency, 门诊大病: no peers)
    else:
        assert not fired
    assert state_a == state_b
    assert any(":h:N1" in k for k in state_a) and any(":peer:" in k for k in state_a) == (variant != "no_days_no_peers")


def test_every_key_expires(process, redis_sync):
    rules = load_rules_text(RULES % 5)
    rid = run_id()
    process(rules, [[visit(f"K{i}", "C001", at(2 + i % 2, 9)) for i in range(10)] +
                    [visit("KK", "C001", at(d, 9)) for d in range(1, 17)]], rid)
    keys = list(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    assert any(b":peer:" in k for k in keys) and any(b":h:" in k for k in keys)
    assert card_state(redis_sync, rid, "KK")[0], "the year state is kept"
    for k in keys:
        ttl = redis_sync.ttl(k)
        limit = 366 * 86400 + 3600 if b":h:" in k else 31 * 86400 + 3600   # the card hash holds the year
        assert 0 < ttl <= limit, (k, ttl)


@pytest.mark.parametrize("kwargs, message", [
    ({"sub_rules": []}, "visit_frequency: sub_rules must be a non-empty list, got []"),
    ({"sub_rules": [{"name": "m", "window": "week", "min_visits": 15}]},
     "visit_frequency: sub_rules[0].window must be 'month' or 'year', got 'week'"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 0}]},
     "visit_frequency: sub_rules[0].min_visits must be a positive integer, got 0"),
    ({"sub_rules": [{"name": "m", "window": "month"}]},
     "visit_frequency: sub_rules[0] must have exactly one of min_visits, min_days"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 15, "visit_types": ["pharmacy"]}]},
     "visit_frequency: sub_rules[0].visit_types must be a non-empty list of 'outpatient' and/or 'emergency', "
     "got ['pharmacy']"),
    ({"sub_rules": [{"name": "d", "window": "year", "min_days": 3, "min_visits_per_day": 5}]},
     "visit_frequency: sub_rules[0].window must be 'month' for a min_days sub-rule, got 'year'"),
    ({"sub_rules": [{"name": "d", "window": "month", "min_days": 3}]},
     "visit_frequency: sub_rules[0] must have exactly one of min_visits_per_day, min_institutions_per_day"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 15, "typo": 1}]},
     "visit_frequency: sub_rules[0] has unknown field(s) ['typo']"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 15}, {"name": "m", "window": "year", "min_visits": 9}]},
     "visit_frequency: sub_rules must have distinct names, got ['m', 'm']"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 15}], "special_dx_prefixes": "N18.5"},
     "visit_frequency: special_dx_prefixes must be a list of non-empty strings, got 'N18.5'"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 15}], "peers": {"min_visits": 8, "factor": 0.5}},
     "visit_frequency: peers.factor must be a number >= 1, got 0.5"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 15}], "peers": {"min_visits": 0}},
     "visit_frequency: peers.min_visits must be a positive integer, got 0"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 15}],
      "peers": {"min_visits": 8, "age_bands_years": [18, 60]}},
     "visit_frequency: peers.age_bands_years must be strictly increasing non-negative integers starting at 0, "
     "got [18, 60]"),
    ({"sub_rules": [{"name": "m", "window": "month", "min_visits": 15}], "peers": {"min_visits": 8, "buckets": [3, 2]}},
     "visit_frequency: peers.buckets must be strictly increasing, got [3, 2]"),
])
def test_parameters_validated_at_construction(kwargs, message):
    with pytest.raises(ValueError) as exc:
        VisitFrequency(**kwargs)
    assert str(exc.value) == message
