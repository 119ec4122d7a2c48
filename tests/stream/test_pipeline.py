"""The batch processor on the real Redis: exemptions, data-quality guard, late events."""

from __future__ import annotations

import uuid

from alerts.exemptions import ExemptionRegistry
from detectors.config import load_rules_text
from tests.helpers import T0, dumps, make_event

RULES = load_rules_text("lateness_s: 3600\nrules:\n  card_hopping:\n"
                        "    windows: [{window_s: 86400, min_institutions: 12}]\n")


def hop(card, n=13, start=T0):
    return [dumps(make_event(card, f"P{k:03d}", start + k * 1200)) for k in range(n)]


def _run(stack, batches, run_id, exemptions=None):
    import asyncio

    import redis.asyncio as aioredis

    from stream.pipeline import Message, Processor

    async def go():
        r = aioredis.from_url(stack.redis_url)
        try:
            proc = Processor(RULES, r, future_tolerance_s=1e9)
            if exemptions is not None:
                proc.exemptions = exemptions
            out = []
            for b in batches:
                out.append(await proc.process([Message(v, {"cw-run-id": run_id.encode()}, "t", 0, i)
                                               for i, v in enumerate(b)]))
            return out
        finally:
            await r.aclose()
    return asyncio.run(go())


def test_exempt_card_alert_is_recorded_as_suppressed_not_dropped(stack):
    reg = ExemptionRegistry.from_entries([{
        "subject_id": "EXEMPT", "rules": ["card_hopping"], "kind": "chronic_approval", "author": "王审核",
        "reason": "慢特病备案 2026-031", "valid_from": "2026-01-01", "expires": "2027-01-01"}])
    [res] = _run(stack, [hop("EXEMPT") + hop("OTHER")], "x" + uuid.uuid4().hex[:8], reg)
    by = {a.subject_id: a for a in res.alerts}
    assert by["EXEMPT"].suppressed is True
    assert by["EXEMPT"].metrics["exemption"]["author"] == "王审核"
    assert by["OTHER"].suppressed is False
    assert [a.subject_id for a in res.published_alerts] == ["OTHER"]


def test_expired_exemption_does_not_silence(stack):
    reg = ExemptionRegistry.from_entries([{
        "subject_id": "OLD", "rules": ["*"], "kind": "other", "author": "a", "reason": "r",
        "valid_from": "2025-01-01", "expires": "2026-01-01"}])
    [res] = _run(stack, [hop("OLD")], "x" + uuid.uuid4().hex[:8], reg)
    assert [a.suppressed for a in res.alerts] == [False]


def test_placeholder_ids_are_data_quality_findings_not_subjects(stack):
    evs = [dumps(make_event("0000", f"P{k:03d}", T0 + k * 600, physician_id="未知")) for k in range(15)]
    evs += [dumps(make_event("REAL", "P001", T0, physician_id="0000"))]
    [res] = _run(stack, [evs], "x" + uuid.uuid4().hex[:8])
    assert res.alerts == []  # 15 institutions on card "0000" are never blamed on a card
    counts = {fld: sum(c.values()) for (_, fld), c in res.data_quality.items()}
    assert counts == {"card_id": 15, "physician_id": 16}


def test_events_later_than_lateness_are_counted(stack):
    rid = "x" + uuid.uuid4().hex[:8]
    new = dumps(make_event("LATE", "P1", T0 + 10 * 3600))
    old_ok = dumps(make_event("LATE2", "P1", T0 + 10 * 3600 - 1800))
    old_late = dumps(make_event("LATE3", "P1", T0))
    [res] = _run(stack, [[new, old_ok, old_late]], rid)
    assert res.late == {rid: 1}
    assert res.processed == {rid: 3}  # counted and still processed, never silently dropped


def test_send_pipeline_writes_before_returning_and_replies_like_execute(stack, redis_sync):
    """``send_pipeline`` returns once the commands are written (Redis runs them while the caller does other
    work); its replies are ``pipe.execute()``'s, and an error is raised only after every reply was read."""
    import asyncio
    import time

    import redis.asyncio as aioredis
    from redis.exceptions import NoScriptError

    from stream.pipeline import send_pipeline

    key = "cw:test:send:" + uuid.uuid4().hex[:8]

    def queue(r, *, bad=False):
        p = r.pipeline(transaction=False)
        p.set(key, "1")
        p.incr(key)
        p.hgetall(key + ":h")
        if bad:
            p.evalsha("0" * 40, 0)
        p.get(key)
        return p

    async def go():
        r = aioredis.from_url(stack.redis_url)
        sync = redis_sync
        try:
            expected = await queue(r).execute()
            await r.delete(key)
            task = await send_pipeline(queue(r))
            # the event loop is blocked from here on: Redis must already have the commands
            deadline = time.monotonic() + 2
            while sync.get(key) != b"2" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sync.get(key) == b"2"
            assert await task == expected == [True, 2, {}, b"2"]
            pipe = queue(r, bad=True)
            task = await send_pipeline(pipe)
            try:
                await task
                raise AssertionError("the missing script's error must be raised")
            except NoScriptError as exc:
                assert "Command # 4" in str(exc)
            assert await r.get(key) == b"2"  # the connection stays in sync after the error
            assert len(pipe.command_stack) == 5  # kept, so a failed send can be sent again
        finally:
            await r.delete(key)
            await r.aclose()
    asyncio.run(go())


def test_card_hash_expires_at_the_largest_card_ttl_of_its_rules(stack, redis_sync):
    run_id = "ttl" + uuid.uuid4().hex[:8]
    _run(stack, [hop("TTLC", 3)], run_id)
    ttl = redis_sync.ttl(f"cw:{run_id}:c:TTLC")
    want = RULES.detectors[0].card_ttl_s  # card_hopping: largest window + lateness
    assert want == 86400 + 3600 and want - 5 <= ttl <= want


def _keys_by_group(url: str, run_id: str) -> dict[str, int]:
    import redis

    r = redis.Redis.from_url(url)
    try:
        out: dict[str, int] = {}
        for k in r.scan_iter(match=f"cw:{run_id}:*", count=1000):
            g = k.decode().split(":")[2]
            out[g] = out.get(g, 0) + 1
        return out
    finally:
        r.close()


def test_aux_redis_holds_its_rules_state_and_the_alerts_are_those_of_one_redis(stack, aux_redis):
    """With an aux Redis (CLAIMWATCH_REDIS_AUX_URL), the rules named for it keep all their state there and none on
    the main Redis, the others none there, and the alerts are exactly those of a run on one Redis."""
    from detectors.config import load_rules
    from replay import city
    from replay.quality import run_inprocess
    from tests.conftest import ROOT

    events, _ = city.generate(cards=3000, days=7, seed=1)   # injects fraud for every built-in rule
    lines = [dumps(e) for e in events]
    aux_rules = frozenset({"prescriber_volume", "trace_code_reuse", "card_ring"})
    one_run, two_run = "one" + uuid.uuid4().hex[:8], "two" + uuid.uuid4().hex[:8]
    one = run_inprocess(lines, load_rules(ROOT / "configs" / "rules.yaml"), stack.redis_url, one_run, batch=400)
    two = run_inprocess(lines, load_rules(ROOT / "configs" / "rules.yaml"), stack.redis_url, two_run, batch=400,
                        aux_url=aux_redis, aux_rules=aux_rules)

    def key(a):
        return (a["rule"], a["subject_id"], a["window_start"], a["window_end"], a["score"], a["severity"],
                tuple(sorted(a["evidence_event_ids"])))
    assert sorted(map(key, two)) == sorted(map(key, one))
    assert aux_rules <= {a["rule"] for a in two}   # every aux rule fired: the comparison covers them
    on_main, on_aux = _keys_by_group(stack.redis_url, two_run), _keys_by_group(aux_redis, two_run)
    assert set(on_aux) == aux_rules, on_aux                     # all three kept state there, nothing else did
    assert not set(on_main) & aux_rules and {"c", "h"} <= set(on_main), on_main
    assert set(_keys_by_group(stack.redis_url, one_run)) == set(on_main) | set(on_aux)  # the same state, split


def test_a_card_rule_on_the_aux_redis_keeps_and_expires_its_card_hash_there(stack, aux_redis):
    """A card rule moved to the aux Redis: its card hash lives (and expires) there, it fires as on one Redis, and
    a script cache emptied on the aux Redis (a restart) is reloaded without losing the batch."""
    import asyncio

    import redis
    import redis.asyncio as aioredis

    from stream.pipeline import Message, Processor

    run_id = "auxc" + uuid.uuid4().hex[:8]

    async def go():
        r, aux = aioredis.from_url(stack.redis_url), aioredis.from_url(aux_redis)
        try:
            proc = Processor(RULES, r, future_tolerance_s=1e9, aux=aux, aux_rules=frozenset({"card_hopping"}))
            lines = hop("AUXC")
            first = await proc.process([Message(v, {"cw-run-id": run_id.encode()}, "t", 0, i)
                                        for i, v in enumerate(lines[:6])])
            await aux.script_flush()
            second = await proc.process([Message(v, {"cw-run-id": run_id.encode()}, "t", 0, 6 + i)
                                         for i, v in enumerate(lines[6:])])
            return first, second
        finally:
            await r.aclose()
            await aux.aclose()
    first, second = asyncio.run(go())
    assert not first.alerts
    assert [(a.rule, a.subject_id, len(a.evidence_event_ids)) for a in second.alerts] == [("card_hopping", "AUXC", 13)]
    main, aux = redis.Redis.from_url(stack.redis_url), redis.Redis.from_url(aux_redis)
    try:
        assert not main.exists(f"cw:{run_id}:c:AUXC")
        want = RULES.detectors[0].card_ttl_s
        assert want - 5 <= aux.ttl(f"cw:{run_id}:c:AUXC") <= want
    finally:
        main.close()
        aux.close()


def test_an_unreachable_aux_redis_fails_the_batch_for_a_retry_and_the_main_round_trip_still_ends(stack):
    """The aux Redis down: the batch raises a connection error (the worker keeps it and retries, offsets not
    committed); the main Redis's round trip, already written, is still read to its end (no connection left
    mid-reply)."""
    import asyncio

    import pytest
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from stream.embedded import free_port
    from stream.pipeline import Message, Processor, send_pipelines

    key = "cw:test:aux-down:" + uuid.uuid4().hex[:8]
    run_id = "auxd" + uuid.uuid4().hex[:8]

    async def go():
        r = aioredis.from_url(stack.redis_url)
        dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
        try:
            main_pipe, dead_pipe = r.pipeline(transaction=False), dead.pipeline(transaction=False)
            main_pipe.set(key, "1", ex=60)
            dead_pipe.ping()
            with pytest.raises(RedisConnectionError):
                await send_pipelines([main_pipe, dead_pipe])
            for _ in range(100):   # the main round trip was written and is read to its end
                if await r.get(key) == b"1":
                    break
                await asyncio.sleep(0.01)
            assert await r.get(key) == b"1"
            proc = Processor(RULES, r, future_tolerance_s=1e9, aux=dead, aux_rules=frozenset({"card_hopping"}))
            with pytest.raises(RedisConnectionError):
                await proc.process([Message(v, {"cw-run-id": run_id.encode()}, "t", 0, i)
                                    for i, v in enumerate(hop("AUXD", 3))])
            assert await r.ping()   # the main connection pool is still usable
        finally:
            await r.delete(key)
            await r.aclose()
            await dead.aclose()
    asyncio.run(go())
