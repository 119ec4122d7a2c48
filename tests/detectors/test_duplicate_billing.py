"""duplicate_billing against the real Redis: the same bill settled twice within minutes, redelivery,
legitimate look-alikes, day episodes, interleaving of cards, expiry, parameter validation."""

from __future__ import annotations

import random
import uuid

import orjson
import pytest

from detectors.config import load_rules_text
from detectors.duplicate_billing import DuplicateBilling
from tests.helpers import T0, dumps, make_event

RULES = """
lateness_s: 3600
rules:
  duplicate_billing:
    window_s: 600
"""


@pytest.fixture
def rules():
    return load_rules_text(RULES)


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def bill(card="C1", inst="H001", t=T0, dept="内科", items=None, **over):
    items = items or [{"code": "R0001", "name": "普通门诊挂号", "category": "registration", "quantity": 1, "amount": 25.0},
                      {"code": "J0001", "name": "血常规", "category": "exam", "quantity": 1, "amount": 20.0},
                      {"code": "XJ01CAA015", "name": "阿莫西林胶囊", "category": "drug", "quantity": 2, "amount": 17.0,
                       "days_supply": 14}]
    total = round(sum(i["amount"] for i in items), 2)
    base = dict(institution_type="hospital", visit_type="outpatient", department=dept, physician_id="D1",
                items=items, total_amount=total, fund_paid=round(total * 0.7, 2), self_paid=round(total * 0.3, 2))
    base.update(over)
    return make_event(card, inst, t, **base)


def copy_of(ev, dt):
    """The same bill settled again ``dt`` seconds later under a new settlement id."""
    return bill(ev["card_id"], ev["institution_id"], T0 + dt + (_ts(ev) - T0), ev["department"], ev["items"])


def _ts(ev):
    from datetime import datetime
    return datetime.fromisoformat(ev["event_time"]).timestamp()


def bill_id(raw: bytes) -> bytes:
    return orjson.loads(raw)["event_id"].encode()


def alerts_of(results):
    out = {}
    for r in results:
        for a in r.alerts:
            if a.rule == "duplicate_billing":
                out[a.alert_id] = a  # the last upsert wins, as in the store (which also merges evidence)
    return list(out.values())


def test_fires_on_the_same_bill_settled_again_minutes_later(process, rules):
    rid = run_id()
    first = bill("DUPC", "H001", T0 + 3600)
    again = copy_of(first, 240)
    alerts = alerts_of(process(rules, [[dumps(first)], [dumps(again)]], rid))
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.subject_type, a.subject_id, a.member_ids) == ("duplicate_billing", "institution", "H001", ["DUPC"])
    assert a.evidence_event_ids == [first["event_id"], again["event_id"]]
    assert a.metrics["extra_settlements"] == 1 and a.metrics["extra_amount"] == 62.0
    assert a.metrics["gap_s"] == 240.0 and a.metrics["card"] == "DUPC"
    assert a.severity == "medium" and a.rule_version == rules.versions["duplicate_billing"]
    assert a.summary == "机构 H001 于 2026-11-02 将 1 张费用明细相同的结算单在 10 分钟内重复结算 1 次（卡 DUPC），多结算 62.00 元"
    assert (a.window_start, a.window_end) == ("2026-11-02T09:00:00+08:00", "2026-11-02T09:04:00+08:00")


def test_redelivered_event_id_is_never_a_duplicate(process, rules, redis_sync):
    rid = run_id()
    one = dumps(bill("REDEL", "H001"))
    assert alerts_of(process(rules, [[one, one, one], [one]], rid)) == []
    # the card's field of its recent-activity hash: fingerprint, t, event_id per settlement, stored once
    flat = orjson.loads(redis_sync.hget(f"cw:{rid}:c:REDEL", "duplicate_billing:600"))
    assert len(flat) == 3 and flat[2].encode() == bill_id(one)
    assert list(redis_sync.scan_iter(match=f"cw:{rid}:duplicate_billing:*")) == []  # nothing fired, no day keys


def test_redelivery_of_a_duplicate_changes_nothing(process, rules):
    rid = run_id()
    first = bill("RD2", "H002")
    again = copy_of(first, 120)
    a1 = alerts_of(process(rules, [[dumps(first), dumps(again)]], rid))
    a2 = alerts_of(process(rules, [[dumps(again), dumps(first)], [dumps(first)]], rid))
    assert len(a1) == len(a2) == 1
    assert a1[0].alert_id == a2[0].alert_id
    assert (a1[0].evidence_event_ids, a1[0].metrics["extra_settlements"], a1[0].member_ids) == \
        (a2[0].evidence_event_ids, a2[0].metrics["extra_settlements"], a2[0].member_ids)


def test_legitimate_look_alikes_do_not_fire(process, rules):
    rid = run_id()
    evs = []
    # the same card buys the same thing again at the same pharmacy the next afternoon (a real second purchase)
    p = bill("LA1", "P001", T0, None, [{"code": "XA02BCA019", "category": "drug", "quantity": 1, "amount": 16.0}],
             institution_type="pharmacy", visit_type="pharmacy", physician_id=None)
    evs += [p, copy_of(p, 86400 + 5 * 3600)]
    # two family members buy the same box together (different cards)
    evs += [bill("FAM1", "P002", T0 + 100), bill("FAM2", "P002", T0 + 160)]
    # registration at two departments in one visit (挂多个科室): identical lines, different departments
    reg = [{"code": "R0001", "category": "registration", "quantity": 1, "amount": 25.0}]
    evs += [bill("LA2", "H003", T0, "内科", reg), bill("LA2", "H003", T0 + 120, "眼科", reg)]
    # same lines, other institution (a referral) / other quantity ten minutes apart
    evs += [bill("LA3", "C001", T0), bill("LA3", "H004", T0 + 300)]
    q = bill("LA4", "H005", T0)
    q2 = bill("LA4", "H005", T0 + 300, items=[dict(q["items"][0]), dict(q["items"][1], quantity=2, amount=40.0)])
    evs += [q, q2]
    # placeholder ids are data quality, never blamed
    evs += [bill("未知", "H006", T0), bill("未知", "H006", T0 + 60), bill("PH", "0000", T0), bill("PH", "0000", T0 + 60)]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_boundary_exactly_window_s_apart_is_a_duplicate_one_second_more_is_not(process, rules):
    rid = run_id()
    a = bill("EDGE1", "H010", T0)
    b = bill("EDGE2", "H011", T0)
    alerts = alerts_of(process(rules, [[dumps(a), dumps(copy_of(a, 600)), dumps(b), dumps(copy_of(b, 601))]], rid))
    assert [x.subject_id for x in alerts] == ["H010"]


def test_one_alert_per_institution_and_day_with_every_card(process, rules):
    rid = run_id()
    evs = []
    for k, card in enumerate(("D1", "D2", "D3")):
        first = bill(card, "H020", T0 + k * 3600)
        evs += [first, copy_of(first, 90)]
    triple = bill("D4", "H020", T0 + 5 * 3600)
    evs += [triple, copy_of(triple, 200), copy_of(triple, 400)]
    next_day = bill("D5", "H020", T0 + 86400)
    evs += [next_day, copy_of(next_day, 60)]
    alerts = sorted(alerts_of(process(rules, [[dumps(e) for e in evs]], rid)), key=lambda a: a.window_start)
    assert len(alerts) == 2
    day1, day2 = alerts
    assert day1.member_ids == ["D1", "D2", "D3", "D4"]
    assert day1.metrics["duplicated_bills"] == 4 and day1.metrics["extra_settlements"] == 5
    assert len(day1.evidence_event_ids) == 9 and day1.severity == "critical"
    assert day2.member_ids == ["D5"] and day2.severity == "medium"


def test_interleaving_of_cards_gives_the_same_alerts(process, rules):
    evs = []
    for k in range(8):
        first = bill(f"IL{k}", f"H03{k % 3}", T0 + k * 700)
        evs += [first, copy_of(first, 30 + 50 * k)]
    in_order = sorted(evs, key=lambda e: e["event_time"])
    rng = random.Random(3)
    queues = {c: [e for e in in_order if e["card_id"] == c] for c in {e["card_id"] for e in evs}}
    mixed = []
    while any(queues.values()):
        c = rng.choice(sorted(c for c in queues if queues[c]))
        mixed.append(queues[c].pop(0))
    assert mixed != in_order

    def content(batches):
        alerts = alerts_of(process(rules, batches, run_id()))
        return sorted((a.subject_id, sorted(a.evidence_event_ids), a.member_ids, a.metrics["extra_settlements"],
                       a.metrics["extra_amount"], a.window_start, a.window_end, a.severity) for a in alerts)

    a = content([[dumps(e) for e in in_order]])
    b = content([[dumps(e) for e in mixed[:7]], [dumps(e) for e in mixed[7:]]])
    assert a == b and len(a) == 3


def test_every_key_expires(process, rules, redis_sync):
    rid = run_id()
    first = bill("TTL", "H040")
    process(rules, [[dumps(first), dumps(copy_of(first, 60))]], rid)
    keys = sorted(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    day = int((T0 + 8 * 3600) // 86400)
    assert keys == [f"cw:{rid}:c:TTL".encode(),  # the card's recent bills, the day's bills and evidence
                    f"cw:{rid}:duplicate_billing:600:inst:H040:{day}:bills".encode(),
                    f"cw:{rid}:duplicate_billing:600:inst:H040:{day}:ev".encode()]
    for k in keys:
        assert 0 < redis_sync.ttl(k) <= 86400 + 600 + 3600, k
    assert redis_sync.ttl(f"cw:{rid}:c:TTL") <= 600 + 3600  # the card's bills: window_s + lateness_s


@pytest.mark.parametrize("kwargs, message", [
    ({"window_s": 0}, "duplicate_billing: window_s must be a positive integer, got 0"),
    ({"window_s": "600"}, "duplicate_billing: window_s must be a positive integer, got '600'"),
    ({"window_s": 90000}, "duplicate_billing: window_s must be at most 86400 (one day), got 90000"),
    ({"lateness_s": -1}, "duplicate_billing: lateness_s must be a non-negative integer, got -1"),
])
def test_parameters_validated_at_construction(kwargs, message):
    with pytest.raises(ValueError) as exc:
        DuplicateBilling(**kwargs)
    assert str(exc.value) == message


def test_card_state_is_one_field_pruned_by_event_time_and_independent_of_arrival_order(process, rules, redis_sync):
    field = "duplicate_billing:600"
    evs = [bill("ORDR", "H050", T0 + k * 900, items=[{"code": f"J{k:04d}", "category": "exam", "quantity": 1,
                                                       "amount": 10.0 + k}]) for k in range(8)]
    evs.append(bill("ORDR", "H050", T0 + 7 * 900, items=evs[0]["items"], event_id="T-same-time"))
    a, b = run_id(), run_id()
    process(rules, [[dumps(e) for e in evs]], a)
    process(rules, [[dumps(e) for e in evs[::-1][:3]], [dumps(e) for e in evs[::-1][3:]]], b)
    sa, sb = redis_sync.hget(f"cw:{a}:c:ORDR", field), redis_sync.hget(f"cw:{b}:c:ORDR", field)
    assert sa == sb
    flat = orjson.loads(sa)
    # fingerprint, t, event_id per bill, newest first, none older than newest - window_s - lateness_s
    assert flat[1::3] == sorted(flat[1::3], reverse=True) and min(flat[1::3]) >= T0 + 7 * 900 - 600 - 3600
    assert len(flat) == 3 * 6


def test_bills_out_of_reach_are_dropped_on_the_cards_next_bill(process, rules, redis_sync):
    rid = run_id()
    first = bill("STALE", "H060", T0 + 0.25)
    later = copy_of(first, 600 + 3600 + 1)  # past window_s + lateness_s: the first bill can never match again
    again = copy_of(first, 600 + 3600 + 1 + 599.5)
    assert alerts_of(process(rules, [[dumps(first)], [dumps(later)]], rid)) == []
    flat = orjson.loads(redis_sync.hget(f"cw:{rid}:c:STALE", "duplicate_billing:600"))
    assert [flat[2]] == [later["event_id"]] and len(flat) == 3
    alerts = alerts_of(process(rules, [[dumps(again)]], rid))
    assert [a.evidence_event_ids for a in alerts] == [[later["event_id"], again["event_id"]]]
    assert alerts[0].metrics["gap_s"] == 599.5


def test_stored_text_is_the_same_whichever_way_it_was_written(process, rules, redis_sync):
    """A card's first bill is stored as its text built in Python, a newer one put before it, an older one makes
    cjson re-encode: all must write what cjson writes, byte for byte, hostile event ids included."""
    field = "duplicate_billing:600"
    a = bill("TXT", "H070", T0 + 0.5, event_id='E/1"\\\x7f\x01中')
    b = bill("TXT", "H070", T0 + 900, items=[{"code": "J0009", "category": "exam", "quantity": 1, "amount": 9.0}],
             event_id="E/2\x7f")
    texts = []
    for order in ([[dumps(a)], [dumps(b)]], [[dumps(a), dumps(b)]], [[dumps(b)], [dumps(a)]], [[dumps(b), dumps(a)]]):
        rid = run_id()
        process(rules, order, rid)
        texts.append(redis_sync.hget(f"cw:{rid}:c:TXT", field))
    assert len(orjson.loads(texts[0])) == 6 and texts.count(texts[0]) == 4
    assert b"\\/" in texts[0] and b"\\u007f" in texts[0]
    assert redis_sync.eval("return cjson.encode(cjson.decode(ARGV[1]))", 0, texts[0]) == texts[0]
