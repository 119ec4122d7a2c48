"""prescriber_volume against the real Redis: own baseline and peers, complete days, order, idempotence, expiry."""

from __future__ import annotations

import random
import uuid
from datetime import datetime
from itertools import count

import orjson
import pytest

from detectors.config import load_rules_text
from detectors.drugs import DrugList
from detectors.prescriber_volume import PrescriberVolume
from stream.events import iso, parse_event
from tests.helpers import TZ, dumps, make_event

RULES = """
lateness_s: 3600
resale_prone_drugs:
  code_prefixes: [XC10AA, XB01AC]
  name_keywords: [他汀, 氯吡格雷]
rules:
  prescriber_volume:
    baseline_days: 28
    min_baseline_days: 3
    peer_days: 7
    min_peers: 5
    peer_quantile: 0.9
    measures:
      settlements: {min_per_day: 5, own_factor: 3.0, poisson_z: 3.0}
      amount_cny: {min_per_day: 1000, own_factor: 3.0}
      resale_share: {min_resale_settlements: 3, min_increase: 0.3}
    require: [settlements]
    min_measures: 2
"""
_cards = count(1)


@pytest.fixture
def rules():
    return load_rules_text(RULES)


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def at(day: int, hour: float) -> float:
    return datetime(2026, 11, day, tzinfo=TZ).timestamp() + hour * 3600


def rx(phys: str, t: float, *, resale: bool = False, cheap: bool = False, inst: str = "H310104002",
       dept: str = "心血管内科", **over) -> tuple[float, bytes]:
    if resale:
        drug = {"code": "XC10AAA003", "name": "阿托伐他汀钙片", "category": "drug", "quantity": 3, "amount": 268.5}
    else:
        drug = {"code": "XC08CAA007", "name": "苯磺酸氨氯地平片", "category": "drug", "quantity": 1,
                "amount": 6.0 if cheap else 37.8}
    items = [{"code": "R0001", "name": "普通门诊挂号", "category": "registration", "quantity": 1, "amount": 22.0}, drug]
    total = round(items[0]["amount"] + drug["amount"], 2)
    ev = make_event(f"31010{next(_cards):011d}", inst, t, institution_type="hospital", institution_level=2,
                    visit_type="outpatient", department=dept, physician_id=phys, diagnoses=["I10"], items=items,
                    total_amount=total, fund_paid=round(total * 0.7, 2), self_paid=round(total * 0.3, 2), **over)
    return t, dumps(ev)


def history(physicians, days, per_day=2):
    """``per_day`` ordinary settlements for each physician on each day (9:00 onwards)."""
    return [rx(p, at(d, 9 + 1.5 * k)) for d in days for p in physicians for k in range(per_day)]


PEERS = [f"D310104002{k:03d}" for k in range(2, 9)]      # seven colleagues in the group
SUBJ = "D310104002001"


def trigger(day: int) -> tuple[float, bytes]:
    """Any later settlement (a pharmacy purchase) past the day's end + lateness: that day is complete."""
    return at(day, 2), dumps(make_event("TRIG" + str(day), "P001", at(day, 2)))


def batches(evs, size=50):
    ordered = [b for _, b in sorted(evs, key=lambda x: x[0])]
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


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


def spike(day, n, *, phys=SUBJ, start=9.0, step_h=0.5, resale=True):
    return [rx(phys, at(day, start + step_h * k), resale=resale) for k in range(n)]


def test_fires_on_a_day_far_above_own_baseline_and_peers(process, rules):
    rid = run_id()
    evs = history(PEERS + [SUBJ], range(1, 7)) + spike(6, 12) + [trigger(7)]
    alerts = alerts_of(process(rules, batches(evs), rid))
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.rule, a.subject_type, a.subject_id, a.window_s) == ("prescriber_volume", "physician", SUBJ, 86400)
    assert a.metrics["fired"] == ["settlements", "amount_cny", "resale_share"]
    assert a.metrics["settlements"] == 14 and a.metrics["baseline_median_settlements"] == 2
    assert a.metrics["resale_prone_settlements"] == 12 and a.metrics["peers"] == 7
    assert a.metrics["day"] == "2026-11-06" and a.metrics["institution_id"] == "H310104002"
    assert len(a.evidence_event_ids) == 14
    assert a.window_start.startswith("2026-11-06T09:00") and a.severity == "critical"
    assert "2026-11-06 结算 14 笔" in a.summary and "二级医院 心血管内科" in a.summary
    assert a.rule_version == rules.versions["prescriber_volume"]


def test_busy_physician_with_a_steady_high_volume_never_fires(process, rules):
    rid = run_id()
    busy = "D310104002099"
    evs = history(PEERS, range(1, 10)) + [rx(busy, at(d, 8 + 0.6 * k), resale=k % 2 == 0)
                                          for d in range(1, 10) for k in range(14)] + [trigger(11)]
    assert alerts_of(process(rules, batches(evs), rid)) == []


def test_no_verdict_without_enough_history_or_peers(process, rules):
    rid = run_id()   # two active days of history only
    evs = history(PEERS, range(1, 4)) + history([SUBJ], range(2, 4)) + spike(4, 12) + [trigger(5)]
    assert alerts_of(process(rules, batches(evs), rid)) == []
    rid = run_id()   # three colleagues only, in the group and in the department
    evs = history(PEERS[:3] + [SUBJ], range(1, 7)) + spike(6, 12) + [trigger(7)]
    assert alerts_of(process(rules, batches(evs), rid)) == []


def test_placeholder_physicians_are_never_subjects(process, rules, redis_sync):
    rid = run_id()
    evs = history(PEERS + ["未知"], range(1, 7)) + spike(6, 14, phys="未知") + spike(6, 14, phys="0000") + [trigger(7)]
    assert alerts_of(process(rules, batches(evs), rid)) == []
    assert not [k for k in redis_sync.scan_iter(match=f"cw:{rid}:*") if "未知".encode() in k or b":0000" in k]


def test_volume_alone_without_value_or_resale_share_does_not_fire(process, rules):
    rid = run_id()
    evs = history(PEERS + [SUBJ], range(1, 7)) + [rx(SUBJ, at(6, 9 + 0.4 * k), cheap=True) for k in range(14)] + \
        [trigger(7)]
    assert alerts_of(process(rules, batches(evs), rid)) == []


def test_boundary_settlements_at_the_own_bound(process, rules):
    # median 2 a day: the bound is max(5, 3 x 2, 2 + 3 sqrt 2 = 6.24) -> 7 settlements fire, 6 do not
    rid = run_id()
    evs = history(PEERS + [SUBJ], range(1, 7)) + spike(6, 4) + [trigger(7)]
    assert alerts_of(process(rules, batches(evs), rid)) == []
    rid = run_id()
    evs = history(PEERS + [SUBJ], range(1, 7)) + spike(6, 5) + [trigger(7)]
    a, = alerts_of(process(rules, batches(evs), rid))
    assert a.metrics["settlements"] == 7


def test_a_day_is_judged_once_complete_even_without_in_progress_evidence(process, rules):
    rid = run_id()
    # the spike lies in the day's first hour (the previous day is not complete yet: no in-progress verdict)
    evs = history(PEERS + [SUBJ], range(1, 6)) + spike(6, 12, start=0.05, step_h=0.07)
    assert alerts_of(process(rules, batches(evs), rid)) == []
    a, = alerts_of(process(rules, [[trigger(7)[1]]], rid))
    assert a.subject_id == SUBJ and len(a.evidence_event_ids) == 12


def test_out_of_order_within_lateness_gives_the_same_alerts(process, rules):
    evs = history(PEERS + [SUBJ], range(1, 7)) + spike(6, 12) + spike(6, 3, phys=PEERS[0], resale=False) + \
        [trigger(7)]
    in_order = batches(evs, 40)
    rnd = random.Random(5)   # other partitions lag by up to 55 minutes
    lagged = [b for _, b in sorted(evs, key=lambda x: x[0] + rnd.uniform(0, 3300))]
    assert [b for batch in in_order for b in batch] != lagged
    a = final(process(rules, in_order, run_id()))
    b = final(process(rules, [lagged[i:i + 13] for i in range(0, len(lagged), 13)], run_id()))
    assert len(a) == 1
    assert sorted((sorted(v[0]),) + v[1:] for v in a.values()) == sorted((sorted(v[0]),) + v[1:] for v in b.values())


def test_redelivered_events_change_nothing(process, rules, redis_sync):
    rid = run_id()
    evs = history(PEERS + [SUBJ], range(1, 7)) + spike(6, 12) + [trigger(7)]
    first = final(process(rules, batches(evs), rid))
    hkey = f"cw:{rid}:prescriber_volume:{28 * 86400}:{SUBJ}"
    dkey = f"cw:{rid}:prescriber_volume:day:{SUBJ}:2026-11-06"
    before, day = redis_sync.hgetall(hkey), redis_sync.hgetall(dkey)
    assert day[b"s"].startswith(b"s14,14,")   # swept; 14 settlements
    assert sum(v.count(b"|") for f, v in day.items() if f.startswith(b"e")) == 14   # 14 evidence entries
    again = final(process(rules, batches(evs) + batches(evs, 17), rid))
    assert redis_sync.hgetall(hkey) == before and redis_sync.hgetall(dkey) == day
    assert first.keys() == again.keys()
    assert [v[0] for v in first.values()] == [v[0] for v in again.values()]


def test_evidence_keeps_any_event_id_and_time_exactly(process, rules, redis_sync):
    # ids that are prefixes of each other or hold the day string's separators, non-ASCII ids, and
    # times with microseconds: each counted once, redelivered or not, and returned as they came
    ids = ["E1", "E12", "E1 2", "E|1", "|E1 ", "E\t1", "~E1", "医保-1", "E1.2:x-y_z", "e1", "E12 ", "7"]
    times = [at(6, 11 + 0.5 * k) + 0.123457 * (k + 1) for k in range(11)]
    times.append(times[-1] + 0.000003)    # "7" sorts before "E12 " but comes 3 µs after it
    spk = [(t, dumps(orjson.loads(rx(SUBJ, t, resale=True)[1]) | {"event_id": i})) for t, i in zip(times, ids)]
    rid = run_id()
    evs = history(PEERS + [SUBJ], range(1, 7)) + spk + [trigger(7)]
    a, = alerts_of(process(rules, batches(evs) + [[b for _, b in spk]] + batches(evs, 7), rid))
    assert a.metrics["settlements"] == 14 and len(a.evidence_event_ids) == 14
    assert a.evidence_event_ids[-12:] == ids          # in event-time order, to the microsecond
    assert a.window_end == iso(parse_event(spk[-1][1], future_tolerance_s=1e10).ts)
    day = redis_sync.hgetall(f"cw:{rid}:prescriber_volume:day:{SUBJ}:2026-11-06")
    assert sum(v.count(b"|") for f, v in day.items() if f.startswith(b"e")) == 14


def test_a_day_stored_by_the_earlier_one_string_format_is_converted_and_carries_on(process, rules, redis_sync):
    """A worker upgraded mid-day finds days stored as one string (counts, evidence, institution): it converts
    them (TTL kept) and counts on, a redelivered settlement of the old evidence still counted once."""
    hist, spk = history(PEERS + [SUBJ], range(1, 7)), spike(6, 12)
    evs = hist + spk + [trigger(7)]
    ref = final(process(rules, batches(evs), run_id()))
    rid = run_id()
    head = hist + spk[:6]
    process(rules, batches(head), rid)
    dkey = f"cw:{rid}:prescriber_volume:day:{SUBJ}:2026-11-06"
    day = {f.decode(): v.decode() for f, v in redis_sync.hgetall(dkey).items()}
    counts, inst = day["s"].split("\t")
    ev = "".join(v for f, v in sorted(day.items()) if f.startswith("e"))
    assert counts.startswith("-8,8,") and ev.count("|") == 8
    redis_sync.delete(dkey)
    redis_sync.set(dkey, f"{counts}\t{ev}\t{inst}", ex=3 * 86400)   # as the earlier version stored it
    got = final(process(rules, batches(head) + batches(evs), rid))
    assert redis_sync.type(dkey) == b"hash" and 0 < redis_sync.ttl(dkey) <= 3 * 86400
    assert [(v[0], v[2]) for v in got.values()] == [(v[0], v[2]) for v in ref.values()]
    assert len(got) == 1 and "'settlements': 14" in next(iter(got.values()))[2]


def test_every_key_expires(process, rules, redis_sync):
    rid = run_id()
    process(rules, batches(history(PEERS + [SUBJ], range(1, 7)) + spike(6, 12) + [trigger(7)]), rid)
    keys = list(redis_sync.scan_iter(match=f"cw:{rid}:*"))
    assert any(b":peer:" in k for k in keys) and any(k.endswith(b":wmp") for k in keys)
    for k in keys:
        ttl = redis_sync.ttl(k)
        assert 0 < ttl <= 30 * 86400 + 3600, (k, ttl)   # history: baseline_days + 2 days + lateness


@pytest.mark.parametrize("kwargs, message", [
    ({"baseline_days": 0}, "prescriber_volume: baseline_days must be a positive integer, got 0"),
    ({"min_baseline_days": 30}, "prescriber_volume: min_baseline_days must be <= baseline_days (28), got 30"),
    ({"peer_quantile": 1.0}, "prescriber_volume: peer_quantile must be a number in [0.5, 1), got 1.0"),
    ({"min_measures": 4}, "prescriber_volume: min_measures must be <= 3, got 4"),
    ({"require": ["volume"]},
     "prescriber_volume: require must be a list of measures from ['settlements', 'amount_cny', 'resale_share'], "
     "got ['volume']"),
    ({"measures": {"settlement": {}}}, "prescriber_volume: measures has unknown measure(s) ['settlement']"),
    ({"measures": {"settlements": {"own_factor": 0.5}}},
     "prescriber_volume: measures.settlements.own_factor must be >= 1, got 0.5"),
    ({"measures": {"amount_cny": {"min_per_day": -5}}},
     "prescriber_volume: measures.amount_cny.min_per_day must be a positive number, got -5"),
    ({"measures": {"resale_share": {"min_increase": 1.5}}},
     "prescriber_volume: measures.resale_share.min_increase must be < 1, got 1.5"),
    ({"measures": {"resale_share": {"min_resale": 3}}},
     "prescriber_volume: measures.resale_share has unknown field(s) ['min_resale']"),
    ({"resale_prone": ["XC10AA"]}, "prescriber_volume: resale_prone must be a DrugList, got ['XC10AA']"),
])
def test_parameters_validated_at_construction(kwargs, message):
    with pytest.raises(ValueError) as exc:
        PrescriberVolume(**kwargs)
    assert str(exc.value) == message


def test_resale_prone_list_comes_from_the_configuration(rules):
    det = rules.detectors[0]
    assert isinstance(det.resale_prone, DrugList) and det.resale_prone.matches("XC10AAA003", None)
