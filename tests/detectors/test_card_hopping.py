"""card_hopping against the real Redis: thresholds, event time, idempotence, episodes, expiry."""

from __future__ import annotations

import uuid

import orjson
import pytest

from detectors.card_hopping import CardHopping
from detectors.config import load_rules_text
from tests.helpers import T0, dumps, make_event

RULES = """
lateness_s: 3600
rules:
  card_hopping:
    windows:
      - {window_s: 86400, min_institutions: 12}
      - {window_s: 604800, min_institutions: 25}
"""


@pytest.fixture
def rules():
    return load_rules_text(RULES)


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def hop(card, n, start=T0, step_s=1800, prefix="P"):
    return [dumps(make_event(card, f"{prefix}{k:03d}", start + k * step_s)) for k in range(n)]


def alerts_of(results):
    out = {}
    for r in results:
        for a in r.alerts:
            out[a.alert_id] = a
    return list(out.values())


def test_fires_once_at_twelve_distinct_institutions_in_a_day(process, rules):
    rid = run_id()
    evs = hop("HOP", 14)
    res = process(rules, [evs[:11]], rid)
    assert alerts_of(res) == []
    res = process(rules, [evs], rid)  # 3 new institutions (12..14), the first 11 events redelivered
    alerts = alerts_of(res)
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.subject_type, a.subject_id, a.window_s) == ("card_hopping", "card", "HOP", 86400)
    assert a.metrics["distinct_institutions"] == 14
    assert len(a.evidence_event_ids) == 14
    assert "14 家" in a.summary and "24 小时" in a.summary
    assert a.run_id == rid and a.rule_version == rules.versions["card_hopping"]


def test_ordinary_card_many_visits_few_institutions_never_fires(process, rules):
    rid = run_id()
    evs = [dumps(make_event("ORD", f"P{k % 3:03d}", T0 + k * 600)) for k in range(40)]
    assert alerts_of(process(rules, [evs], rid)) == []


def test_windows_are_event_time_not_arrival_time(process, rules):
    rid = run_id()
    # 7 institutions on day 1 and 7 others 30 h later: never 12 within 24 h of event time,
    # although all 14 arrive in one batch within milliseconds.
    evs = hop("SPLIT", 7) + hop("SPLIT", 7, start=T0 + 30 * 3600, prefix="Q")
    assert alerts_of(process(rules, [evs], rid)) == []


def test_redelivered_event_ids_never_count_twice(process, rules, redis_sync):
    rid = run_id()
    evs = hop("DUP", 6)
    res = process(rules, [evs * 3, evs], rid)  # the same 6 events delivered four times
    assert alerts_of(res) == []
    # the card's field of its recent-activity hash: t, institution, event_id per settlement, each stored once
    flat = orjson.loads(redis_sync.hget(f"cw:{rid}:c:DUP", "card_hopping:86400,604800"))
    assert len(flat) == 3 * 6
    assert sorted(flat[2::3]) == sorted(orjson.loads(e)["event_id"] for e in evs)
    assert flat[0::3] == sorted(flat[0::3])  # canonical order: event time


def test_redelivery_while_firing_upserts_the_same_alert(process, rules):
    rid = run_id()
    evs = hop("RE", 13)
    first = alerts_of(process(rules, [evs], rid))
    again = alerts_of(process(rules, [evs], rid))
    assert len(first) == len(again) == 1
    assert first[0].alert_id == again[0].alert_id
    assert first[0].evidence_event_ids == again[0].evidence_event_ids
    assert (first[0].window_start, first[0].window_end) == (again[0].window_start, again[0].window_end)


def test_one_alert_per_episode_and_a_new_one_after_a_quiet_gap(process, rules):
    rid = run_id()
    day1 = hop("EP", 15)
    day5 = hop("EP", 13, start=T0 + 4 * 86400, prefix="R")
    alerts = [a for a in alerts_of(process(rules, [day1, day5], rid)) if a.window_s == 86400]
    assert len(alerts) == 2
    assert alerts[0].alert_id != alerts[1].alert_id


def test_week_window_fires_without_any_day_over_threshold(process, rules):
    rid = run_id()
    evs = []
    for d in range(5):  # 6 new institutions a day for 5 days: 30 in a week, never 12 in a day
        evs += [dumps(make_event("WEEK", f"W{d}{k}", T0 + d * 86400 + k * 3600)) for k in range(6)]
    alerts = alerts_of(process(rules, [evs], rid))
    assert [a.window_s for a in alerts] == [604800]
    assert alerts[0].metrics["distinct_institutions"] == 30
    assert len(alerts[0].evidence_event_ids) == 30
    assert "7 天" in alerts[0].summary


def test_severity_grows_with_distance_past_threshold(process, rules):
    rid = run_id()
    a12 = alerts_of(process(rules, [hop("S12", 12)], rid))[0]
    a24 = alerts_of(process(rules, [hop("S24", 24, step_s=1200)], rid))[0]
    order = ["low", "medium", "high", "critical"]
    assert order.index(a24.severity) > order.index(a12.severity)
    assert a24.score > a12.score


def test_every_key_expires(process, rules, redis_sync):
    rid = run_id()
    process(rules, [hop("TTL", 13)], rid)
    keys = list(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    assert keys, "no state written"
    for k in keys:
        ttl = redis_sync.ttl(k)
        assert 0 < ttl <= 604800 + 3600, (k, ttl)


def test_runs_are_isolated(process, rules):
    a, b = run_id(), run_id()
    process(rules, [hop("ISO", 8)], a)
    assert alerts_of(process(rules, [hop("ISO", 8, prefix="X")], b)) == []  # 8 + 8 only in different runs


@pytest.mark.parametrize("windows, message", [
    ([], "card_hopping: windows must be a non-empty list, got []"),
    ([{"window_s": 0, "min_institutions": 12}], "card_hopping: windows[0].window_s must be a positive integer, got 0"),
    ([{"window_s": 86400}], "card_hopping: windows[0].min_institutions is required"),
    ([{"window_s": 86400, "min_institutions": 1}], "card_hopping: windows[0].min_institutions must be >= 2, got 1"),
    ([{"window_s": 86400, "min_institutions": 12, "typo": 1}], "card_hopping: windows[0] has unknown field(s) ['typo']"),
    ([{"window_s": 86400, "min_institutions": 12}, {"window_s": 86400, "min_institutions": 3}],
     "card_hopping: windows must have distinct window_s, got [86400, 86400]"),
])
def test_parameters_validated_at_construction(windows, message):
    with pytest.raises(ValueError) as exc:
        CardHopping(windows=windows)
    assert str(exc.value) == message


def test_card_state_is_one_field_pruned_by_event_time_and_independent_of_arrival_order(process, rules, redis_sync):
    field = "card_hopping:86400,604800"
    week = [dumps(make_event("ORDR", f"P{k:03d}", T0 + k * 86400 + (k % 3) * 7)) for k in range(9)]
    late = week[:7] + [dumps(make_event("ORDR", "P999", T0 + 7 * 86400 + 7, event_id="T-same-time"))] + week[7:]
    a, b = run_id(), run_id()
    process(rules, [late], a)
    process(rules, [late[::-1][:4], late[::-1][4:]], b)  # other order, other batches: the same state
    sa, sb = redis_sync.hget(f"cw:{a}:c:ORDR", field), redis_sync.hget(f"cw:{b}:c:ORDR", field)
    assert sa == sb
    flat = orjson.loads(sa)
    newest = T0 + 8 * 86400 + 2 * 7
    # only what the largest window (+ lateness) can still reach from the newest event; nothing else of the run
    assert min(flat[0::3]) >= newest - 604800 - 3600
    assert len(flat) == 3 * 9 and flat[0::3] == sorted(flat[0::3])  # the first day's event is gone
    assert [k.decode() for k in redis_sync.scan_iter(match=f"cw:{a}:*")] == [f"cw:{a}:c:ORDR"]


def test_fractional_times_exact_whatever_the_batches_and_order(process, rules, redis_sync):
    # a card's first settlement is stored as the entry text built in Python, later ones appended to the stored
    # text, an earlier one re-encoded: every way, the same field, fractional times exact (%.17g text)
    from stream.events import parse_event
    field = "card_hopping:86400,604800"
    evs = [dumps(make_event("FRAC", f"P{k:03d}", T0 + k * 1800 + 0.123457 * (k % 3))) for k in range(5)]
    want = [parse_event(e).ts for e in evs]
    assert any(t % 1 for t in want)
    runs = {"one batch": [evs], "a batch each": [[e] for e in evs], "reversed": [[e] for e in evs[::-1]],
            "append, then insert": [evs[2:], evs[:2]],
            "known, then new in one batch": [evs[1:3], evs[::-1]]}
    got = {}
    for name, batches in runs.items():
        rid = run_id()
        process(rules, batches + [evs], rid)  # then every event redelivered: no change
        flat = orjson.loads(redis_sync.hget(f"cw:{rid}:c:FRAC", field))
        assert [float(x) for x in flat[0::3]] == want, name
        assert [x for x in flat[0::3] if isinstance(x, str)] == [f"{t:.17g}" for t in want if t % 1], name
        got[name] = flat
    assert all(v == got["one batch"] for v in got.values())


def test_state_written_before_is_read_and_extended(process, rules, redis_sync):
    # the field as an earlier worker wrote it (cjson, a fractional time as %.17g text): redelivering its event is a
    # no-op, a new one is appended, an earlier one inserted
    rid = run_id()
    field = "card_hopping:86400,604800"
    key = f"cw:{rid}:c:OLD"
    t1 = T0 + 0.5
    redis_sync.hset(key, field, f'["{t1:.17g}","P\\/1","E-OLD-1",{int(T0) + 3600},"P002","E-OLD-2"]')
    process(rules, [[dumps(make_event("OLD", "P/1", t1, event_id="E-OLD-1"))]], rid)
    assert orjson.loads(redis_sync.hget(key, field)) == [f"{t1:.17g}", "P/1", "E-OLD-1", T0 + 3600, "P002", "E-OLD-2"]
    process(rules, [[dumps(make_event("OLD", "P003", T0 + 7200, event_id="E-NEW-3")),
                     dumps(make_event("OLD", "P004", T0 - 60, event_id="E-NEW-0"))]], rid)
    flat = orjson.loads(redis_sync.hget(key, field))
    assert flat[2::3] == ["E-NEW-0", "E-OLD-1", "E-OLD-2", "E-NEW-3"]
    assert flat[0::3] == [T0 - 60, f"{t1:.17g}", T0 + 3600, T0 + 7200]


def test_a_card_one_settlement_per_batch_fires_as_in_one_batch(process, rules):
    # a card with one event per batch (its field read, extended and written by that event alone) and with all in one
    # batch (read once, written once): the same alert
    evs = hop("ONEBYONE", 14)
    one = alerts_of(process(rules, [evs], run_id()))
    each = alerts_of(process(rules, [[e] for e in evs], run_id()))
    assert len(one) == len(each) == 1
    a, b = one[0], each[0]
    assert a.evidence_event_ids == b.evidence_event_ids and len(a.evidence_event_ids) == 14
    assert (a.metrics, a.window_start, a.window_end, a.severity) == (b.metrics, b.window_start, b.window_end, b.severity)
