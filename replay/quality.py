"""Detection quality against the generator's labels: recall per injected pattern, look-alikes
alerted, subject precision, alert rate.

``evaluate`` is pure; ``run_inprocess`` drives the real :class:`stream.pipeline.Processor` on a
real Redis without the broker (fast iteration on rules); ``claimwatch bench quality`` goes
through the whole pipeline (broker, worker processes, store).

>>> labels = {"n_events": 1000, "frauds": [{"fraud_id": "F1", "rule": "card_hopping", "subject_type": "card",
...           "subject_id": "C1", "member_ids": []}], "lookalikes": [{"kind": "dialysis", "subject_id": "C9"}]}
>>> alerts = [{"rule": "card_hopping", "subject_type": "card", "subject_id": "C1", "member_ids": None},
...           {"rule": "visit_frequency", "subject_type": "card", "subject_id": "C9"}]
>>> r = evaluate(alerts, labels)
>>> r["patterns"]["card_hopping"]["recall"], r["lookalikes"]["dialysis"]["alerted_share"], r["precision"]
(1.0, 1.0, 0.5)
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Iterable, Sequence


def _members(x: dict) -> set[str]:
    return set(x.get("member_ids") or [])


def _caught(fraud: dict, alerts_by_rule: dict[str, list[dict]]) -> bool:
    rule = fraud["rule"]
    for a in alerts_by_rule.get(rule, []):
        if fraud["subject_type"] == "ring":
            m = _members(fraud)
            if a.get("subject_type") == "ring" and m and len(m & _members(a)) >= max(2, len(m) // 2):
                return True
        elif a.get("subject_id") == fraud["subject_id"]:
            return True
        elif fraud["subject_type"] == "card" and fraud["subject_id"] in _members(a):
            return True
    return False


def evaluate(alerts: Iterable[dict], labels: dict) -> dict[str, Any]:
    """Score alerts (dicts as exported) against labels (as written by ``claimwatch generate``)."""
    alerts = [a for a in alerts if not a.get("suppressed")]
    by_rule: dict[str, list[dict]] = defaultdict(list)
    for a in alerts:
        by_rule[a["rule"]].append(a)
    patterns: dict[str, dict[str, Any]] = {}
    frauds_by_rule: dict[str, list[dict]] = defaultdict(list)
    for f in labels.get("frauds", []):
        frauds_by_rule[f["rule"]].append(f)
    for rule, fs in sorted(frauds_by_rule.items()):
        caught = [f["fraud_id"] for f in fs if _caught(f, by_rule)]
        patterns[rule] = {"injected": len(fs), "caught": len(caught), "recall": len(caught) / len(fs),
                          "missed": [f["fraud_id"] for f in fs if f["fraud_id"] not in caught]}
    true_ids: set[str] = set()
    ring_members: list[set[str]] = []
    for f in labels.get("frauds", []):
        true_ids.add(f["subject_id"])
        true_ids.update(_members(f))
        if f["subject_type"] == "ring":
            ring_members.append(_members(f))
    subjects: dict[tuple[str, str], dict] = {}
    for a in alerts:
        subjects[(a["subject_type"], a["subject_id"])] = a
    good = 0
    false_subjects = []
    for (st, sid), a in subjects.items():
        ok = sid in true_ids
        if st == "ring":
            m = _members(a)
            ok = any(len(m & rm) >= max(2, len(m) // 2) for rm in ring_members) or (bool(m) and m <= true_ids)
        good += ok
        if not ok:
            false_subjects.append(f"{a['rule']}:{st}:{sid}")
    kinds: dict[str, list[str]] = defaultdict(list)
    for la in labels.get("lookalikes", []):
        kinds[la["kind"]].append(la["subject_id"])
    alerted_ids = {sid for (_, sid) in subjects} | {m for a in alerts for m in _members(a)}
    lookalikes = {k: {"n": len(v), "alerted": sum(1 for s in v if s in alerted_ids),
                      "alerted_share": sum(1 for s in v if s in alerted_ids) / len(v)} for k, v in sorted(kinds.items())}
    n_events = labels.get("n_events") or 0
    return {
        "patterns": patterns,
        "lookalikes": lookalikes,
        "subjects_alerted": len(subjects),
        "precision": good / len(subjects) if subjects else 1.0,
        "false_subjects": sorted(false_subjects)[:50],
        "alerts": len(alerts),
        "alerts_per_1000_events": 1000 * len(alerts) / n_events if n_events else 0.0,
        "alerts_by_rule": {r: len(v) for r, v in sorted(by_rule.items())},
    }


def run_inprocess(lines: Sequence[bytes], rules, redis_url: str, run_id: str, batch: int = 2000,
                  partitions: int = 4, aux_url: str | None = None,
                  aux_rules: frozenset[str] = frozenset()) -> list[dict]:
    """Run settlements through the real Processor on a real Redis, in partition-like order; return alert dicts.

    Events are split by card into ``partitions`` streams (as the broker would) and batches are
    interleaved, so cross-card rules see the same kind of order they see live. ``aux_url``: the
    state of ``aux_rules`` on that second Redis (``CLAIMWATCH_REDIS_AUX_URL``).
    """
    import msgspec
    import orjson
    import redis.asyncio as aioredis

    from stream.pipeline import Message, Processor

    parts: list[list[bytes]] = [[] for _ in range(partitions)]
    for ln in lines:
        if ln.strip():
            card = orjson.loads(ln).get("card_id", "")
            parts[hash(card) % partitions].append(ln)

    async def go() -> list[dict]:
        r = aioredis.from_url(redis_url)
        aux = aioredis.from_url(aux_url) if aux_url else None
        proc = Processor(rules, r, future_tolerance_s=50 * 365 * 86400, aux=aux, aux_rules=aux_rules)
        out: dict[str, dict] = {}
        try:
            pos = [0] * partitions
            while any(pos[p] < len(parts[p]) for p in range(partitions)):
                msgs = []
                for p in range(partitions):
                    chunk = parts[p][pos[p]:pos[p] + batch // partitions]
                    pos[p] += len(chunk)
                    msgs += [Message(v, {"cw-run-id": run_id.encode()}, "replay", p, 0) for v in chunk]
                res = await proc.process(msgs)
                for a in res.alerts:
                    d = msgspec.to_builtins(a)
                    if a.alert_id in out:  # merge evidence as the store does
                        d["evidence_event_ids"] = list(dict.fromkeys(out[a.alert_id]["evidence_event_ids"]
                                                                     + d["evidence_event_ids"]))
                    out[a.alert_id] = d
        finally:
            await r.aclose()
            if aux is not None:
                await aux.aclose()
        return list(out.values())

    return asyncio.run(go())
