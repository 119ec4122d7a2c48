"""ONE conformance suite, run over every detector enabled in ``configs/rules.yaml`` (STYLE.md point 5).

As river's ``checks`` run one generic suite over every estimator, every test here is
parametrized by rule id (the test id names the rule), builds the detector from the real
configuration with :func:`detectors.config.load_rules` and drives it through the real
:class:`stream.pipeline.Processor` on the session's real Redis, alone (so a failure names
its detector). Base material: ``replay.city.generate(cards=3000, days=7, seed=1)``, which
injects fraud for every built-in rule, so the rules fire.

(a) redelivery: a batch delivered again, and every event twice within a batch, gives the
    same alert ids and the same alert content (``detected_at`` aside), and leaves the Redis
    state of the run exactly as it was (every key, type and full value);
(b) order within lateness: a hypothesis-chosen permutation whose inversions are all less
    than ``lateness_s`` apart in event time, cut into batches differently, gives the same
    merged alerts (rule, subject, evidence) as event-time order;
(c) every key a detector writes expires (TTL > 0);
(d) every numeric parameter of its YAML block set to -1 / 0 / "x" is refused with a
    ``ValueError`` whose message starts with ``"{rule}:"`` (0 may be accepted only by a
    parameter whose message says 0 is allowed);
(e) the module has a docstring with a passing doctest, and ``rule`` / ``subject_type`` are
    in the alert contract;
(f) hostile but schema-valid settlements (unicode and separator characters in ids, empty
    bills, 200 lines, extreme amounts and quantities, identical timestamps, odd stays ...)
    never make a detector raise, and what it emits is a valid alert.
"""

from __future__ import annotations

import asyncio
import copy
import doctest
import inspect
import itertools
import json
import random
import re
import sys
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import jsonschema
import msgspec
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from detectors import REGISTRY
from detectors.config import RuleSet, load_rules
from detectors.drugs import DrugList
from stream.events import MAX_AMOUNT_CNY, parse_event
from stream.pipeline import Message, Processor
from stream.topics import H_RUN_ID
from tests.conftest import CONTRACT, ROOT

RULES_PATH = ROOT / "configs" / "rules.yaml"
RULES_DOC = yaml.safe_load(RULES_PATH.read_text(encoding="utf-8"))
ENABLED: list[str] = [d.rule for d in load_rules(RULES_PATH).detectors]
ALERT_SCHEMA = json.loads((CONTRACT / "alert.schema.json").read_text())
_alert_validator = jsonschema.Draft202012Validator(ALERT_SCHEMA)
TZ = timezone(timedelta(hours=8))
PARTITIONS = 4
PROC_TOL = 10 * 365 * 86_400
SEED = 1
# no shrinking: each example is a full run through Redis; the failing example is printed as found
HYP = settings(derandomize=True, database=None, deadline=None, print_blob=False,
               phases=(Phase.explicit, Phase.generate),
               suppress_health_check=list(HealthCheck))

pytestmark = pytest.mark.integration


def test_every_enabled_rule_is_covered():
    """The suite runs over what rules.yaml enables; every enabled id is a registered detector."""
    assert ENABLED, "no detector enabled in configs/rules.yaml"
    assert set(ENABLED) <= set(REGISTRY)


# --------------------------------------------------------------------------- material and drivers

@lru_cache(maxsize=1)
def city() -> tuple[tuple[bytes, ...], dict]:
    from replay import city as gen

    events, labels = gen.generate(cards=3000, days=7, seed=SEED)
    events = sorted(events, key=lambda e: (datetime.fromisoformat(e["event_time"]).timestamp(), e["event_id"]))
    return tuple(orjson.dumps(e) for e in events), labels


@lru_cache(maxsize=None)
def info(raw: bytes) -> tuple[float, str, int]:
    """(event time, card, partition) of a line, as the broker would key it."""
    ev = parse_event(raw, future_tolerance_s=PROC_TOL)
    return ev.ts, ev.card_id, zlib.crc32(ev.card_id.encode()) % PARTITIONS


def ruleset(rule: str) -> RuleSet:
    """A fresh rule set holding only ``rule``'s detector, built from the real configuration."""
    full = load_rules(RULES_PATH)
    det = next(d for d in full.detectors if d.rule == rule)
    return RuleSet([det], full.lateness_s, full.version, full.versions, full.source)


def partition_batches(lines: list[bytes], batch: int) -> list[list[bytes]]:
    """Split by card into partitions and interleave them batch by batch (as ``replay.quality.run_inprocess``)."""
    parts: list[list[bytes]] = [[] for _ in range(PARTITIONS)]
    for ln in lines:
        parts[info(ln)[2]].append(ln)
    out, pos, per = [], [0] * PARTITIONS, max(1, batch // PARTITIONS)
    while any(pos[p] < len(parts[p]) for p in range(PARTITIONS)):
        b = []
        for p in range(PARTITIONS):
            b += parts[p][pos[p]:pos[p] + per]
            pos[p] += per
        out.append(b)
    return out


class Driver:
    """One Processor (one worker) with one detector on the real Redis, batch after batch, synchronously."""

    def __init__(self, stack, rule: str, run_id: str | None = None) -> None:
        import redis.asyncio as aioredis

        self.rule = rule
        self.run_id = run_id or f"cf{uuid.uuid4().hex[:10]}"
        self.loop = asyncio.new_event_loop()
        self.redis = aioredis.from_url(stack.redis_url)
        self.proc = Processor(ruleset(rule), self.redis, future_tolerance_s=PROC_TOL)
        self.offset = itertools.count()

    def process(self, lines: list[bytes]):
        msgs = [Message(v, {H_RUN_ID: self.run_id.encode()}, "settlements-replay", info(v)[2], next(self.offset))
                for v in lines]
        res = self.loop.run_until_complete(self.proc.process(msgs))
        assert not res.dead_letters, f"base material dead-lettered: {res.dead_letters[0].reason}"
        return res

    def close(self) -> None:
        self.loop.run_until_complete(self.redis.aclose())
        self.loop.close()


def snapshot(r, run_id: str) -> dict[str, tuple]:
    """Every key of a run with its type and full value (order-free where Redis is), key prefix made neutral."""
    keys = sorted(r.scan_iter(match=f"cw:{run_id}:*", count=2000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
    types = [t.decode() for t in pipe.execute()]
    pipe = r.pipeline(transaction=False)
    for k, t in zip(keys, types):
        {"string": lambda: pipe.get(k), "hash": lambda: pipe.hgetall(k),
         "zset": lambda: pipe.zrange(k, 0, -1, withscores=True), "set": lambda: pipe.smembers(k),
         "list": lambda: pipe.lrange(k, 0, -1), "stream": lambda: pipe.xrange(k)}[t]()
    vals = pipe.execute()
    prefix = f"cw:{run_id}:".encode()
    out = {}
    for k, t, v in zip(keys, types, vals):
        if isinstance(v, bytes):
            v = _canonical(v)
        if isinstance(v, dict):
            v = tuple(sorted((f, _canonical(x)) for f, x in v.items()))
        elif isinstance(v, set):
            v = tuple(sorted(v))
        elif isinstance(v, list):
            v = tuple(v)
        out[(b"cw:{run}:" + k[len(prefix):]).decode("utf-8", "backslashreplace")] = (t, v)
    return out


def _canonical(v: bytes) -> bytes:
    """A JSON document stored as a string compares by content (a Lua table's key order is arbitrary)."""
    if v[:1] in (b"{", b"["):
        try:
            return orjson.dumps(orjson.loads(v), option=orjson.OPT_SORT_KEYS)
        except orjson.JSONDecodeError:
            pass
    return v


def state_diff(a: dict, b: dict, limit: int = 5) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    changed = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    lines = [f"{len(only_a)} key(s) gone {only_a[:limit]}", f"{len(only_b)} key(s) new {only_b[:limit]}",
             f"{len(changed)} key(s) changed"]
    for k in changed[:limit]:
        lines.append(f"  {k} ({a[k][0]}): {_value_diff(a[k][1], b[k][1])}")
    return "\n".join(lines)


def _value_diff(x: Any, y: Any) -> str:
    """The part of a value that changed (JSON documents and hashes field by field)."""
    def as_map(v):
        if isinstance(v, bytes) and v[:1] == b"{":
            try:
                return orjson.loads(v)
            except orjson.JSONDecodeError:
                return None
        if isinstance(v, tuple) and all(isinstance(e, tuple) and len(e) == 2 for e in v):
            return {str(f): w for f, w in v}
        return None
    mx, my = as_map(x), as_map(y)
    if mx is None or my is None:
        return f"{str(x)[:300]} -> {str(y)[:300]}"
    parts = []
    for f in sorted(set(mx) | set(my)):
        if mx.get(f) != my.get(f):
            a, b = mx.get(f), my.get(f)
            if isinstance(a, dict) and isinstance(b, dict):
                sub = {g: (a.get(g), b.get(g)) for g in sorted(set(a) | set(b)) if a.get(g) != b.get(g)}
                parts.append(f"{f}: {len(sub)} entries differ, e.g. {dict(list(sub.items())[:3])}")
            else:
                parts.append(f"{f}: {str(a)[:150]} -> {str(b)[:150]}")
    return "; ".join(parts)[:1200]


def merged(results) -> dict[str, dict]:
    """Alerts merged by alert_id as the store upserts them (evidence union, latest content)."""
    out: dict[str, dict] = {}
    for res in results:
        for a in res.alerts:
            d = msgspec.to_builtins(a)
            if a.alert_id in out:
                d["evidence_event_ids"] = list(dict.fromkeys(out[a.alert_id]["evidence_event_ids"]
                                                             + d["evidence_event_ids"]))
            out[a.alert_id] = d
    return out


def content(alerts: dict[str, dict], *, keep_ids: bool = True) -> Any:
    """Comparable alert content: ``detected_at`` aside (and the run-dependent ids when ``keep_ids`` is False)."""
    def norm(d: dict) -> str:
        d = {k: v for k, v in d.items() if k != "detected_at"}
        if not keep_ids:
            d.pop("alert_id", None)
            d.pop("run_id", None)
        return json.dumps(d, sort_keys=True, ensure_ascii=False)
    if keep_ids:
        return {k: norm(v) for k, v in alerts.items()}
    return sorted(norm(v) for v in alerts.values())


def outcome(alerts: dict[str, dict]) -> set[tuple]:
    return {(a["rule"], a["subject_id"], tuple(sorted(a["evidence_event_ids"]))) for a in alerts.values()}


def diff_alerts(a, b) -> str:
    if isinstance(a, dict):
        ka, kb = set(a), set(b)
        lines = [f"ids only in the first delivery: {sorted(ka - kb)[:5]}",
                 f"ids only in the redelivery: {sorted(kb - ka)[:5]}"]
        for k in sorted(ka & kb):
            if a[k] != b[k]:
                lines.append(f"{k} differs:\n  {a[k][:600]}\n  {b[k][:600]}")
                break
        return "\n".join(lines)
    sa, sb = set(a), set(b)
    return (f"only first: {[x[:400] for x in sorted(sa - sb)][:2]}\n"
            f"only second: {[x[:400] for x in sorted(sb - sa)][:2]}")


_BASE: dict[str, dict] = {}


def _base_run(rule: str, stack) -> dict:
    """Event-time order through the detector: merged alerts and key TTLs (cached per rule)."""
    if rule not in _BASE:
        _BASE[rule] = _do_base_run(rule, stack)
    return _BASE[rule]


def _do_base_run(rule: str, stack) -> dict:
    import redis

    lines, _ = city()
    drv = Driver(stack, rule)
    try:
        results = [drv.process(b) for b in partition_batches(list(lines), 400)]
    finally:
        drv.close()
    r = redis.Redis.from_url(stack.redis_url)
    try:
        ttls = {}
        keys = list(r.scan_iter(match=f"cw:{drv.run_id}:*", count=2000))
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.ttl(k)
        ttls = dict(zip(keys, pipe.execute()))
    finally:
        r.close()
    return {"run_id": drv.run_id, "alerts": merged(results), "ttls": ttls}


@pytest.fixture(scope="module")
def base_run(stack):
    return lambda rule: _base_run(rule, stack)


def _injected_rules() -> set[str]:
    return {f["rule"] for f in city()[1]["frauds"]} | {r for f in city()[1]["frauds"] for r in f.get("also_rules", ())}


# --------------------------------------------------------------------------- (a) redelivery

@pytest.mark.parametrize("rule", ENABLED)
def test_redelivery_changes_no_alert_and_no_state(rule, stack, redis_sync):
    lines, _ = city()
    batches = partition_batches(list(lines), 400)
    drv = Driver(stack, rule)
    problems: list[str] = []
    try:
        for i, b in enumerate(batches):
            first = content(merged([drv.process(b)]))
            s1 = snapshot(redis_sync, drv.run_id)
            again = content(merged([drv.process(b)]))
            s2 = snapshot(redis_sync, drv.run_id)
            twice = content(merged([drv.process(b + b)]))  # the whole batch fetched twice in one batch
            s3 = snapshot(redis_sync, drv.run_id)
            if again != first:
                problems.append(f"batch {i} redelivered: alerts differ\n{diff_alerts(first, again)}")
            if s2 != s1:
                problems.append(f"batch {i} redelivered: Redis state changed\n{state_diff(s1, s2)}")
            if twice != first:
                problems.append(f"batch {i} with every event twice: alerts differ\n{diff_alerts(first, twice)}")
            if s3 != s1:
                problems.append(f"batch {i} with every event twice: Redis state changed\n{state_diff(s1, s3)}")
            if problems:
                break
        final_a = snapshot(redis_sync, drv.run_id)
    finally:
        drv.close()
    assert not problems, f"{rule}:\n" + "\n".join(problems)

    # a fresh run whose every batch carries each event twice, adjacent: as if delivered once
    base = _base_run(rule, stack)
    drv_b = Driver(stack, rule)
    try:
        res_b = [drv_b.process([x for ln in b for x in (ln, ln)]) for b in batches]
        final_b = snapshot(redis_sync, drv_b.run_id)
    finally:
        drv_b.close()
    drv_c = Driver(stack, rule)
    try:
        res_c = [drv_c.process(b) for b in batches]
        final_c = snapshot(redis_sync, drv_c.run_id)
    finally:
        drv_c.close()
    got, want = content(merged(res_b), keep_ids=False), content(merged(res_c), keep_ids=False)
    assert got == want, f"{rule}: every event twice in its batch gives other alerts\n{diff_alerts(want, got)}"
    assert final_b == final_c, f"{rule}: every event twice leaves other state\n{state_diff(final_c, final_b)}"
    assert final_a == final_c, f"{rule}: redelivered batches leave other state\n{state_diff(final_c, final_a)}"
    if rule in _injected_rules():
        assert base["alerts"], f"{rule}: the city injects {rule} fraud but the rule never fired"


# --------------------------------------------------------------------------- (b) order within lateness

@st.composite
def reorderings(draw):
    """(seed, jitter share of lateness, batch sizes): key = event time + U[0, share x lateness)."""
    return (draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0.25, 0.6, 0.999])),
            draw(st.lists(st.integers(15, 700), min_size=1, max_size=12)))


@pytest.mark.parametrize("rule", ENABLED)
def test_out_of_order_within_lateness_gives_the_same_alerts(rule, stack):
    lines, _ = city()
    base = _base_run(rule, stack)
    want = outcome(base["alerts"])
    lateness = ruleset(rule).lateness_s

    @settings(HYP, max_examples=4)
    @given(how=reorderings())
    def check(how):
        seed, share, sizes = how
        rnd = random.Random(seed)
        keyed = sorted(lines, key=lambda ln: info(ln)[0] + rnd.random() * share * lateness)
        # every inversion is less than lateness_s apart in event time
        worst = 0.0
        high = -1e18
        for ln in keyed:
            high = max(high, info(ln)[0])
            worst = max(worst, high - info(ln)[0])
        assert worst < lateness
        cuts, pos = [], 0
        for size in itertools.cycle(sizes):
            if pos >= len(keyed):
                break
            cuts.append(keyed[pos:pos + size])
            pos += size
        drv = Driver(stack, rule)
        try:
            results = [drv.process(b) for b in cuts]
        finally:
            drv.close()
        assert sum(sum(r.late.values()) for r in results) == 0, "no event may count as late here"
        got = outcome(merged(results))
        assert got == want, (
            f"{rule}: out of order by < {worst:.0f} s (lateness_s={lateness}), batches {sizes}, seed {seed}: "
            f"{len(want - got)} alert(s) only in event-time order {sorted(want - got)[:3]}; "
            f"{len(got - want)} only out of order {sorted(got - want)[:3]}")

    check()


# --------------------------------------------------------------------------- (c) every key expires

@pytest.mark.parametrize("rule", ENABLED)
def test_every_key_the_detector_writes_expires(rule, base_run):
    ttls = base_run(rule)["ttls"]
    assert ttls, f"{rule} wrote no Redis key at all on a week of the city"
    forever = sorted(k.decode("utf-8", "backslashreplace") for k, t in ttls.items() if not (t and t > 0))
    assert not forever, f"{rule}: {len(forever)} key(s) without a TTL, e.g. {forever[:5]}"


# --------------------------------------------------------------------------- (d) parameters are validated

def _numeric_leaves(v: Any, path: tuple = ()):
    """Paths of the numeric parameters of a YAML block (data tables such as district centroids aside)."""
    if isinstance(v, bool):
        return
    if isinstance(v, (int, float)) and path:
        yield path
        return
    if len(path) >= 3:
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if k != "districts":  # coordinates: data, and negative ones are real places
                yield from _numeric_leaves(x, path + (k,))
    elif isinstance(v, list):
        numbers = v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        for i in (sorted({0, len(v) - 1}) if numbers else range(len(v))):
            yield from _numeric_leaves(v[i], path + (i,))


def _construct(rule: str, cfg: dict, lateness: Any = None):
    """The detector from a YAML block, as ``load_rules`` builds it (resale-prone list included)."""
    cls = REGISTRY[rule]
    params = dict(cfg)
    params.pop("enabled", None)
    if "resale_prone" in inspect.signature(cls.__init__).parameters:
        rp = RULES_DOC.get("resale_prone_drugs") or {}
        params["resale_prone"] = DrugList(rp.get("code_prefixes") or (), rp.get("name_keywords") or ())
    return cls(**params, lateness_s=RULES_DOC.get("lateness_s", 3600) if lateness is None else lateness,
               lang="zh", version="test")


PARAM_CASES = [(rule, path, bad) for rule in ENABLED
               for path in [("lateness_s",)] + list(_numeric_leaves(RULES_DOC["rules"][rule] or {}))
               for bad in (-1, 0, "x")]


def _pid(case) -> str:
    rule, path, bad = case
    return f"{rule}-{''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in path).lstrip('.')}={bad!r}"


def _raises(rule: str, path: tuple, bad: Any) -> BaseException | None:
    cfg = copy.deepcopy(RULES_DOC["rules"][rule] or {})
    try:
        if path == ("lateness_s",):
            _construct(rule, cfg, lateness=bad)
        else:
            t = cfg
            for p in path[:-1]:
                t = t[p]
            t[path[-1]] = bad
            _construct(rule, cfg)
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


@pytest.mark.parametrize("case", PARAM_CASES, ids=[_pid(c) for c in PARAM_CASES])
def test_invalid_parameter_is_refused_naming_the_rule(case):
    rule, path, bad = case
    assert _raises(rule, path, _value_at(rule, path)) is None, f"{rule}: the configured value at {path} is refused"
    exc = _raises(rule, path, bad)
    if bad == 0:
        minus = _raises(rule, path, -1)
        zero_ok = minus is not None and re.search(r"non-negative|from 0|>= ?0|0 =|starting at 0", str(minus))
        if exc is None:
            assert zero_ok, (f"{rule}: {path} = 0 is accepted, but its message for -1 does not say 0 is allowed: "
                             f"{minus}")
            return
    assert exc is not None, f"{rule}: {path} = {bad!r} is accepted"
    assert isinstance(exc, ValueError), f"{rule}: {path} = {bad!r} raised {type(exc).__name__}: {exc} (want ValueError)"
    assert str(exc).startswith(f"{rule}:"), f"{rule}: {path} = {bad!r}: message does not start with '{rule}:': {exc}"


def _value_at(rule: str, path: tuple) -> Any:
    if path == ("lateness_s",):
        return RULES_DOC.get("lateness_s", 3600)
    t = RULES_DOC["rules"][rule]
    for p in path:
        t = t[p]
    return t


# --------------------------------------------------------------------------- (e) docs and contract ids

_BUILTIN = re.search(r"The built-in ids are: ([^.]+)\.", ALERT_SCHEMA["properties"]["rule"]["description"])
CONTRACT_RULES = {x.strip() for x in _BUILTIN.group(1).split(",")} if _BUILTIN else set()
SUBJECT_TYPES = set(ALERT_SCHEMA["properties"]["subject_type"]["enum"])


@pytest.mark.parametrize("rule", ENABLED)
def test_module_docstring_has_a_passing_doctest_and_contract_ids(rule):
    cls = REGISTRY[rule]
    module = sys.modules[cls.__module__]
    assert module.__name__ == f"detectors.{rule}", f"{rule} lives in {module.__name__}: one rule per module"
    assert module.__doc__ and ">>>" in module.__doc__, f"{module.__name__} has no doctest in its module docstring"
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(module) if t.examples]
    assert tests, f"{module.__name__}: no doctest found"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t, out=lambda s: None)
    assert runner.failures == 0, f"{module.__name__}: {runner.failures} failing doctest example(s)"
    assert cls.rule == rule
    assert rule in CONTRACT_RULES, f"{rule} is not a rule id of alert.schema.json ({sorted(CONTRACT_RULES)})"
    assert cls.subject_type in SUBJECT_TYPES, f"{rule}.subject_type {cls.subject_type!r} not in {SUBJECT_TYPES}"


# --------------------------------------------------------------------------- (f) hostile but valid events

_T_BASE = datetime(2026, 11, 3, 9, 0, tzinfo=TZ).timestamp()
_ID_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=64)
_SEPARATORS = st.sampled_from(["\t", "\x1f", ":", "|", "\n", "{", "}", "*", "?", "[", "]", " ", "\\", "'", '"',
                               "\u202e", "\u200f", "💊", "卡", "\x00", "\ufeff", "%s", "{card}", "0000", "未知"])
_IDS = st.one_of(_ID_TEXT, st.lists(_SEPARATORS, min_size=1, max_size=20).map("".join),
                 st.sampled_from(["3101197701260894", "P310107003", "H310104001", "D310104001007"]))
_DRUG_CODES = st.one_of(st.sampled_from(["XC10AAA005", "XB01ACA002", "XB01AFA001", "XA10AEA001", "XJ05AFA010",
                                         "XL01XEA001", "XA10BAA001", "R0001", "B0001", "X", "XC10AA"]),
                        st.text(min_size=1, max_size=64))
_TRACE = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=128),
                   st.sampled_from(["81234567890123456789", "0000", "未知", "8" * 128, "812345678901"]))
_AMOUNT = st.one_of(st.sampled_from([0.0, 0.01, MAX_AMOUNT_CNY, 1e-300, 5e-324]),
                    st.floats(0, MAX_AMOUNT_CNY, allow_nan=False))


@st.composite
def _item(draw):
    it = {"code": draw(_DRUG_CODES)[:64] or "X",
          "category": draw(st.sampled_from(["drug", "exam", "treatment", "material", "registration", "bed", "other"])),
          "quantity": draw(st.one_of(st.sampled_from([1e-9, 1e6, 1, 0.5]), st.floats(1e-9, 1e6))),
          "amount": draw(_AMOUNT)}
    if draw(st.booleans()):
        it["days_supply"] = draw(st.one_of(st.none(), st.integers(0, 3660)))
    if draw(st.booleans()):
        it["trace_codes"] = draw(st.lists(_TRACE, max_size=6))
    if draw(st.booleans()):
        it["name"] = draw(st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["阿托伐他汀钙片", "胰岛素"])))
    if draw(st.booleans()):
        it["unit_price"] = draw(st.one_of(st.none(), _AMOUNT))
    return it


def _iso(ts: float, offset_h: int) -> str:
    return datetime.fromtimestamp(ts, timezone(timedelta(hours=offset_h))).isoformat()


@st.composite
def hostile_valid_batches(draw):
    """A batch of schema-valid, parser-valid settlements with extreme values, often sharing ids and times."""
    n = draw(st.integers(1, 10))
    cards = draw(st.lists(_IDS, min_size=1, max_size=3))
    insts = draw(st.lists(_IDS, min_size=1, max_size=4))
    t0 = draw(st.sampled_from([_T_BASE, datetime(2000, 1, 2, tzinfo=timezone.utc).timestamp(),
                               datetime(2026, 11, 26, tzinfo=TZ).timestamp()]))
    same_time = draw(st.booleans())
    out = []
    for k in range(n):
        total = draw(_AMOUNT)
        visit = draw(st.sampled_from(["outpatient", "emergency", "inpatient", "pharmacy"]))
        ts = t0 if same_time else t0 + draw(st.integers(0, 8 * 86400))
        n_items = draw(st.sampled_from([0, 1, 2, 200]))
        if n_items == 200:
            items = [draw(_item())] * 200
        else:
            items = draw(st.lists(_item(), min_size=n_items, max_size=n_items))
        ev = {
            "event_id": draw(st.one_of(_IDS, st.just(f"E{k}"))),
            "event_time": _iso(ts, draw(st.sampled_from([8, 0, -12, 14]))),
            "card_id": draw(st.sampled_from(cards)),
            "institution_id": draw(st.sampled_from(insts)),
            "institution_type": draw(st.sampled_from(["hospital", "community", "pharmacy"])),
            "district": draw(st.one_of(st.sampled_from(["310101", "310151", "310120", "310115", "999999"]),
                                       _IDS.map(lambda s: s[:32]))),
            "visit_type": visit,
            "items": items,
            "total_amount": total,
            "fund_paid": draw(st.floats(0, total)) if total else 0.0,
            "birth_year": draw(st.one_of(st.none(), st.integers(1900, 2100))),
            "insured_category": draw(st.sampled_from([None, "employee", "retiree", "resident", "child"])),
            "gender": draw(st.sampled_from([None, "M", "F"])),
            "institution_level": draw(st.sampled_from([None, 1, 2, 3])),
            "institution_name": draw(st.one_of(st.none(), st.text(max_size=80))),
            "department": draw(st.one_of(st.none(), _IDS)),
            "physician_id": draw(st.one_of(st.none(), _IDS)),
            "diagnoses": draw(st.lists(st.one_of(st.sampled_from(["E11.9", "N18.5", "I25", "C34", "J06.9"]),
                                                 st.text(max_size=12)), max_size=4)),
            "self_paid": draw(st.one_of(st.none(), _AMOUNT)),
        }
        if visit == "inpatient" or draw(st.booleans()):
            ev["admission_id"] = draw(st.one_of(st.none(), _IDS))
            ev["admitted_at"] = draw(st.one_of(st.none(), st.just(_iso(ts - draw(st.integers(-86400, 90 * 86400)), 8))))
            ev["discharged_at"] = draw(st.one_of(st.none(), st.just(_iso(ts + draw(st.integers(-86400, 86400)), 8))))
        out.append(orjson.dumps(ev))
    if draw(st.booleans()):  # the same settlement again in the batch, or another one under its id
        out.append(draw(st.sampled_from(out)))
    return out


@pytest.mark.parametrize("rule", ENABLED)
def test_hostile_but_valid_events_never_raise(rule, stack):
    drv = Driver(stack, rule)
    try:
        @settings(HYP, max_examples=25)
        @given(batch=hostile_valid_batches())
        def check(batch):
            for raw in batch:  # the strategy must stay inside the contract and the parser's limits
                parse_event(raw, future_tolerance_s=PROC_TOL)
            msgs_ok = len(batch)
            try:
                res = drv.process(batch)
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"{rule} raised {type(exc).__name__} on valid settlements: {str(exc)[:800]}\n"
                            f"batch: {[b[:400] for b in batch][:4]}")
            assert sum(res.processed.values()) == msgs_ok
            for a in res.alerts:
                errs = list(_alert_validator.iter_errors(msgspec.to_builtins(a)))
                assert not errs, f"{rule}: alert outside alert.schema.json: {errs[0].message}"
                assert a.rule == rule and a.subject_type in SUBJECT_TYPES

        check()
    finally:
        drv.close()


def test_zz_coverage_summary(stack, capsys):
    """Print which detectors the suite ran over and how much the base material exercised each."""
    rows = []
    for rule in ENABLED:
        b = _base_run(rule, stack)
        rows.append(f"{rule}: {len(b['alerts'])} alert(s), {len(b['ttls'])} Redis key(s)"
                    + ("" if rule in _injected_rules() else " (no injected fraud for this rule in the city)"))
    with capsys.disabled():
        print("\n[conformance] detectors covered (configs/rules.yaml, city 3000 cards x 7 days, seed "
              f"{SEED}, {len(city()[0])} settlements):\n  " + "\n  ".join(rows))
    missing = [r for r in ENABLED if r in _injected_rules() and not _base_run(r, stack)["alerts"]]
    assert not missing, f"rules with injected fraud that never fired on the base material: {missing}"
