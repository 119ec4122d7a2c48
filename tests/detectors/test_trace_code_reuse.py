"""trace_code_reuse against the real Redis: a package's traceability code settled twice, redelivery,
arrival order, retention in event time, compact buckets that expire, parameter validation."""

from __future__ import annotations

import uuid

import pytest

from detectors.config import load_rules_text
from detectors.trace_code_reuse import TraceCodeReuse
from tests.helpers import T0, dumps, make_event

DAY = 86400
RULES = """
lateness_s: 3600
rules:
  trace_code_reuse:
    retention_s: 63072000
    period_s: 15768000
    buckets: 64
    min_code_len: 12
"""


@pytest.fixture
def rules():
    return load_rules_text(RULES)


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def code(n: int) -> str:
    return f"8{104729:06d}{n:013d}"


def sale(card, inst, t, codes, **over):
    items = [{"code": "XB01ACA002", "name": "硫酸氢氯吡格雷片", "category": "drug", "quantity": len(codes) or 1,
              "amount": 96.0 * (len(codes) or 1), "days_supply": 28 * (len(codes) or 1), "trace_codes": list(codes)}]
    amt = items[0]["amount"]
    return make_event(card, inst, t, items=items, total_amount=amt, fund_paid=round(amt * 0.6, 2),
                      self_paid=round(amt * 0.4, 2), **over)


def bucket_keys(redis_sync, rid):
    """The run's code buckets; its period index (``...:periods``, one small hash) aside."""
    keys = list(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    index = [k for k in keys if k.endswith(b":periods")]
    assert len(index) <= 1 and all(k == f"cw:{rid}:trace_code_reuse:63072000:periods".encode() for k in index)
    return [k for k in keys if k not in index]


def alerts_of(results):
    out = {}
    for r in results:
        for a in r.alerts:
            if a.rule == "trace_code_reuse":
                out[a.alert_id] = a
    return list(out.values())


def test_fires_when_a_package_code_is_settled_again(process, rules):
    rid = run_id()
    first = sale("CA", "H001", T0, [code(1), code(2), code(3)])
    second = sale("CB", "P009", T0 + 3 * DAY + 7200, [code(2), code(3)])
    alerts = alerts_of(process(rules, [[dumps(first)], [dumps(second)]], rid))
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.subject_type, a.subject_id) == ("trace_code_reuse", "institution", "P009")
    assert a.member_ids == ["CA", "CB"]
    assert a.evidence_event_ids == [first["event_id"], second["event_id"]]
    m = a.metrics
    assert (m["first_event_id"], m["first_card"], m["first_institution"], m["first_time"]) == \
        (first["event_id"], "CA", "H001", "2026-11-02T08:00:00+08:00")
    assert (m["second_event_id"], m["second_card"], m["second_institution"], m["second_time"]) == \
        (second["event_id"], "CB", "P009", "2026-11-05T10:00:00+08:00")
    assert m["reused_codes"] == 2 and m["trace_codes"] == [code(2), code(3)]
    assert a.severity == "high" and a.rule_version == rules.versions["trace_code_reuse"]
    assert a.summary.startswith("2 盒 硫酸氢氯吡格雷片 的药品追溯码在机构 P009 由卡 CB 再次结算")
    assert "首次已于 2026-11-02T08:00:00+08:00 在机构 H001 由卡 CA 结算，相隔 3.1 天，疑似回流药" in a.summary
    assert (a.window_start, a.window_end) == (m["first_time"], m["second_time"])


def test_the_same_event_redelivered_is_not_reuse(process, rules, redis_sync):
    rid = run_id()
    one = dumps(sale("RA", "P001", T0, [code(10), code(11)]))
    assert alerts_of(process(rules, [[one, one], [one], [one]], rid)) == []
    keys = bucket_keys(redis_sync, rid)
    assert sum(redis_sync.hlen(k) for k in keys) == 2
    assert redis_sync.hgetall(f"cw:{rid}:trace_code_reuse:63072000:periods") == {
        str(int(T0 // 15768000)).encode(): f"{int(T0)} {int(T0)}".encode()}


def test_codes_repeated_within_one_settlement_and_unusable_codes_are_ignored(process, rules):
    rid = run_id()
    evs = [sale("RB", "P001", T0, [code(20), code(20)]),           # the same code twice on one bill
           sale("RC", "P002", T0 + 60, ["0000", "未知", "12345"]),  # placeholders and a short code
           sale("RD", "P003", T0 + 120, ["0000", "未知", "12345"])]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_redelivered_second_settlement_upserts_the_same_alert(process, rules):
    rid = run_id()
    first = dumps(sale("SA", "H001", T0, [code(30)]))
    second = dumps(sale("SB", "P002", T0 + DAY, [code(30)]))
    a1 = alerts_of(process(rules, [[first, second]], rid))
    a2 = alerts_of(process(rules, [[second, first, second]], rid))
    assert len(a1) == len(a2) == 1
    assert a1[0].alert_id == a2[0].alert_id and a1[0].metrics == a2[0].metrics
    assert a1[0].evidence_event_ids == a2[0].evidence_event_ids


def test_order_of_arrival_does_not_change_which_settlement_is_first(process, rules):
    first = sale("OA", "H001", T0, [code(40), code(41)])
    second = sale("OB", "P002", T0 + 1800, [code(40), code(41)])

    def content(batches):
        alerts = alerts_of(process(rules, batches, run_id()))
        return [(a.subject_id, a.member_ids, a.evidence_event_ids, a.window_start, a.window_end, a.summary,
                 {k: v for k, v in a.metrics.items()}) for a in alerts]

    in_order = content([[dumps(first)], [dumps(second)]])
    # the second settlement's card sits in another partition that was delivered first (within lateness)
    late = content([[dumps(second)], [dumps(first)]])
    assert in_order == late and len(in_order) == 1
    assert in_order[0][0] == "P002"


def test_earlier_settlement_arriving_second_survives_a_crash_redelivery(process, rules):
    """The later settlement is remembered first; the earlier one then takes its place as the code's first
    settlement. A worker that dies after Redis ran that batch but before its alerts were saved gets the
    batch again: the pair must still be found, with the same alert."""
    rid = run_id()
    later = dumps(sale("XB", "P002", T0 + 7200, [code(45)]))
    earlier = dumps(sale("XA", "H001", T0, [code(45)]))
    first_run = alerts_of(process(rules, [[later], [earlier]], rid))
    redelivered = alerts_of(process(rules, [[earlier]], rid))
    again = alerts_of(process(rules, [[earlier], [later]], rid))
    assert len(first_run) == len(redelivered) == len(again) == 1
    assert first_run[0].alert_id == redelivered[0].alert_id == again[0].alert_id
    assert redelivered[0].metrics == first_run[0].metrics
    assert redelivered[0].metrics["first_card"] == "XA" and redelivered[0].subject_id == "P002"


def test_displaced_records_per_code_are_bounded(process, rules, redis_sync):
    rid = run_id()
    # ever earlier settlements of one code, each arriving after the later ones
    evs = [sale(f"B{i}", f"P{i:03d}", T0 + (10 - i) * 600, [code(46)]) for i in range(10)]
    alerts = alerts_of(process(rules, [[dumps(e)] for e in evs], rid))
    assert len(alerts) == 9  # every settlement but the earliest is a second settlement
    values = [v for k in bucket_keys(redis_sync, rid) for v in redis_sync.hvals(k)]
    assert len(values) == 1 and values[0].count(b"\x1e") == 3  # 4 records at most


def test_third_settlement_is_paired_with_the_first(process, rules):
    rid = run_id()
    evs = [sale("TA", "H001", T0, [code(50)]), sale("TB", "P002", T0 + DAY, [code(50)]),
           sale("TC", "P003", T0 + 2 * DAY, [code(50)])]
    alerts = {a.subject_id: a for a in alerts_of(process(rules, [[dumps(e) for e in evs]], rid))}
    assert sorted(alerts) == ["P002", "P003"]
    assert alerts["P003"].metrics["first_event_id"] == evs[0]["event_id"]
    assert alerts["P003"].member_ids == ["TA", "TC"]


def test_legitimate_sales_with_their_own_codes_never_fire(process, rules):
    rid = run_id()
    evs = [sale(f"L{k}", f"P{k % 3:03d}", T0 + k * 600, [code(1000 + 2 * k), code(1001 + 2 * k)]) for k in range(40)]
    # a family buying together: the same drug, each package its own code
    evs += [sale("FAM1", "P100", T0, [code(5000)]), sale("FAM2", "P100", T0 + 60, [code(5001)])]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_retention_is_event_time_and_spans_period_buckets(process):
    short = load_rules_text("rules:\n  trace_code_reuse:\n    retention_s: 864000\n    period_s: 86400\n"
                            "    buckets: 8\n")
    rid = run_id()
    evs = [sale("EA", "H001", T0, [code(60), code(61)]),
           sale("EB", "P002", T0 + 9 * DAY, [code(60)]),           # 9 days later, 9 buckets away: reuse
           sale("EC", "P003", T0 + 10 * DAY + 1, [code(61)])]      # just past the 10-day retention: not
    alerts = alerts_of(process(short, [[dumps(e) for e in evs]], rid))
    assert [a.subject_id for a in alerts] == ["P002"]


def test_period_index_skips_only_periods_without_a_code_in_retention(process):
    short = load_rules_text("rules:\n  trace_code_reuse:\n    retention_s: 864000\n    period_s: 86400\n"
                            "    buckets: 8\n")
    rid = run_id()
    evs = [sale("IA", "H001", T0 + 3600, [code(63)]),                  # the period's latest code...
           sale("IB", "H001", T0, [code(62)]),                         # ... and its earliest, arriving later
           sale("IC", "P002", T0 + 10 * DAY + 3600, [code(63)]),       # exactly the retention after IA: reuse
           sale("ID", "P003", T0 + 10 * DAY + 1, [code(62)]),          # just past it for IB: not
           sale("IE", "P004", T0 + 3 * DAY, [code(64)]),               # a later settlement first ...
           sale("IF", "P005", T0 + 3 * DAY - 1800, [code(64)])]        # ... then an earlier one, within lateness
    alerts = alerts_of(process(short, [[dumps(e)] for e in evs], rid))
    assert sorted(a.subject_id for a in alerts) == ["P002", "P004"]


def test_period_index_forgets_periods_far_behind_the_stream(process, redis_sync):
    short = load_rules_text("rules:\n  trace_code_reuse:\n    retention_s: 864000\n    period_s: 86400\n"
                            "    buckets: 8\n")
    rid = run_id()
    index = f"cw:{rid}:trace_code_reuse:864000:periods"
    edge = T0 + 20 * DAY + 3600  # twice the retention and the lateness after the first code
    process(short, [[dumps(sale("GA", "H001", T0, [code(80)]))], [dumps(sale("GB", "H001", edge, [code(81)]))]], rid)
    assert sorted(int(q) for q in redis_sync.hkeys(index)) == [int(T0 // DAY), int(edge // DAY)]
    process(short, [[dumps(sale("GC", "H001", edge + 1, [code(82)]))]], rid)
    assert sorted(int(q) for q in redis_sync.hkeys(index)) == [int(edge // DAY)]


def test_placeholder_institution_is_never_blamed(process, rules):
    rid = run_id()
    evs = [sale("PA", "H001", T0, [code(70)]), sale("PB", "未知", T0 + DAY, [code(70)])]
    assert alerts_of(process(rules, [[dumps(e) for e in evs]], rid)) == []


def test_buckets_are_compact_hashes_and_expire(process, rules, redis_sync):
    rid = run_id()
    evs = [sale(f"K{k}", "P001", T0 + k * 60, [code(8000 + k)]) for k in range(200)]
    process(rules, [[dumps(e) for e in evs]], rid)
    keys = bucket_keys(redis_sync, rid)
    assert 0 < len(keys) <= 64
    assert sum(redis_sync.hlen(k) for k in keys) == 200
    index = f"cw:{rid}:trace_code_reuse:63072000:periods"
    # the period index: the event times written to each period (one here), so that lookups skip empty periods
    assert redis_sync.hgetall(index) == {str(int(T0 // 15768000)).encode(): f"{int(T0)} {int(T0) + 199 * 60}".encode()}
    for k in keys + [index.encode()]:
        assert redis_sync.object("encoding", k) in (b"ziplist", b"listpack"), k
        assert 0 < redis_sync.ttl(k) <= 63072000 + 3600, k


@pytest.mark.parametrize("kwargs, message", [
    ({"retention_s": 0}, "trace_code_reuse: retention_s must be a positive integer, got 0"),
    ({"period_s": 1.5}, "trace_code_reuse: period_s must be a positive integer, got 1.5"),
    ({"buckets": -1}, "trace_code_reuse: buckets must be a positive integer, got -1"),
    ({"min_code_len": 0}, "trace_code_reuse: min_code_len must be a positive integer, got 0"),
    ({"retention_s": 86400, "period_s": 172800},
     "trace_code_reuse: period_s must be at most retention_s (86400), got 172800"),
    ({"retention_s": 63072000, "period_s": 86400},
     "trace_code_reuse: retention_s / period_s must be at most 120 (one lookup per period), got 730"),
    ({"buckets": (1 << 32) + 1}, "trace_code_reuse: buckets must be at most 4294967296, got 4294967297"),
])
def test_parameters_validated_at_construction(kwargs, message):
    with pytest.raises(ValueError) as exc:
        TraceCodeReuse(**kwargs)
    assert str(exc.value) == message
