"""ml_outlier on the real Redis: deterministic under any interleaving, checkpoint → restore, idempotent, expiring."""

from __future__ import annotations

import asyncio
import pickle
import uuid

import orjson
import pytest

from detectors import _features as F
from detectors.config import ConfigError, load_rules_text
from detectors.ml_outlier import (MlOutlier, PartitionModel, TailHBOS, dump_model, load_model, model_key,
                                  save_snapshot)
from replay import city
from replay.ml_eval import replay_inprocess, split_partitions

ML = dict(target_alert_rate=0.02, warmup_events=30)   # a small city needs a higher rate to show alerts


@pytest.fixture(scope="module")
def parts():
    events, _ = city.generate(cards=6000, days=4, seed=11)
    return split_partitions([orjson.dumps(e) for e in events], 4)


def rules(**over):
    """Only ml_outlier (the other rules are theirs to test), with the shipped resale-prone drug list."""
    import yaml

    from claimwatch.settings import DEFAULT_RULES

    shipped = yaml.safe_load(DEFAULT_RULES.read_text(encoding="utf-8"))
    doc = {"lateness_s": 3600, "resale_prone_drugs": shipped["resale_prone_drugs"],
           "rules": {"ml_outlier": {**ML, **over}}}
    return load_rules_text(yaml.safe_dump(doc, allow_unicode=True))


def det_run(det: MlOutlier) -> str:
    [run] = {r for r, _ in det._models}
    return run


def ml(rs) -> MlOutlier:
    return next(d for d in rs.detectors if d.rule == "ml_outlier")


def run_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def scored(rs) -> dict[str, float]:
    out: dict[str, float] = {}
    ml(rs).score_sink = lambda ev, s, x: out.__setitem__(ev.event_id, s)
    return out


def comparable(alerts):
    return sorted((a["subject_id"], tuple(a["evidence_event_ids"]), a["score"], a["severity"], a["summary"],
                   a["summary_en"], a["window_start"], a["window_end"]) for a in alerts if a["rule"] == "ml_outlier")


def test_same_replay_any_interleaving_same_scores_and_alerts(parts, stack):
    results = []
    for kw in ({"batch": 2000}, {"batch": 200, "shuffle_seed": 1}, {"batch": 40, "shuffle_seed": 2}):
        rs = rules()
        sc = scored(rs)
        alerts = replay_inprocess(parts, rs, stack.redis_url, run_id(), **kw)
        results.append((sc, comparable(alerts)))
    (s0, a0), (s1, a1), (s2, a2) = results
    assert len(s0) == sum(len(p) for p in parts)
    assert s0 == s1 == s2
    assert a0 and a0 == a1 == a2


@pytest.mark.parametrize("features", [None, list(F.FEATURES)])
def test_batched_scoring_is_bit_for_bit_the_one_at_a_time_model(parts, stack, features):
    """FeatureBins + PartitionModel.run against the river contract, a settlement at a time, on the
    features the reference function computes from the same windows."""
    rs = rules(forget_every=100, **({"features": features} if features else {}))   # halving within the replay
    seen: list[tuple[int, str, float, dict]] = []
    ml(rs).score_sink = lambda ev, s, x: seen.append((ev.partition, ev.event_id, s, x))
    replay_inprocess(parts, rs, stack.redis_url, run_id(), batch=300)
    det = ml(rs)
    ref = {p: PartitionModel(1.0 - det.target_alert_rate, det.bins_per_unit, 100) for p in range(4)}
    assert len(seen) == sum(len(p) for p in parts)
    for p, eid, score, x in seen:
        m = ref[p]
        hb = m.detector
        bins = hb.bins(x, det.features)
        s = hb.score_bins(bins)
        assert s == score, eid
        hit = m.seen >= det.warmup_events and s >= m.threshold()
        m.seen += 1
        if not hit:
            hb.learn_bins(bins)
        m.filter.quantile.update(s)
    assert sum(m.seen - m.learned for m in det._models.values()) > 0       # some were flagged
    for p in range(4):
        got, want = det.model(det_run(det), p).detector, ref[p].detector
        assert (got._counts, got._lo, got._n, got._learned) == (want._counts, want._lo, want._n, want._learned)
        assert 0 < got._n < got._learned                                     # halved


def test_checkpoint_then_restore_gives_identical_scores(parts, stack):
    import redis.asyncio as aioredis

    # uninterrupted
    rs_c = rules()
    sc_c = scored(rs_c)
    replay_inprocess(parts, rs_c, stack.redis_url, run_id(), batch=200)
    # first half, checkpoint, "restart" with a fresh detector, second half
    rid = run_id()
    first = [p[: len(p) // 2] for p in parts]
    second = [p[len(p) // 2:] for p in parts]
    rs_a = rules(checkpoint_every=50)
    replay_inprocess(first, rs_a, stack.redis_url, rid, batch=200)

    async def save():
        r = aioredis.from_url(stack.redis_url)
        try:
            return await ml(rs_a).save_checkpoints(r, rid)
        finally:
            await r.aclose()
    assert asyncio.run(save()) == 4
    rs_b = rules(checkpoint_every=50)
    sc_b = scored(rs_b)
    replay_inprocess(second, rs_b, stack.redis_url, rid, batch=200)
    assert set(sc_b) == {orjson.loads(ln)["event_id"] for p in second for ln in p}
    assert {k: sc_c[k] for k in sc_b} == sc_b
    for p in range(4):
        assert ml(rs_b).model(rid, p).seen == len(parts[p])


def test_crash_restores_the_last_periodic_checkpoint(parts, stack):
    rid = run_id()
    first = [p[:100] for p in parts]
    rs_a = rules(checkpoint_every=1)        # a checkpoint after every batch, written with the next one
    replay_inprocess(first, rs_a, stack.redis_url, rid, batch=100)
    rs_b = rules(checkpoint_every=1)        # no save on the way out: a crash
    replay_inprocess([p[100:101] for p in parts], rs_b, stack.redis_url, rid, batch=100)
    for p in range(4):
        m = ml(rs_b).model(rid, p)
        assert 75 <= m.seen - 1 < 100       # restored (not fresh), minus at most the last batch


def test_redelivered_events_are_scored_but_never_learned_twice(parts, stack):
    rid = run_id()
    rs = rules()
    few = [p[:60] for p in parts]
    replay_inprocess(few, rs, stack.redis_url, rid, batch=400)
    before = {p: (ml(rs).model(rid, p).seen, ml(rs).model(rid, p).learned) for p in range(4)}
    sc = scored(rs)
    replay_inprocess(few, rs, stack.redis_url, rid, batch=400)   # the same batch delivered again
    assert len(sc) == 240
    assert {p: (ml(rs).model(rid, p).seen, ml(rs).model(rid, p).learned) for p in range(4)} == before


def test_alerts_name_the_features_that_drove_the_score(parts, stack):
    alerts = [a for a in replay_inprocess(parts, rules(), stack.redis_url, run_id()) if a["rule"] == "ml_outlier"]
    assert alerts
    for a in alerts:
        assert a["subject_type"] == "card" and a["evidence_event_ids"]
        top = a["metrics"]["top_features"]
        assert len(top) == 3 and all(t["name"] in F.FEATURES for t in top)
        assert F.FEATURES[top[0]["name"]][0] in a["summary"] and F.FEATURES[top[0]["name"]][1] in a["summary_en"]
        assert a["score"] >= a["metrics"]["threshold"] and a["rule_version"]
        assert set(a["metrics"]["features"]) == set(F.FEATURES)
    rate = sum(len(a["evidence_event_ids"]) for a in alerts) / sum(len(p) for p in parts)
    assert rate < 3 * ML["target_alert_rate"]


def test_keys_expire(parts, stack, redis_sync):
    import redis.asyncio as aioredis

    rid = run_id()
    rs = rules(checkpoint_ttl_s=3600)
    replay_inprocess([p[:50] for p in parts], rs, stack.redis_url, rid, batch=400)

    async def save():
        r = aioredis.from_url(stack.redis_url)
        try:
            await ml(rs).save_checkpoints(r)
        finally:
            await r.aclose()
    asyncio.run(save())
    keys = [k.decode() for k in redis_sync.scan_iter(match=f"cw:{rid}:ml_outlier:*", count=1000)]
    assert any(":phys:" in k for k in keys) and any(":model:" in k for k in keys)
    assert not any(":card:" in k for k in keys)          # card state is a field of the per-card hash
    cards = [k.decode() for k in redis_sync.scan_iter(match=f"cw:{rid}:c:*", count=1000)]
    assert len(cards) >= 4 * 20 and all(redis_sync.hexists(k, F.CARD_FIELD) for k in cards)
    for k in keys + cards:
        assert redis_sync.ttl(k) > 0, k
    assert 0 < redis_sync.ttl(model_key(rid, 0)) <= 3600
    assert ml(rs).card_ttl_s == 7 * 86400 + 3600
    assert all(7 * 86400 + 3600 - 60 <= redis_sync.ttl(k) <= 7 * 86400 + 3600 for k in cards)


def test_a_new_run_starts_from_a_named_snapshot(parts, stack, redis_sync):
    import redis.asyncio as aioredis

    src = run_id()
    rs = rules()
    replay_inprocess([p[:80] for p in parts], rs, stack.redis_url, src, batch=400)
    name = "snap" + uuid.uuid4().hex[:6]

    async def snap():
        r = aioredis.from_url(stack.redis_url)
        try:
            await ml(rs).save_checkpoints(r, src)
            return await save_snapshot(r, src, name)
        finally:
            await r.aclose()
    assert asyncio.run(snap()) == 4
    assert redis_sync.ttl(f"cw:snapshots:ml_outlier:{name}:p0") == -1    # a snapshot is kept
    dst = run_id()
    rs2 = rules(snapshot=name)
    replay_inprocess([p[80:81] for p in parts], rs2, stack.redis_url, dst, batch=400)
    assert ml(rs2).model(dst, 0).seen == 81
    rs3, fresh = rules(), run_id()
    replay_inprocess([p[80:81] for p in parts], rs3, stack.redis_url, fresh, batch=400)
    assert ml(rs3).model(fresh, 0).seen == 1   # no snapshot: fresh


def test_checkpoint_of_another_configuration_or_class_is_refused():
    det = MlOutlier(features=["amount_cny", "card_inst_24h"])
    other = MlOutlier()
    m = other._fresh()
    m.seen = 99
    blob = dump_model(m, other.model_config)
    assert det._sync("r", 0, blob, None).seen == 0                   # other features: start fresh
    assert other._sync("r", 0, blob, None).seen == 99
    evil = b"cw-ml1 " + other.model_config.encode() + b" 5\n" + pickle.dumps(__import__("os").getcwd)
    with pytest.raises(pickle.UnpicklingError):
        load_model(evil)
    assert MlOutlier()._sync("r", 1, evil, None).seen == 0            # logged, fresh, never fatal


def test_a_newer_checkpoint_from_another_worker_is_adopted():
    det = MlOutlier()
    mine = det._sync("r", 0, None, None)
    mine.seen = 10
    newer = det._fresh()
    newer.seen = 500
    assert det._sync("r", 0, dump_model(newer, det.model_config), None).seen == 500
    older = det._fresh()
    older.seen = 3
    assert det._sync("r", 0, dump_model(older, det.model_config), None).seen == 500


def test_model_pickles_and_scores_identically():
    a = PartitionModel(0.999, 3.0, 1000)
    xs = [{"x": float(i % 7), "y": float(i % 3) * 10} for i in range(300)]
    for x in xs[:200]:
        a.detector.learn_one(x)
    b = load_model(dump_model(a, "cfg"))
    assert [a.detector.score_one(x) for x in xs[200:]] == [b.detector.score_one(x) for x in xs[200:]]


def test_higher_is_more_anomalous_and_forgetting_halves():
    m = TailHBOS(forget_every=100)
    for i in range(99):
        m.learn_one({"v": float(i % 5)})
    assert m.score_one({"v": 1.0}) < m.score_one({"v": 4.0}) < m.score_one({"v": 400.0})
    m.learn_one({"v": 0.0})
    assert m._n == 50.0


@pytest.mark.parametrize("block, message", [
    ("target_alert_rate: 0", "ml_outlier: target_alert_rate must be a number in (0, 0.5), got 0"),
    ("target_alert_rate: high", "ml_outlier: target_alert_rate must be a number in (0, 0.5), got 'high'"),
    ("warmup_events: -1", "ml_outlier: warmup_events must be a non-negative integer, got -1"),
    ("checkpoint_every: 0", "ml_outlier: checkpoint_every must be a positive integer, got 0"),
    ("checkpoint_ttl_s: 1.5", "ml_outlier: checkpoint_ttl_s must be a positive integer, got 1.5"),
    ("bins_per_unit: -2", "ml_outlier: bins_per_unit must be a positive number, got -2"),
    ("learn_every: true", "ml_outlier: learn_every must be a positive integer, got True"),
    ("top_features: 9", "ml_outlier: top_features must be an integer from 1 to 5, got 9"),
    ("snapshot: 'a:b'", "ml_outlier: snapshot must be a name (1-64 characters, no ':') or null, got 'a:b'"),
    ("features: [amount_cny, bogus]", "ml_outlier: features has unknown name(s) ['bogus']"),
    ("features: []", "ml_outlier: features must be a non-empty list of feature names, got []"),
    ("window_s: 60", "MlOutlier.__init__() got an unexpected keyword argument 'window_s'"),
])
def test_bad_parameters_are_refused_with_field_and_value(block, message):
    with pytest.raises(ConfigError) as exc:
        load_rules_text(f"rules:\n  ml_outlier:\n    {block}\n", source="x.yaml")
    assert str(exc.value).startswith(f"x.yaml: rules.ml_outlier: {message}")


def test_a_rules_reload_keeps_the_models_in_memory(parts, stack):
    rid = run_id()
    old = rules()
    replay_inprocess([p[:40] for p in parts], old, stack.redis_url, rid, batch=400)
    new = rules()
    assert ml(new).adopt_state(ml(old))
    assert ml(new).model(rid, 0) is ml(old).model(rid, 0)
    assert not ml(rules(features=["amount_cny"])).adopt_state(ml(old))   # another model: from checkpoints


def test_shipped_configuration_enables_it_within_budget():
    from claimwatch.settings import DEFAULT_RULES
    from detectors.config import load_rules

    det = ml(load_rules(DEFAULT_RULES))
    assert det.target_alert_rate <= 0.001 and det.warmup_events >= 1 / det.target_alert_rate
    assert det.resale.code_prefixes        # the configured drug list reaches the features


def test_models_evicted_from_memory_come_back_identical(parts, stack):
    full = rules()
    sc_full = scored(full)
    replay_inprocess(parts, full, stack.redis_url, run_id(), batch=200)
    tight = rules()
    ml(tight).max_models = 1          # every batch evicts three of the four partition models
    sc_tight = scored(tight)
    replay_inprocess(parts, tight, stack.redis_url, run_id(), batch=200)
    assert sc_tight == sc_full
    assert len(ml(tight)._models) == 1
