"""card_ring against the real Redis: a burst of cards at one counter, recurrence, stable ring ids;
families and busy pharmacies never fire; boundaries, out-of-order partitions, redelivery, expiry."""

from __future__ import annotations

import random
import uuid
import zlib
from datetime import datetime

import pytest

from detectors.card_ring import TZ_S, CardRing, ring_id
from detectors.config import load_rules_text
from detectors.drugs import DrugList
from tests.helpers import T0, dumps, make_event

RULES = """
lateness_s: 3600
resale_prone_drugs:
  code_prefixes: [XC10AA, XB01AC]
  name_keywords: [他汀, 氯吡格雷]
rules:
  card_ring:
    window_s: 3600
    min_cards: 8
    min_lift: 8
    baseline_s: 86400
    recur_s: 2592000
    recur_share: 0.5
    member_gap_s: 900
    visit_types: [pharmacy]
"""
STATIN = ("XC10AAA003", "阿托伐他汀钙片")
DAY = 86400


@pytest.fixture
def rules():
    return load_rules_text(RULES)


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def alerts_of(results):
    out = {}
    for r in results:
        for a in r.alerts:
            out[a.alert_id] = a
    return list(out.values())


def buy(card, t, inst="P001", drug=STATIN, **over):
    return make_event(card, inst, t, items=[{"code": drug[0], "name": drug[1], "category": "drug", "quantity": 3,
                                             "amount": 268.5, "days_supply": 84}], **over)


def burst(cards, start, span_s=50 * 60, inst="P001", drug=STATIN):
    n = len(cards)
    return [buy(c, start + (k * span_s) // max(1, n - 1), inst, drug) for k, c in enumerate(cards)]


def ring_cards(n, prefix="R"):
    return [f"{prefix}{k:03d}" for k in range(n)]


def test_fires_on_a_burst_of_cards_with_a_stable_ring_id(process, rules):
    rid = run_id()
    evs = burst(ring_cards(10), T0 + 3600)
    alerts = alerts_of(process(rules, [[dumps(e) for e in evs]], rid))
    assert len(alerts) == 1
    a = alerts[0]
    day = int((T0 + 3600 + TZ_S) // DAY)
    assert (a.rule, a.subject_type, a.subject_id) == ("card_ring", "ring", ring_id("P001", STATIN[0], day))
    assert a.metrics["first_day"] == "2026-11-02"
    assert a.member_ids == ring_cards(10)
    assert sorted(a.evidence_event_ids) == sorted(e["event_id"] for e in evs)
    assert a.metrics["peak_cards"] == 10 and a.metrics["institution_id"] == "P001"
    assert a.metrics["drug_code"] == STATIN[0] and a.metrics["recurrent_days"] == 0
    assert "10 张不同医保卡" in a.summary and "阿托伐他汀钙片" in a.summary and "1 小时" in a.summary
    assert a.rule_version == rules.versions["card_ring"]


def test_a_lone_customer_within_the_hour_is_not_a_member(process, rules):
    rid = run_id()
    lone = buy("LONE", T0 + 3600 - 40 * 60)                    # 40 min before the burst, nobody near
    near = buy("NEAR", T0 + 3600 + 25 * 60 + 30)                # in the middle of it
    evs = [lone] + burst(ring_cards(9), T0 + 3600) + [near]
    evs.sort(key=lambda e: e["event_time"])
    alerts = alerts_of(process(rules, [[dumps(e) for e in evs]], rid))
    assert len(alerts) == 1
    assert alerts[0].member_ids == sorted(ring_cards(9) + ["NEAR"])
    assert alerts[0].metrics["peak_cards"] == 10   # the nine and NEAR within one hour


def test_boundary_eight_cards_within_the_window(process, rules):
    rid = run_id()
    seven = burst(ring_cards(7, "S"), T0 + 3600, inst="P7")
    exactly = burst(ring_cards(8, "E"), T0 + 3600, span_s=3600, inst="P8")          # first to last: 3600 s
    too_wide = burst(ring_cards(8, "W"), T0 + 3600, span_s=3601, inst="P9")         # 3601 s
    alerts = alerts_of(process(rules, [[dumps(e) for e in seven + exactly + too_wide]], rid))
    assert [a.metrics["institution_id"] for a in alerts] == ["P8"]
    assert alerts[0].member_ids == ring_cards(8, "E")


def test_a_family_buying_together_never_fires(process, rules):
    rid = run_id()
    evs = []
    for d in range(6):   # a household of 4 at its pharmacy, together, every other day
        evs += [buy(c, T0 + 2 * d * DAY + k * 60) for k, c in enumerate(["F1", "F2", "F3", "F4"])]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_busy_pharmacy_stream_is_not_a_ring_but_a_ring_there_still_is(process, rules):
    rid = run_id()
    rng = random.Random(7)
    # ~60 unrelated statin buyers a day 08:00-20:00: evenly on the first day (its history), then with peaks
    evs = [buy(f"B{k:05d}", T0 + k * 720, inst="PBUSY") for k in range(60)]
    n = 60
    for d in (1, 2):
        for _ in range(60):
            h = rng.choice([0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 9, 9, 10, 10, 11])
            evs.append(buy(f"B{n:05d}", T0 + d * DAY + h * 3600 + rng.randrange(3600), inst="PBUSY"))
            n += 1
    evs.sort(key=lambda e: e["event_time"])
    raw = [dumps(e) for e in evs]
    assert alerts_of(process(rules, [raw], rid + "w")) == []
    # without the day of history the same peaks would fire: that is what min_lift is for
    assert alerts_of(process(load_rules_text(RULES.replace("min_lift: 8", "min_lift: 0")), [raw], rid + "x")) != []
    # the same place with a real ring on top: 20 cards in half an hour still stand out
    ring = burst(ring_cards(20, "X"), T0 + 2 * DAY + 6 * 3600, span_s=1800, inst="PBUSY")
    allev = sorted(evs + ring, key=lambda e: e["event_time"])
    alerts = alerts_of(process(rules, [[dumps(e) for e in allev]], rid))
    assert len(alerts) == 1
    members = set(alerts[0].member_ids)
    assert set(ring_cards(20, "X")) <= members
    # buyers who happened to be at the counter within the hour around the burst are listed too (an
    # inspector sees their single ordinary purchase); nobody further away is
    near = {e["card_id"] for e in evs
            if abs(datetime.fromisoformat(e["event_time"]).timestamp() - T0 - 2 * DAY - 6 * 3600 - 900) <= 3600 + 900}
    assert members - set(ring_cards(20, "X")) <= near


def test_cold_start_busy_day_falls_back_to_min_cards(process, rules):
    # documented limit: with no history, 8 cards in an hour is the whole test
    rid = run_id()
    evs = burst(ring_cards(8, "C"), T0, span_s=3000, inst="PNEW")
    assert len(alerts_of(process(rules, [[dumps(e) for e in evs]], rid))) == 1


def test_recurring_group_extends_the_alert_and_raises_severity(process, rules):
    rid = run_id()
    cards = ring_cards(10)
    day1 = burst(cards, T0 + 3600)
    day3 = burst(cards[:7] + ["N1", "N2"], T0 + 2 * DAY + 5 * 3600)   # 7 of 9 seen before
    res = process(rules, [[dumps(e) for e in day1], [dumps(e) for e in day3]], rid)
    first = alerts_of(res[:1])[0]
    final = alerts_of(res[1:])[0]
    assert first.alert_id == final.alert_id and first.subject_id == final.subject_id
    assert final.member_ids == sorted(cards + ["N1", "N2"])
    assert final.metrics["recurrent_days"] == 1 and final.metrics["days"] == 2
    assert final.metrics["max_repeat_share"] == pytest.approx(7 / 9, abs=1e-3)
    order = ["low", "medium", "high", "critical"]
    assert order.index(final.severity) > order.index(first.severity)
    assert "重复出现" in final.summary


def test_another_stack_of_cards_at_the_same_counter_is_another_ring(process, rules):
    rid = run_id()
    day1 = burst(ring_cards(9, "G"), T0 + 3600)
    day2 = burst(ring_cards(1, "G") + ring_cards(8, "H"), T0 + DAY + 5 * 3600)   # 1 of 9 seen before
    alerts = sorted(alerts_of(process(rules, [[dumps(e) for e in day1 + day2]], rid)), key=lambda a: a.window_start)
    assert len(alerts) == 2 and alerts[0].subject_id != alerts[1].subject_id
    assert alerts[0].member_ids == ring_cards(9, "G")
    assert alerts[1].member_ids == sorted(ring_cards(1, "G") + ring_cards(8, "H"))
    assert [a.metrics["recurrent_days"] for a in alerts] == [0, 0]


def test_a_stack_sharing_a_few_cards_joins_the_ring_without_being_a_recurrence(process, rules):
    rid = run_id()
    day1 = burst(ring_cards(9, "G"), T0 + 3600)
    day2 = burst(ring_cards(3, "G") + ring_cards(6, "H"), T0 + DAY + 5 * 3600)   # 3 of 9 seen before
    alerts = alerts_of(process(rules, [[dumps(e) for e in day1 + day2]], rid))
    assert len(alerts) == 1 and len(alerts[0].member_ids) == 15
    assert alerts[0].metrics["recurrent_days"] == 0 and alerts[0].metrics["days"] == 2


def test_the_same_cards_after_longer_than_recur_s_are_a_new_ring(process):
    rules = load_rules_text(RULES.replace("recur_s: 2592000", "recur_s: 172800"))
    rid = run_id()
    cards = ring_cards(8)
    res = process(rules, [[dumps(e) for e in burst(cards, T0)], [dumps(e) for e in burst(cards, T0 + 5 * DAY)]], rid)
    alerts = alerts_of(res)
    assert len(alerts) == 2 and len({a.subject_id for a in alerts}) == 2
    assert all(a.metrics["recurrent_days"] == 0 for a in alerts)


def test_only_resale_prone_drugs_and_eligible_visits_count(process, rules):
    rid = run_id()
    other = [buy(c, T0 + k * 60, drug=("XJ01CAA015", "阿莫西林胶囊")) for k, c in enumerate(ring_cards(10))]
    ward = [buy(c, T0 + k * 60, inst="H1", visit_type="inpatient", institution_type="hospital")
            for k, c in enumerate(ring_cards(10, "W"))]
    unknown = [buy("未知", T0 + k * 60, inst="P2") for k in range(10)]
    # a community centre's morning rush of chronic refills (长处方): prescriptions, not counter sales
    rush = [buy(c, T0 + k * 240, inst="C1", visit_type="outpatient", institution_type="community",
                physician_id=f"D{k % 3}") for k, c in enumerate(ring_cards(14, "M"))]
    assert alerts_of(process(rules, [[dumps(e) for e in other + ward + unknown + rush]], rid)) == []


def test_out_of_order_partitions_give_the_same_ring_and_members(process, rules, redis_sync):
    rng = random.Random(11)
    cards = ring_cards(12)
    evs = burst(cards, T0 + 3600) + burst(cards[:9], T0 + DAY + 3600, span_s=40 * 60)
    evs += [buy(f"Z{k}", T0 + rng.randrange(2 * DAY)) for k in range(15)]       # background buyers
    evs.sort(key=lambda e: e["event_time"])
    raw = [dumps(e) for e in evs]
    rid = run_id()

    def final(batches):
        for k in redis_sync.scan_iter(match=f"cw:{rid}:*"):
            redis_sync.delete(k)
        alerts = alerts_of(process(rules, batches, rid))
        return sorted((a.alert_id, a.subject_id, a.metrics["days"], tuple(a.member_ids),
                       tuple(sorted(a.evidence_event_ids)), a.window_start, a.window_end, a.severity) for a in alerts)

    ref = final([raw])
    assert len(ref) == 1 and set(cards) <= set(ref[0][3]) and ref[0][2] == 2
    for _ in range(4):
        # four partitions by card, each in order, interleaved with up to ~50 min of skew, in small batches
        parts: dict[int, list[tuple[float, bytes]]] = {}
        for e, r in zip(evs, raw):
            parts.setdefault(zlib.crc32(e["card_id"].encode()) % 4, []).append((e["event_time"], r))
        skew = {p: rng.randrange(3000) for p in parts}
        merged = sorted(((datetime.fromisoformat(t).timestamp() + skew[p], r) for p, lst in parts.items()
                         for t, r in lst), key=lambda x: x[0])
        order = [r for _, r in merged]
        batches = [order[i:i + 5] for i in range(0, len(order), 5)]
        assert final(batches) == ref


def test_redelivered_events_change_nothing(process, rules, redis_sync):
    rid = run_id()
    evs = burst(ring_cards(9), T0 + 3600)
    raw = [dumps(e) for e in evs]
    first = alerts_of(process(rules, [raw], rid))
    again = alerts_of(process(rules, [raw[3:] + raw[:3], raw], rid))
    key = lambda a: (a.alert_id, tuple(a.member_ids), tuple(a.evidence_event_ids), a.severity, a.window_end)
    assert list(map(key, first)) == list(map(key, again))
    base = f"cw:{rid}:card_ring:3600:P001:{STATIN[0]}"
    assert redis_sync.zcard(base) == 9 and redis_sync.zcard(base + ":m") == 9


def test_every_key_expires(process, rules, redis_sync):
    rid = run_id()
    process(rules, [[dumps(e) for e in burst(ring_cards(9), T0)]], rid)
    keys = list(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    assert len(keys) == 4
    for k in keys:
        ttl = redis_sync.ttl(k)
        assert 0 < ttl <= 2592000 + 3600 + 3600, (k, ttl)


@pytest.mark.parametrize("kw, message", [
    ({"window_s": 0}, "card_ring: window_s must be a positive integer, got 0"),
    ({"min_cards": 2}, "card_ring: min_cards must be >= 3, got 2"),
    ({"min_cards": 8.5}, "card_ring: min_cards must be a positive integer, got 8.5"),
    ({"min_lift": -1}, "card_ring: min_lift must be a non-negative number, got -1"),
    ({"recur_share": 0}, "card_ring: recur_share must be a number in (0, 1], got 0"),
    ({"recur_share": 1.5}, "card_ring: recur_share must be a number in (0, 1], got 1.5"),
    ({"baseline_s": 7200}, "card_ring: baseline_s must exceed window_s + lateness_s (7200), got 7200"),
    ({"recur_s": 60}, "card_ring: recur_s must be >= window_s (3600), got 60"),
    ({"member_gap_s": 7200}, "card_ring: member_gap_s must be <= window_s (3600), got 7200"),
    ({"history_s": 86400}, "card_ring: history_s must cover baseline_s + window_s + lateness_s (93600), got 86400"),
    ({"visit_types": ["pharmacy", "home"]},
     "card_ring: visit_types must be a non-empty list of ['outpatient', 'emergency', 'pharmacy', 'inpatient'], "
     "got ['pharmacy', 'home']"),
    ({"resale_prone": ["XC10AA"]}, "card_ring: resale_prone must be a DrugList, got list"),
])
def test_parameters_validated_at_construction(kw, message):
    with pytest.raises(ValueError) as exc:
        CardRing(**{"resale_prone": DrugList(["XC10AA"]), **kw})
    assert str(exc.value) == message
