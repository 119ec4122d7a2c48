"""How good are the online models? ROC / PR AUC of ``ml_outlier`` and the ranking gain from verdicts.

:func:`evaluate_ml` generates a city, runs it in-process through the real
:class:`~stream.pipeline.Processor` on a real Redis (events split into partition streams
by the broker's own partitioner, murmur2 of the card id, so each partition's model sees
what it would see behind Kafka) with every configured rule and ``ml_outlier`` on, and
reports:

* ``roc_auc`` / ``pr_auc`` — the per-settlement unsupervised score (collected through the
  detector's ``score_sink``) against the generator's per-event labels (``fraud_event_ids``:
  does the settlement belong to an injected fraud); PR AUC is average precision, to be read
  against ``fraud_share``;
* the alert rate and precision of ``ml_outlier`` at its configured ``target_alert_rate``;
* ``python_us_per_event`` / ``python_cpu_us_per_event`` — the detector's own Python time,
  wall and CPU (features + score + learn), per settlement, and ``redis_cpu_us_per_event``
  — the CPU its feature script costs Redis;
* ``ranking`` — a second run with ``ml_outlier`` at ``ranking_alert_rate`` after
  ``ranking_warmup_events`` (a city of a week is small: this gives enough alerts to rank):
  the alerts of every rule are split in two halves (by a hash of rule, subject, window); inspectors' verdicts (the
  labels: an alert is fraud when one of its evidence settlements is, or its subject is an
  injected fraud's) are fed for one half to a fresh :class:`~alerts.verdicts.PriorityModel`,
  and the precision of the top ``top_k`` alerts of the other half is compared before (no
  verdicts: priority 0.5 for all, i.e. first come first served) and after;
  ``held_out_fraud_share`` is what a random order would give.

>>> roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
0.75
>>> average_precision([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
0.8333
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson
import yaml


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Exact ROC AUC (Mann-Whitney, ties count half)."""
    pairs = sorted(zip(scores, labels), key=lambda p: p[0])
    n1 = sum(1 for _, y in pairs if y)
    n0 = len(pairs) - n1
    if not n1 or not n0:
        return float("nan")
    rank_sum = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        r = (i + 1 + j) / 2
        rank_sum += r * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return round((rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0), 4)


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """PR AUC as average precision (ties broken pessimistically: negatives first)."""
    pairs = sorted(zip(scores, labels), key=lambda p: (-p[0], p[1]))
    n1 = sum(1 for _, y in pairs if y)
    if not n1:
        return float("nan")
    tp = 0
    ap = 0.0
    for i, (_, y) in enumerate(pairs, 1):
        if y:
            tp += 1
            ap += tp / i
    return round(ap / n1, 4)


def partition_of(card_id: str, partitions: int) -> int:
    """The partition the broker's default partitioner (murmur2 of the key) gives a card."""
    from aiokafka.partitioner import murmur2

    return (murmur2(card_id.encode()) & 0x7FFFFFFF) % partitions


def split_partitions(lines: Sequence[bytes], partitions: int) -> list[list[bytes]]:
    parts: list[list[bytes]] = [[] for _ in range(partitions)]
    for ln in lines:
        if ln.strip():
            parts[partition_of(orjson.loads(ln).get("card_id", ""), partitions)].append(ln)
    return parts


def replay_inprocess(parts: Sequence[Sequence[bytes]], rules: Any, redis_url: str, run_id: str, *,
                     batch: int = 2000, shuffle_seed: int | None = None,
                     after_batch: Callable[[Any], None] | None = None) -> list[dict]:
    """Run partition streams through the real Processor; return the alerts merged as the store merges them.

    Each batch takes up to ``batch // len(parts)`` events from every partition, or, with
    ``shuffle_seed``, a seeded random share from each (partitions then run ahead of one
    another: another interleaving of the same streams).
    """
    import msgspec
    import redis.asyncio as aioredis

    from stream.pipeline import Message, Processor

    rng = random.Random(shuffle_seed)
    n = len(parts)

    async def go() -> list[dict]:
        r = aioredis.from_url(redis_url)
        proc = Processor(rules, r, future_tolerance_s=50 * 365 * 86400)
        out: dict[str, dict] = {}
        try:
            pos = [0] * n
            while any(pos[p] < len(parts[p]) for p in range(n)):
                msgs = []
                for p in range(n):
                    k = batch // n if shuffle_seed is None else rng.randint(0, max(1, 2 * batch // n))
                    chunk = parts[p][pos[p]:pos[p] + k]
                    msgs += [Message(v, {"cw-run-id": run_id.encode()}, "settlements-replay", p, pos[p] + i)
                             for i, v in enumerate(chunk)]
                    pos[p] += len(chunk)
                res = await proc.process(msgs)
                if after_batch is not None:
                    after_batch(res)
                for a in res.alerts:
                    d = msgspec.to_builtins(a)
                    prev = out.get(a.alert_id)
                    if prev is not None:  # as AlertStore.upsert merges
                        d["evidence_event_ids"] = list(dict.fromkeys(prev["evidence_event_ids"]
                                                                     + d["evidence_event_ids"]))
                        d["window_start"] = min(prev["window_start"], d["window_start"])
                        d["window_end"] = max(prev["window_end"], d["window_end"])
                        d["detected_at"] = prev["detected_at"]
                    out[a.alert_id] = d
        finally:
            await r.aclose()
        return list(out.values())

    return asyncio.run(go())


def rules_with_ml(rules_path: Path | str | None = None, **ml_params: Any):
    """The configured rules with ``ml_outlier`` enabled (``ml_params`` override its settings)."""
    from claimwatch.settings import DEFAULT_RULES
    from detectors.config import load_rules_text

    path = Path(rules_path or DEFAULT_RULES)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    block = dict(doc["rules"].get("ml_outlier") or {})
    block.update(ml_params, enabled=True)
    doc["rules"]["ml_outlier"] = block
    return load_rules_text(yaml.safe_dump(doc, allow_unicode=True), source=str(path))


def _ml(rules) -> Any:
    return next(d for d in rules.detectors if d.rule == "ml_outlier")


def alert_is_fraud(a: dict, fraud_events: set[str], fraud_subjects: set[str]) -> bool:
    return bool(fraud_events.intersection(a.get("evidence_event_ids") or ())) or a.get("subject_id") in fraud_subjects


def _half(a: dict) -> int:
    """0 or 1 from what the alert is about (never its id, which names the run)."""
    key = "\x1f".join(str(a.get(k, "")) for k in ("rule", "subject_type", "subject_id", "window_start"))
    return hashlib.sha256(key.encode()).digest()[0] & 1


def ranking_gain(alerts: Sequence[dict], truth: Callable[[dict], bool], top_k: int = 50) -> dict[str, Any]:
    """Precision of the top ``top_k`` held-out alerts before / after learning the other half's verdicts."""
    from alerts.verdicts import PriorityModel

    def order(a: dict) -> tuple:
        return a["window_end"], a["rule"], a["subject_id"], a["window_start"]

    train = sorted((a for a in alerts if _half(a) == 0), key=order)
    test = sorted((a for a in alerts if _half(a) == 1), key=order)
    k = min(top_k, len(test))
    pm = PriorityModel()

    def precision(model: PriorityModel) -> float:
        top = model.rank(test)[:k]
        return round(sum(truth(a) for a in top) / k, 4) if k else float("nan")

    before = precision(pm)
    for a in train:
        pm.learn(a, truth(a))
    after = precision(pm)
    by_rule: dict[str, int] = {}
    for a in alerts:
        by_rule[a["rule"]] = by_rule.get(a["rule"], 0) + 1
    return {"alerts": len(alerts), "alerts_by_rule": dict(sorted(by_rule.items())), "verdicts_fed": len(train),
            "held_out": len(test), "k": k,
            "held_out_fraud_share": round(sum(truth(a) for a in test) / len(test), 4) if test else float("nan"),
            "precision_at_k_before": before, "precision_at_k_after": after}


def _redis_cost(lines: Sequence[bytes], redis_url: str, lateness_s: int, batch: int = 2000) -> float:
    """CPU µs per settlement Redis spends on the feature script (its main-thread CPU time while the
    script runs alone over the events under scratch keys, deleted after; robust to a busy machine)."""
    import redis as sync_redis

    from detectors import _features as F
    from stream.events import parse_event

    evs = []
    for ln in lines:
        ev = parse_event(ln, future_tolerance_s=50 * 365 * 86400)
        ev.partition = 0
        evs.append(ev)
    r = sync_redis.Redis.from_url(redis_url)
    prefix = f"cw:mlcost{uuid.uuid4().hex[:8]}:ml_outlier"

    def cpu() -> float:
        i = r.info("cpu")
        return float(i.get("used_cpu_user_main_thread", i["used_cpu_user"])) + \
            float(i.get("used_cpu_sys_main_thread", i["used_cpu_sys"]))

    try:
        sha = r.script_load(F.LUA)
        c0 = cpu()
        for i in range(0, len(evs), batch):
            pipe = r.pipeline(transaction=False)
            F.queue_windows(pipe, sha, evs[i:i + batch], prefix, lateness_s=lateness_s)
            pipe.execute()
        return round((cpu() - c0) / max(1, len(evs)) * 1e6, 2)
    finally:
        keys = list(r.scan_iter(match=prefix + ":*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])
        r.close()


def evaluate_ml(cards: int, days: int, seed: int, redis_url: str, *, rules_path: Path | str | None = None,
                partitions: int = 4, batch: int = 2000, ranking_alert_rate: float = 0.05,
                ranking_warmup_events: int = 100, top_k: int = 50) -> dict[str, Any]:
    """See the module docstring; returns a JSON-ready dict (``claimwatch bench quality`` prints it)."""
    from replay import city

    t0 = time.perf_counter()
    events, labels = city.generate(cards=cards, days=days, seed=seed)
    lines = [orjson.dumps(e) for e in events]
    del events
    fraud_events = set(labels["fraud_event_ids"])
    fraud_subjects = {f["subject_id"] for f in labels["frauds"]} | {m for f in labels["frauds"]
                                                                     for m in f.get("member_ids") or ()}
    parts = split_partitions(lines, partitions)

    # 1. the configured model: per-event scores, alert rate, cost
    rules = rules_with_ml(rules_path)
    det = _ml(rules)
    scores: dict[str, float] = {}
    det.score_sink = lambda ev, s, x: scores.__setitem__(ev.event_id, s)
    run = f"mleval-{seed}-{uuid.uuid4().hex[:8]}"
    alerts = replay_inprocess(parts, rules, redis_url, run, batch=batch)
    ids = list(scores)
    y = [i in fraud_events for i in ids]
    s = [scores[i] for i in ids]
    ml_alerts = [a for a in alerts if a["rule"] == "ml_outlier"]
    flagged = sum(m.flagged for (r, _), m in det._models.items() if r == run)
    report: dict[str, Any] = {
        "cards": cards, "days": days, "seed": seed, "events": labels["n_events"], "scored": len(ids),
        "fraud_share": round(sum(y) / len(y), 4) if y else 0.0,
        "roc_auc": roc_auc(s, y), "pr_auc": average_precision(s, y),
        "target_alert_rate": det.target_alert_rate,
        "ml_flagged_settlements": flagged,
        "ml_alerts": len(ml_alerts),
        "ml_alerts_per_1000_events": round(1000 * len(ml_alerts) / max(1, len(ids)), 3),
        "ml_alert_precision": (round(sum(alert_is_fraud(a, fraud_events, fraud_subjects) for a in ml_alerts)
                                     / len(ml_alerts), 4) if ml_alerts else None),
        "python_us_per_event": round(det.cost["python_s"] / max(1, det.cost["events"]) * 1e6, 2),
        "python_cpu_us_per_event": round(det.cost["python_cpu_s"] / max(1, det.cost["events"]) * 1e6, 2),
        "redis_cpu_us_per_event": _redis_cost(lines, redis_url, det.lateness_s, batch),
    }

    # 2. verdicts: rank a bigger pool of alerts
    rules2 = rules_with_ml(rules_path, target_alert_rate=ranking_alert_rate, warmup_events=ranking_warmup_events)
    alerts2 = replay_inprocess(parts, rules2, redis_url, f"mlrank-{seed}-{uuid.uuid4().hex[:8]}", batch=batch)
    alerts2 = [a for a in alerts2 if not a.get("suppressed")]
    rk = ranking_gain(alerts2, lambda a: alert_is_fraud(a, fraud_events, fraud_subjects), top_k)
    rk["ranking_alert_rate"] = ranking_alert_rate
    rk["ranking_warmup_events"] = ranking_warmup_events
    report["ranking"] = rk
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report
