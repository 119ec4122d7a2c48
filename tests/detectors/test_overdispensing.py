"""overdispensing against the real Redis: supply vs days elapsed, early refills, long prescriptions,
idempotence, episodes, expiry, parameter validation."""

from __future__ import annotations

import random
import uuid

import orjson
import pytest

from detectors.config import load_rules_text
from detectors.drugs import DrugList
from detectors.overdispensing import Overdispensing
from tests.helpers import T0, dumps, make_event

DAY = 86400
RULES = """
lateness_s: 3600
resale_prone_drugs:
  code_prefixes: [XC10AA, XB01AC, XA10AE]
  name_keywords: [他汀]
rules:
  overdispensing:
    window_s: 2592000
    ingredient_prefix_len: 10
    max_supply_ratio: 4.0
    min_excess_days: 30
    min_fills: 3
    early_refill_min_left_days: 7
    early_refill_share: 0.5
    min_early_refills: 2
    resale_prone_severity_step: 1
"""
AMLO = ("XC08CAA007", "苯磺酸氨氯地平片", 12.6, 28)      # not resale-prone
STATIN = ("XC10AAA003", "阿托伐他汀钙片", 89.5, 28)      # resale-prone
INSULIN = ("XA10AEA004", "甘精胰岛素注射液", 178.0, 15)  # resale-prone


@pytest.fixture
def rules():
    return load_rules_text(RULES)


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def fill(card, t, drug=AMLO, packs=1, inst="P001", days=None, **over):
    code, name, price, per = drug
    amt = round(price * packs, 2)
    items = [{"code": code, "name": name, "category": "drug", "quantity": packs, "amount": amt,
              "days_supply": per * packs if days is None else days}]
    return make_event(card, inst, t, items=items, total_amount=amt, fund_paid=round(amt * 0.6, 2),
                      self_paid=round(amt * 0.4, 2), **over)


def fills_of(redis_sync, rid, card, field="overdispensing:2592000,10"):
    """The card's stored fills, one ``[t, event_id, institution, [[ingredient, days], ...]]`` per event."""
    raw = redis_sync.hget(f"cw:{rid}:c:{card}", field)
    flat = [] if raw is None else orjson.loads(raw)
    out, p = [], 0
    while p < len(flat):
        n = flat[p + 3]
        out.append([flat[p], flat[p + 1], flat[p + 2], [flat[q:q + 2] for q in range(p + 4, p + 4 + 2 * n, 2)]])
        p += 4 + 2 * n
    return out


def alerts_of(results):
    out = {}
    for r in results:
        for a in r.alerts:
            if a.rule == "overdispensing":
                out[a.alert_id] = a
    return list(out.values())


def test_fires_when_supply_far_exceeds_days_elapsed_across_institutions(process, rules):
    rid = run_id()
    evs = [fill("OD", T0 + d * DAY + 3600, AMLO, 3, f"P{k:03d}") for k, d in enumerate((0, 3, 6, 9))]
    # fill 3: 168 days dispensed before it, 6 days elapsed -> 28x, 162 days unused
    assert alerts_of(process(rules, [[dumps(e) for e in evs[:2]]], rid)) == []
    res = process(rules, [[dumps(evs[2])], [dumps(evs[3])]], rid)
    alerts = alerts_of(res)
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.subject_type, a.subject_id, a.member_ids) == ("overdispensing", "card", "OD", ["OD"])
    assert a.evidence_event_ids == [e["event_id"] for e in evs]
    m = a.metrics
    assert (m["fills"], m["prior_days"], m["supply_days"], m["institutions"]) == (4, 252, 336, 4)
    assert m["elapsed_days"] == 9.0 and m["supply_ratio"] == 28.0 and m["excess_days"] == 243.0
    assert "supply_ratio" in m["criteria"] and m["resale_prone"] is False
    assert a.severity == "critical" and a.rule_version == rules.versions["overdispensing"]
    assert a.summary.startswith("卡 OD 在 30 天内于 4 家机构 4 次配药 苯磺酸氨氯地平片 共 336 天用量")
    assert "超量 28.0 倍" in a.summary
    assert a.window_start < a.window_end


def test_monthly_refills_a_few_days_early_never_fire(process, rules):
    rid = run_id()
    # 28 days every 25 days for a year, alternating institutions (3 days early each time)
    evs = [dumps(fill("CHRONIC", T0 + k * 25 * DAY + 9 * 3600, STATIN, 1, f"P{k % 2:03d}")) for k in range(15)]
    assert alerts_of(process(rules, [evs], rid)) == []


def test_one_long_prescription_is_not_overdispensing(process, rules):
    rid = run_id()
    # 长处方: 84 days in one fill, refilled after 80 days, then a normal month
    evs = [fill("LONG", T0, STATIN, 3), fill("LONG", T0 + 80 * DAY, STATIN, 3), fill("LONG", T0 + 160 * DAY, STATIN, 1)]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_one_duplicate_prescription_is_not_a_pattern_but_a_third_fill_is(process, rules):
    rid = run_id()
    # 56 days at the community centre, the same drug again at the hospital it referred to that day
    evs = [fill("DUP2", T0, AMLO, 2, "C001"), fill("DUP2", T0 + 3 * 3600, AMLO, 1, "H001")]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []
    third = fill("DUP2", T0 + 5 * DAY, AMLO, 2, "P009")
    alerts = alerts_of(process(rules, [[dumps(third)]], rid))
    assert len(alerts) == 1 and alerts[0].metrics["excess_days"] == 79.0
    assert alerts[0].evidence_event_ids == [e["event_id"] for e in evs + [third]]


def test_boundary_ratio_is_strict_and_excess_is_inclusive(process, rules):
    rid = run_id()
    # (one early refill each: 4 days left after the second fill, so the third is never early)
    def case(card, first_days, third_at):
        return [fill(card, T0, AMLO, days=first_days), fill(card, T0 + DAY, AMLO, days=4),
                fill(card, T0 + third_at, AMLO)]
    at_ratio = case("B1", 36, 10 * DAY)           # 40 days in exactly 10: ratio exactly 4.0 (excess 30)
    past_ratio = case("B2", 36, 10 * DAY - 3600)  # ratio 4.02, excess 30.04 -> fires
    at_excess = case("B3", 31, 5 * DAY)           # 35 days in 5: ratio 7.0, excess exactly 30 -> fires
    below = case("B4", 31, 5 * DAY + 3600)        # excess 29.96 -> no alert
    alerts = alerts_of(process(rules, [[dumps(e) for e in at_ratio + past_ratio + at_excess + below]], rid))
    got = {a.subject_id: a for a in alerts}
    assert sorted(got) == ["B2", "B3"]
    assert got["B3"].metrics["excess_days"] == 30.0 and got["B3"].metrics["supply_ratio"] == 7.0
    assert got["B3"].severity == "medium" and got["B3"].score == 1.0
    assert got["B2"].metrics["supply_ratio"] == 4.02


def test_resale_prone_drug_is_raised_one_severity_level(process, rules):
    rid = run_id()
    evs_amlo = [fill("R1", t, AMLO, days=42) for t in (T0, T0 + DAY)] + [fill("R1", T0 + 14 * DAY, AMLO)]
    evs_statin = [fill("R2", t, STATIN, days=42) for t in (T0, T0 + DAY)] + [fill("R2", T0 + 14 * DAY, STATIN)]
    # both 6.0x with 70 days unused: score min(6 / 4, 70 / 30) = 1.5
    alerts = {a.subject_id: a for a in alerts_of(process(rules, [[dumps(e) for e in evs_amlo + evs_statin]], rid))}
    assert sorted(alerts) == ["R1", "R2"]
    assert alerts["R1"].score == alerts["R2"].score
    assert (alerts["R1"].severity, alerts["R2"].severity) == ("high", "critical")
    assert alerts["R2"].metrics["resale_prone"] is True and "易倒卖药品" in alerts["R2"].summary
    assert alerts["R1"].metrics["resale_prone"] is False and "易倒卖药品" not in alerts["R1"].summary


def test_repeated_early_refills_fire_below_the_excess(process, rules):
    rid = run_id()
    # insulin 15 days a pen, bought every 3 days: after 3 fills only 24 days unused, but 2 early refills
    evs = [fill("EARLY", T0 + d * DAY, INSULIN, 1, f"P{d:03d}") for d in (0, 3, 6)]
    alerts = alerts_of(process(rules, [[dumps(e) for e in evs]], rid))
    assert len(alerts) == 1
    m = alerts[0].metrics
    assert m["criteria"] == ["early_refill"] and m["early_refills"] == 2 and m["excess_days"] == 24.0
    assert "2 次在上次用量用完 50% 前提前配药" in alerts[0].summary
    # a single early refill (e.g. a same-day referral prescribing the same drug again) is not enough
    rid = run_id()
    once = [fill("ONCE", T0, INSULIN, 1), fill("ONCE", T0 + 3 * DAY, INSULIN, 1), fill("ONCE", T0 + 20 * DAY, INSULIN, 1)]
    assert alerts_of(process(rules, [[dumps(e) for e in once]], rid)) == []
    # short courses (antipyretic, 6 days a fill) bought at three visits of one illness leave < 7 days: never early
    fever = [fill("FEVER", T0 + h * 3600, ("XN02BEA020", "对乙酰氨基酚片", 5.0, 3), 2, f"C{h:03d}") for h in (0, 20, 44)]
    assert alerts_of(process(rules, [[dumps(e) for e in fever]], rid)) == []


def test_same_ingredient_by_code_prefix(process):
    evs = [fill("ING", T0 + d * DAY, (("XC10AAA003", "阿托伐他汀钙片", 89.5, 28),
                                       ("XC10AAB104", "阿托伐他汀钙片 20mg", 120.0, 28))[d % 2], 2) for d in (0, 1, 2)]
    lines = [[dumps(e) for e in evs]]
    whole = load_rules_text("rules:\n  overdispensing:\n    ingredient_prefix_len: 10\n")
    prefix = load_rules_text("rules:\n  overdispensing:\n    ingredient_prefix_len: 6\n")
    assert alerts_of(process(whole, lines, run_id())) == []
    alerts = alerts_of(process(prefix, lines, run_id()))
    assert len(alerts) == 1 and alerts[0].metrics["ingredient"] == "XC10AA"


def test_inpatient_bills_and_placeholder_cards_are_skipped(process, rules):
    rid = run_id()
    inp = [fill("INP", T0 + d * DAY, AMLO, 3, "H001", visit_type="inpatient", institution_type="hospital")
           for d in (0, 1, 2)]
    ph = [fill("未知", T0 + d * DAY, AMLO, 3) for d in (0, 1, 2)]
    assert alerts_of(process(rules, [[dumps(e) for e in inp + ph]], rid)) == []


def test_interleaving_of_cards_gives_the_same_alerts(process, rules):
    cards = [f"IL{k}" for k in range(6)]
    evs = []
    for k, c in enumerate(cards):
        for j, d in enumerate((0, 2, 5, 7)):
            evs.append(fill(c, T0 + d * DAY + k * 600, (AMLO, STATIN, INSULIN)[k % 3], 1 + k % 2, f"P{j}{k}"))
    in_order = sorted(evs, key=lambda e: e["event_time"])
    # another interleaving of the cards (each card's own events still in order), in two batches
    rng = random.Random(7)
    queues = {c: [e for e in in_order if e["card_id"] == c] for c in cards}
    mixed = []
    while any(queues.values()):
        c = rng.choice([c for c in cards if queues[c]])
        mixed.append(queues[c].pop(0))
    assert mixed != in_order

    def content(batches):
        rid = run_id()
        alerts = alerts_of(process(rules, batches, rid))
        return sorted((a.subject_id, a.evidence_event_ids, a.severity, a.metrics["fills"], a.window_start,
                       a.window_end, a.summary) for a in alerts)

    a = content([[dumps(e) for e in in_order]])
    b = content([[dumps(e) for e in mixed[:11]], [dumps(e) for e in mixed[11:]]])
    assert a == b and len(a) == 6


def test_redelivered_events_change_nothing(process, rules, redis_sync):
    rid = run_id()
    one = dumps(fill("RED", T0, STATIN, 3))
    assert alerts_of(process(rules, [[one] * 3, [one]], rid)) == []
    assert [f[1] for f in fills_of(redis_sync, rid, "RED")] == [orjson.loads(one)["event_id"]]
    evs = [dumps(fill("RED2", T0 + d * DAY, STATIN, 2)) for d in (0, 2, 4)]
    first = alerts_of(process(rules, [evs], rid))
    again = alerts_of(process(rules, [evs, evs[:1]], rid))
    assert len(first) == len(again) == 1
    assert first[0].alert_id == again[0].alert_id
    assert first[0].evidence_event_ids == again[0].evidence_event_ids
    assert first[0].metrics == again[0].metrics


def test_one_alert_per_episode_and_a_new_one_after_a_quiet_gap(process, rules):
    rid = run_id()
    ep1 = [fill("EP", T0 + d * DAY, AMLO, 3) for d in (0, 2, 4)]
    ep2 = [fill("EP", T0 + d * DAY, AMLO, 3) for d in (70, 72, 73, 75)]
    alerts = alerts_of(process(rules, [[dumps(e) for e in ep1 + ep2]], rid))
    assert len(alerts) == 2
    assert sorted(len(a.evidence_event_ids) for a in alerts) == [3, 4]


def test_every_key_expires(process, rules, redis_sync):
    rid = run_id()
    process(rules, [[dumps(fill("TTL", T0 + d * DAY, AMLO, 3)) for d in (0, 1, 2)]], rid)
    keys = list(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    assert len(keys) == 3   # the card hash, the episode and its evidence
    assert len(fills_of(redis_sync, rid, "TTL")) == 3
    for k in keys:
        assert 0 < redis_sync.ttl(k) <= 2592000 + 3600, k


def test_fills_are_pruned_by_event_time_and_kept_in_order(process, rules, redis_sync):
    rid = run_id()
    old = [fill("PRUNE", T0 + d * DAY, AMLO) for d in (0, 10)]
    late = fill("PRUNE", T0 + 40 * DAY + 1800, STATIN)
    new = fill("PRUNE", T0 + 40 * DAY + 3600, AMLO)
    # the newest fill first, then one 30 min older (within lateness): stored in event-time order
    process(rules, [[dumps(e) for e in old], [dumps(new)], [dumps(late)]], rid)
    got = fills_of(redis_sync, rid, "PRUNE")
    # the fill of day 0 is more than window_s + lateness before the newest one: dropped; day 10 is kept
    assert [f[1] for f in got] == [e["event_id"] for e in (old[1], late, new)]
    assert [f[0] for f in got] == sorted(f[0] for f in got)
    assert got[1][3] == [["XC10AAA003", 28]] and got[2][2:] == ["P001", [["XC08CAA007", 28]]]
    # a fill more than window_s + lateness before the newest one is too late to count: not kept, no alert
    assert alerts_of(process(rules, [[dumps(fill("PRUNE", T0 + 5 * DAY, AMLO, 6))]], rid)) == []
    assert [f[1] for f in fills_of(redis_sync, rid, "PRUNE")] == [f[1] for f in got]


def test_one_entry_per_event_with_every_ingredient_and_exact_times(process, rules, redis_sync):
    rid = run_id()
    t1 = T0 + 0.123456   # sub-second event times are kept exactly (as text)
    two = fill("MULTI", t1, AMLO)
    two["items"].append({"code": "XC10AAA003", "name": "阿托伐他汀钙片", "category": "drug", "quantity": 2,
                         "amount": 179.0, "days_supply": 56})
    process(rules, [[dumps(two), dumps(fill("MULTI", T0 + DAY, STATIN))]], rid)
    got = fills_of(redis_sync, rid, "MULTI")
    assert len(got) == 2 and float(got[0][0]) == t1 and got[1][0] == T0 + DAY
    assert got[0][3] == [["XC08CAA007", 28], ["XC10AAA003", 56]] and got[1][3] == [["XC10AAA003", 28]]


def test_any_batching_with_redeliveries_gives_the_same_fills_and_alerts(process, rules, redis_sync):
    """A card's first fill is written as sent, later ones appended or merged: whichever way the events are cut
    into batches (a card's only event, several of a card in one batch, fills already stored), redelivered or
    reordered within lateness, the stored fills and the alerts are those of one event per batch in order."""
    rng = random.Random(11)
    evs = []
    for k, card in enumerate(("BA", "BB", "BC")):
        days = [0, 0.1, 2, 2.005, 4, 6, 9, 45, 46, 47.5, 47.51, 48]   # a quiet gap: the first fills are pruned
        for j, d in enumerate(days):
            t = T0 + d * DAY + k * 60 + (0.25 if j % 3 == 0 else 0)   # some fractional times
            drug = (AMLO, STATIN, INSULIN)[(j + k) % 3] if j % 4 else AMLO
            evs.append((t, fill(card, t, drug, 1 + j % 3, f"P{j % 4:03d}")))
    at = {e["event_id"]: t for t, e in evs}
    evs = [e for _, e in sorted(evs, key=lambda x: x[0])]

    def outcome(batches):
        rid = run_id()
        alerts = alerts_of(process(rules, batches, rid))
        fills = {c: [[float(f[0]), *f[1:]] for f in fills_of(redis_sync, rid, c)] for c in ("BA", "BB", "BC")}
        return fills, sorted((a.subject_id, a.evidence_event_ids,
                              a.metrics["fills"], a.window_start, a.summary) for a in alerts)

    ref = outcome([[dumps(e)] for e in evs])
    assert ref[1] and all(len(f) >= 4 for f in ref[0].values())
    assert outcome([[dumps(e) for e in evs]]) == ref
    for _ in range(4):
        # neighbours within minutes swapped (within lateness), random batch cuts, some events delivered twice
        order = list(evs)
        for m in range(len(order) - 1):
            if abs(at[order[m]["event_id"]] - at[order[m + 1]["event_id"]]) < 1800 and rng.random() < 0.5:
                order[m], order[m + 1] = order[m + 1], order[m]
        msgs = []
        for e in order:
            msgs.append(dumps(e))
            if rng.random() < 0.2:
                msgs.append(dumps(e))
        cuts = sorted(rng.sample(range(1, len(msgs)), 6))
        batches = [msgs[a:b] for a, b in zip([0] + cuts, cuts + [len(msgs)])]
        batches.append([dumps(e) for e in rng.sample(evs, 5)])   # a redelivered tail
        assert outcome(batches) == ref


@pytest.mark.parametrize("kwargs, message", [
    ({"window_s": 0}, "overdispensing: window_s must be a positive integer, got 0"),
    ({"window_s": 86400.5}, "overdispensing: window_s must be a positive integer, got 86400.5"),
    ({"ingredient_prefix_len": -1},
     "overdispensing: ingredient_prefix_len must be a non-negative integer (0 = whole code), got -1"),
    ({"max_supply_ratio": 0}, "overdispensing: max_supply_ratio must be a positive number, got 0"),
    ({"max_supply_ratio": 0.8},
     "overdispensing: max_supply_ratio must be >= 1 (supply beyond the days elapsed), got 0.8"),
    ({"max_supply_ratio": "2"}, "overdispensing: max_supply_ratio must be a positive number, got '2'"),
    ({"min_excess_days": -30}, "overdispensing: min_excess_days must be a positive number, got -30"),
    ({"min_fills": 1}, "overdispensing: min_fills must be >= 2 (a first fill and a refill), got 1"),
    ({"early_refill_min_left_days": -1},
     "overdispensing: early_refill_min_left_days must be a non-negative number, got -1"),
    ({"early_refill_share": 1.0}, "overdispensing: early_refill_share must be below 1, got 1.0"),
    ({"min_early_refills": 0}, "overdispensing: min_early_refills must be a positive integer, got 0"),
    ({"resale_prone_severity_step": 4},
     "overdispensing: resale_prone_severity_step must be an integer from 0 to 3, got 4"),
    ({"resale_prone": ["XC10AA"]}, "overdispensing: resale_prone must be a DrugList, got list"),
])
def test_parameters_validated_at_construction(kwargs, message):
    with pytest.raises(ValueError) as exc:
        Overdispensing(**kwargs)
    assert str(exc.value) == message


def test_defaults_and_resale_list_from_configuration(rules):
    det = next(d for d in rules.detectors if d.rule == "overdispensing")
    assert isinstance(det.resale_prone, DrugList) and det.resale_prone.matches("XC10AAA003")
    assert Overdispensing().params()["window_s"] == 2592000
