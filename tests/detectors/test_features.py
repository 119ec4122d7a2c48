"""The ml_outlier feature function: pure on crafted windows, and the windows its Lua keeps in the real Redis."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from detectors import _features as F
from detectors.drugs import DrugList
from stream.events import parse_event
from tests.helpers import T0, dumps, make_event

RESALE = DrugList(["XB01AC"], ["胰岛素"])
QUIET = F.Window(new=True, n=(1, 1, 1), inst=(1, 1, 1), dist=(1, 1, 1), days_on_hand=0.0,
                 phys_today=-1, phys_base=0.0, phys_days=0, inst_today=1, inst_base=0.0, inst_days=0)


def ev(card="C1", inst="P001", t=T0, partition=0, **over):
    e = parse_event(dumps(make_event(card, inst, t, **over)), future_tolerance_s=10 * 365 * 86400)
    e.partition = partition
    return e


# -- the pure function on crafted windows ------------------------------------------------------

def test_event_features():
    e = ev(t=T0 + 30 * 60, items=[
        {"code": "XB01ACA002", "name": "硫酸氢氯吡格雷片", "category": "drug", "quantity": 2, "amount": 192.0,
         "days_supply": 56},
        {"code": "Y1", "name": "甘精胰岛素注射液", "category": "drug", "quantity": 1, "amount": 100.0, "days_supply": 15},
        {"code": "R0001", "category": "registration", "quantity": 1, "amount": 8.0}],
        total_amount=300.0, fund_paid=180.0)
    f = F.features(e, QUIET, RESALE)
    assert set(f) == set(F.FEATURES)
    assert f["amount_cny"] == 300.0
    assert f["fund_share"] == 0.6
    assert f["n_lines"] == 3.0
    assert f["resale_share"] == round(292 / 300, 4)      # by name keyword as well as by code prefix
    assert f["hour"] == 8.5                               # T0 is 08:00 +08:00
    assert f["days_supply_ratio"] == round(71 / 30, 2)    # nothing on hand, 56 + 15 days bought now
    assert f["phys_vol_ratio"] == 1.0 and f["inst_vol_ratio"] == 1.0   # no completed day yet: neutral


def test_window_features():
    w = QUIET._replace(n=(2, 7, 15), inst=(2, 6, 12), dist=(1, 3, 5), days_on_hand=40.0,
                       phys_today=9, phys_base=2.0, phys_days=4, inst_today=3, inst_base=5.0, inst_days=1)
    f = F.features(ev(), w, RESALE)
    assert (f["card_n_1h"], f["card_n_24h"], f["card_n_7d"]) == (2.0, 7.0, 15.0)
    assert (f["card_inst_1h"], f["card_inst_24h"], f["card_inst_7d"]) == (2.0, 6.0, 12.0)
    assert (f["card_dist_1h"], f["card_dist_24h"], f["card_dist_7d"]) == (1.0, 3.0, 5.0)
    assert f["days_supply_ratio"] == round((40 + 28) / 30, 2)
    assert f["phys_vol_ratio"] == round(10 / 3, 2)        # (today + 1) / (baseline + 1)
    assert f["inst_vol_ratio"] == round(4 / 6, 2)


def test_edge_cases_are_finite():
    e = ev(items=[], total_amount=0.0, fund_paid=0.0, physician_id=None)
    f = F.features(e, QUIET, RESALE)
    assert f["fund_share"] == 0.0 and f["resale_share"] == 0.0 and f["n_lines"] == 0.0
    assert all(v == v and abs(v) < 1e12 for v in f.values())
    assert F.features(e, QUIET)["resale_share"] == 0.0   # no drug list configured


def test_hour_is_local_time_whatever_the_offset():
    a = parse_event(dumps(make_event(event_time="2026-11-02T01:15:00+00:00")), future_tolerance_s=1e10)
    assert F.features(a, QUIET)["hour"] == 9.25


# -- the windows the Lua script keeps ----------------------------------------------------------

@pytest.fixture
def windows(stack):
    import redis.asyncio as aioredis

    run_id = f"t{uuid.uuid4().hex[:10]}"
    prefix = f"cw:{run_id}:ml_outlier"
    card_prefix = f"cw:{run_id}:c:"      # the processor's per-card hash (Namespace.card_prefix("c"))

    def run(batches):
        async def go():
            r = aioredis.from_url(stack.redis_url)
            try:
                sha = await r.script_load(F.LUA)
                out = []
                for b in batches:
                    async with r.pipeline(transaction=False) as pipe:
                        F.queue_windows(pipe, sha, b, prefix, lateness_s=3600, card_prefix=card_prefix)
                        [rep] = await pipe.execute()
                    out += F.parse_windows(rep)
                return out
            finally:
                await r.aclose()
        return asyncio.run(go())
    run.prefix = prefix
    run.card_prefix = card_prefix
    return run


def card_field(redis_sync, windows, card):
    raw = redis_sync.hget(windows.card_prefix + card, F.CARD_FIELD)
    return None if raw is None else orjson.loads(raw)


def test_card_velocity_counts_and_distincts(windows):
    seq = [ev("V", "P1", T0, district="310101"), ev("V", "P2", T0 + 600, district="310104"),
           ev("V", "P1", T0 + 1200, district="310101"), ev("V", "P3", T0 + 5 * 3600, district="310115"),
           ev("V", "P4", T0 + 3 * 86400, district="310115")]
    w = windows([seq])
    assert [x.n for x in w] == [(1, 1, 1), (2, 2, 2), (3, 3, 3), (1, 4, 4), (1, 1, 5)]
    assert [x.inst for x in w] == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 3, 3), (1, 1, 4)]
    assert [x.dist for x in w] == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 3, 3), (1, 1, 3)]
    assert all(x.new for x in w)


def test_windows_are_event_time_and_ignore_later_events(windows):
    # the later settlement arrives first: the earlier one, arriving after it, never counts it
    late, early, after = ev("E", "P2", T0 + 1800), ev("E", "P1", T0), ev("E", "P3", T0 + 3600)
    w = windows([[late, early], [after]])
    assert w[0].n == (1, 1, 1)
    assert w[1].n == (1, 1, 1)
    assert w[2].n == (3, 3, 3) and w[2].inst == (3, 3, 3)   # 1 h inclusive


def test_days_on_hand(windows):
    buy = dict(items=[{"code": "XB01ACA002", "category": "drug", "quantity": 2, "amount": 192.0, "days_supply": 56}])
    w = windows([[ev("S", "P1", T0, **buy), ev("S", "P2", T0 + 2 * 86400, **buy), ev("S", "P3", T0 + 3 * 86400)]])
    assert w[0].days_on_hand == 0.0
    assert w[1].days_on_hand == pytest.approx(54.0)                 # 56 days bought two days ago
    assert w[2].days_on_hand == pytest.approx(53.0 + 55.0)          # both purchases, partly used


def test_redelivery_is_idempotent(windows):
    a, b = ev("R", "P1", T0), ev("R", "P1", T0 + 60)
    w = windows([[a, b], [a, b, a]])
    assert [x.new for x in w] == [True, True, False, False, False]
    assert w[3].n == (2, 2, 2) and w[3].inst == (1, 1, 1) and w[3].inst_today == 2   # each counted once


def test_volume_baseline_uses_completed_days_per_partition(windows):
    D = 86400
    phys = dict(physician_id="D1", visit_type="outpatient", institution_type="hospital")
    day0 = [ev(f"c{i}", "H1", T0 + i * 60, **phys) for i in range(2)]
    day1 = [ev("c3", "H1", T0 + D, **phys)]
    day3 = [ev("c4", "H1", T0 + 3 * D, **phys)]
    other = [ev(f"x{i}", "H1", T0 + D + 100 + i, partition=1, **phys) for i in range(5)]
    w = windows([day0, other, day1, day3])
    assert (w[0].phys_today, w[0].phys_days) == (1, 0) and (w[1].phys_today, w[1].phys_days) == (2, 0)
    d1 = w[7]
    assert (d1.phys_today, d1.phys_base, d1.phys_days) == (1, 2.0, 1)     # partition 1 never counted here
    assert F.features(day1[0], d1)["phys_vol_ratio"] == round(2 / 3, 2)
    d3 = w[8]   # day 1 closed with 1, day 2 with 0: running mean 1.0 over 3 days
    assert (d3.phys_today, d3.phys_base, d3.phys_days) == (1, pytest.approx(1.0), 3)
    assert w[2].phys_today == 1 and w[6].phys_today == 5                   # partition 1's own count
    assert all(x.inst_today >= 1 for x in w)


def test_keys_expire(windows, redis_sync):
    e = ev("K", "P1", T0, physician_id="D9", visit_type="outpatient", institution_type="hospital")
    windows([[e]])
    keys = [k.decode() for k in redis_sync.scan_iter(match=windows.prefix + ":*")]
    assert sorted(k.split(":", 3)[3] for k in keys) == ["p0:inst:P1", "p0:phys:D9"]
    for k in keys:
        ttl = redis_sync.ttl(k)
        assert 0 < ttl <= F.VOLUME_TTL_S, k
    # the card's state is one field of its hash; the processor expires the hash (card_ttl_s), not the script
    assert redis_sync.hkeys(windows.card_prefix + "K") == [F.CARD_FIELD.encode()]
    assert card_field(redis_sync, windows, "K") == [T0, e.event_id, "P1", "310101", 28]


def test_card_field_is_compact_canonical_and_pruned(windows, redis_sync):
    D = 86400
    a, b, c = ev("Z", "P1", T0 + 60, event_id="Eb"), ev("Z", "P2", T0 + 60, event_id="Ea"), ev("Z", "P3", T0)
    windows([[a, b], [c]])                       # arrival order: not event-time order
    assert card_field(redis_sync, windows, "Z") == [T0, c.event_id, "P3", "310101", 28,
                                                    T0 + 60, "Ea", "P2", "310101", 28,
                                                    T0 + 60, "Eb", "P1", "310101", 28]
    week = ev("Z", "P4", T0 + 7 * D + 30)
    assert windows([[week]])[0].n == (1, 1, 3)          # the two at T0 + 60 are just within 7 days
    assert card_field(redis_sync, windows, "Z")[1::5] == [c.event_id, "Ea", "Eb", week.event_id]  # kept: lateness
    late = ev("Z", "P5", T0 + 7 * D + 3600 + 30)         # more than 7 d + lateness after the first: it goes
    assert windows([[late]])[0].n == (2, 2, 2)                # "week" 3570 s before; T0 + 60 over 7 d
    assert card_field(redis_sync, windows, "Z")[1::5] == ["Ea", "Eb", week.event_id, late.event_id]


def test_same_state_whatever_the_arrival_order_or_batching(windows, stack, redis_sync):
    D = 86400
    phys = dict(physician_id="D1", visit_type="outpatient", institution_type="hospital")
    seq = [ev("O", f"H{i % 3}", T0 + i * 0.37 * D, district=f"3101{i % 2:02d}", **phys) for i in range(24)]
    w1 = windows([seq])
    state1 = card_field(redis_sync, windows, "O"), redis_sync.get(windows.prefix + ":p0:phys:D1")
    prefix, card_prefix = windows.prefix, windows.card_prefix
    for k in list(redis_sync.scan_iter(match=prefix + ":*")) + [card_prefix + "O"]:
        redis_sync.delete(k)
    w2 = windows([[e] for e in seq] + [seq[-5:]])  # one at a time, then a redelivery
    assert w2[:24] == w1
    assert [x.new for x in w2[24:]] == [False] * 5
    assert (card_field(redis_sync, windows, "O"), redis_sync.get(prefix + ":p0:phys:D1")) == state1


def test_stale_or_unreadable_card_state_is_tolerated(windows, redis_sync):
    D = 86400
    redis_sync.hset(windows.card_prefix + "S", F.CARD_FIELD, orjson.dumps([T0 - 30 * D, "OLD", "P9", "310101", 90]))
    redis_sync.hset(windows.card_prefix + "X", F.CARD_FIELD, b"not json")
    s, x = ev("S", "P1", T0), ev("X", "P1", T0)
    w = windows([[s, x]])
    assert w[0].n == (1, 1, 1) and w[0].days_on_hand == 0.0 and w[1].n == (1, 1, 1)
    assert card_field(redis_sync, windows, "S")[1::5] == [s.event_id]     # the stale entry is pruned
    assert card_field(redis_sync, windows, "X")[1::5] == [x.event_id]


def test_placeholder_physician_is_no_physician(windows, redis_sync):
    w = windows([[ev("PH", "P1", T0, physician_id="未知", visit_type="outpatient", institution_type="hospital")]])
    assert w[0].phys_today == -1
    assert not list(redis_sync.scan_iter(match=windows.prefix + ":p0:phys:*"))


def test_tabs_in_ids_do_not_break_the_member(windows):
    w = windows([[ev("TAB", "P\t1", T0, district="31\t0101"), ev("TAB", "P\t1", T0 + 60, district="31\t0101")]])
    assert w[1].inst == (1, 1, 1) and w[1].dist == (1, 1, 1)
