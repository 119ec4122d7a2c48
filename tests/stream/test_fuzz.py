"""Hostile input against :func:`stream.events.parse_event` and the :class:`stream.pipeline.Processor`.

Issue 5, "bad input": every malformed message goes to the dead letters with its reason and
its original bytes, is counted, and never stops the worker; the valid messages of the same
batch are processed. Three layers:

* a table of named hostile inputs (one readable case each) that must be refused;
* hypothesis (structure): generated hostile messages, from raw binary to valid events with
  a few fields replaced by hostile JSON, encoded in hostile ways; the same strategy feeds
  whole batches to the real Processor on the real Redis with every enabled rule;
* a fast seeded mutation fuzzer (byte flips, truncations, splices, token injection,
  field drops/swaps, hostile values, time shifts ...) over valid events of
  ``replay.city.generate`` and the contract examples, at least 100,000 inputs, each checked
  against ``parse_event`` and, batched, against ``Processor.parse`` (and a share of the
  batches through the detectors on Redis).

The properties: ``parse_event`` returns a ``Settlement`` or raises ``InvalidEvent`` (never
anything else); an accepted message is valid UTF-8 JSON, valid against
``settlement-event.schema.json``, and the values the detectors see are the values any JSON
reader sees in the kept bytes (duplicate keys!); the Processor dead-letters exactly the
messages ``parse_event`` refuses, with a non-empty reason and the original bytes, counts
them, and valid + invalid + control == input.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from functools import lru_cache

import jsonschema
import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from detectors.config import load_rules
from stream.events import InvalidEvent, Settlement, parse_event
from stream.pipeline import Message, Processor
from stream.topics import CONTROL_EOF, H_CONTROL, H_RUN_ID
from tests.conftest import CONTRACT, ROOT
from tests.helpers import T0, make_event

TZ = timezone(timedelta(hours=8))
#: a fixed "now" for parse_event, so the verdicts do not depend on the wall clock
NOW = datetime(2026, 12, 1, tzinfo=TZ).timestamp()
TOL = 86_400
MAX_BYTES = 256 * 1024
#: the Processor uses the wall clock; its tolerance is wide enough for the generated city
PROC_TOL = 10 * 365 * 86_400
#: at least 100,000 mutated inputs in CI; CLAIMWATCH_FUZZ_CASES can raise it, never lower it
FUZZ_CASES = max(100_000, int(os.environ.get("CLAIMWATCH_FUZZ_CASES", "0") or 0))
FUZZ_SEED = int(os.environ.get("CLAIMWATCH_FUZZ_SEED", "20261124"))
BATCH = 1000
REDIS_EVERY = 10  # every 10th mutated batch also runs through the detectors on Redis

SCHEMA = json.loads((CONTRACT / "settlement-event.schema.json").read_text())
ALERT_SCHEMA = json.loads((CONTRACT / "alert.schema.json").read_text())
_validator = jsonschema.Draft202012Validator(SCHEMA)
_alert_validator = jsonschema.Draft202012Validator(ALERT_SCHEMA)
REQUIRED = tuple(SCHEMA["required"])
FIELDS = tuple(SCHEMA["properties"])
ITEM_FIELDS = tuple(SCHEMA["properties"]["items"]["items"]["properties"])
EXAMPLES = [ln for ln in (CONTRACT / "example-events.jsonl").read_bytes().splitlines() if ln.strip()]
HYP = settings(derandomize=True, database=None, deadline=None, print_blob=False,
               phases=(Phase.explicit, Phase.generate, Phase.shrink),
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])

STATS: Counter = Counter()  # cases executed per layer, printed at the end of the mutation run


@lru_cache(maxsize=1)
def corpus() -> tuple[dict, ...]:
    """Valid events: the contract examples and a generated city week (every kind of settlement)."""
    from replay import city

    events, _ = city.generate(cards=3000, days=7, seed=5)
    return tuple([orjson.loads(x) for x in EXAMPLES] + list(events) + [make_event()])


@lru_cache(maxsize=1)
def rules():
    return load_rules(ROOT / "configs" / "rules.yaml")


# --------------------------------------------------------------------------- the oracle

def verdict(raw: bytes, *, now: float = NOW, tol: float = TOL):
    """``Settlement``, or the ``InvalidEvent``; any other exception propagates (the bug)."""
    try:
        return parse_event(raw, max_bytes=MAX_BYTES, future_tolerance_s=tol, now=now)
    except InvalidEvent as exc:
        return exc


_ANNOTATIONS = {"$schema", "$id", "title", "description", "format"}
_TYPES = {
    "null": lambda v: v is None, "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str), "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def compile_schema(schema: dict, path: str = "$"):
    """A fast validator for the keywords the contract uses (jsonschema takes ~0.5 ms per item line).

    Compiled from the schema file itself; an unknown keyword fails loudly, and
    ``test_fast_schema_check_agrees_with_jsonschema`` keeps it honest against jsonschema.
    Returns ``check(value, out, where)``, appending messages to ``out``.
    """
    unknown = set(schema) - _ANNOTATIONS - {"type", "enum", "required", "properties", "items", "minimum", "maximum",
                                            "exclusiveMinimum", "minLength", "maxLength", "minItems"}
    if unknown:
        raise AssertionError(f"compile_schema does not know {sorted(unknown)} (at {path}): use jsonschema")
    t = schema.get("type")
    type_ok = None
    if t is not None:
        fns = [_TYPES[x] for x in ([t] if isinstance(t, str) else t)]
        type_ok = fns[0] if len(fns) == 1 else (lambda v: any(f(v) for f in fns))
    enum = schema.get("enum")
    lo, hi, xlo = schema.get("minimum"), schema.get("maximum"), schema.get("exclusiveMinimum")
    minlen, maxlen, minitems = schema.get("minLength"), schema.get("maxLength"), schema.get("minItems")
    required = tuple(schema.get("required", ()))
    props = {k: compile_schema(sub, f"{path}.{k}") for k, sub in schema.get("properties", {}).items()}
    items = compile_schema(schema["items"], f"{path}[]") if "items" in schema else None
    is_num = _TYPES["number"]

    def check(v, out: list, where: str = path) -> None:
        if type_ok is not None and not type_ok(v):
            out.append(f"{where}: {type(v).__name__} is not {t}")
            return
        if enum is not None and not any((v is None and e is None) or (type(v) is type(e) and v == e)
                                        or (is_num(v) and is_num(e) and v == e) for e in enum):
            out.append(f"{where}: {v!r} not in {enum}")
        if is_num(v):
            if lo is not None and v < lo:
                out.append(f"{where}: {v!r} < minimum {lo}")
            if hi is not None and v > hi:
                out.append(f"{where}: {v!r} > maximum {hi}")
            if xlo is not None and v <= xlo:
                out.append(f"{where}: {v!r} <= exclusiveMinimum {xlo}")
        elif isinstance(v, str):
            if minlen is not None and len(v) < minlen:
                out.append(f"{where}: shorter than {minlen}")
            if maxlen is not None and len(v) > maxlen:
                out.append(f"{where}: longer than {maxlen}")
        elif isinstance(v, dict):
            for k in required:
                if k not in v:
                    out.append(f"{where}: missing required {k!r}")
            for k, sub in props.items():
                if k in v:
                    sub(v[k], out, f"{where}.{k}")
        elif isinstance(v, list):
            if minitems is not None and len(v) < minitems:
                out.append(f"{where}: fewer than {minitems} items")
            if items is not None:
                for i, x in enumerate(v):
                    items(x, out, f"{where}[{i}]")

    return check


_check_settlement = compile_schema(SCHEMA)


def schema_errors(schema: dict, v) -> list[str]:
    out: list[str] = []
    (_check_settlement if schema is SCHEMA else compile_schema(schema))(v, out)
    return out


def accepted_problems(raw: bytes, ev: Settlement, *, now: float = NOW, tol: float = TOL) -> list[str]:
    """What is wrong with an accepted message (empty: nothing)."""
    out = []
    if ev.raw is not raw and ev.raw != raw:
        out.append("Settlement.raw is not the original bytes")
    if not (math.isfinite(ev.ts) and ev.ts <= now + tol and ev.event_time.year >= 2000):
        out.append(f"accepted event time out of range: {ev.event_time!r}")
    if len(raw) > MAX_BYTES:
        out.append(f"accepted a message of {len(raw)} bytes > max {MAX_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return out + ["accepted bytes that are not valid UTF-8 (the kept evidence cannot be read as JSON) || "
                      f"{exc}"]
    del text
    try:
        doc = orjson.loads(raw)  # a strict RFC 8259 reader: UTF-8, no NaN, no lone surrogates; last key wins
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # nesting limits differ between readers (RFC 8259 allows any): no verdict
            return out
        return out + [f"accepted a message a strict JSON reader (orjson) refuses || {exc}"]
    if not isinstance(doc, dict):
        return out + ["accepted a JSON value that is not an object"]
    items = doc.get("items")
    checked = doc
    if isinstance(items, list) and len(items) > 60:  # one schema per line: the ends are enough for long bills
        checked = {**doc, "items": items[:30] + items[-30:]}
    errs = schema_errors(SCHEMA, checked)
    if errs:
        out.append("accepted a message that violates settlement-event.schema.json || " + "; ".join(errs[:3]))
    # what the detectors see must be what any JSON reader sees in the kept bytes
    for f in ("event_id", "card_id", "institution_id", "district", "visit_type", "institution_type"):
        if doc.get(f) != getattr(ev, f):
            out.append(f"{f}: the detectors see another value than the kept bytes hold || "
                       f"parsed {getattr(ev, f)!r}, json.loads {doc.get(f)!r}")
    for f in ("total_amount", "fund_paid"):
        if isinstance(doc.get(f), (int, float)) and float(doc[f]) != getattr(ev, f):
            out.append(f"{f}: the detectors see another value than the kept bytes hold || "
                       f"parsed {getattr(ev, f)!r}, json.loads {doc[f]!r}")
    if isinstance(doc.get("items"), list) and len(doc["items"]) != len(ev.items):
        out.append(f"items: detectors see {len(ev.items)} lines, the kept bytes have {len(doc['items'])}")
    return out


class Findings:
    """Collects property violations (kind -> examples) so one run reports every kind of failure."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[tuple[str, bytes, str]]] = defaultdict(list)

    def add(self, kind: str, how: str, raw: bytes | None, detail: str = "") -> None:
        self.by_kind[kind].append((how, raw if raw is not None else b"<None>", detail))

    def report(self) -> str:
        lines = []
        for kind, ex in sorted(self.by_kind.items(), key=lambda kv: -len(kv[1])):
            how = Counter(h for h, _, _ in ex)
            shortest = min(ex, key=lambda e: len(e[1]))
            lines.append(f"- {kind}: {len(ex)} case(s), by mutation {dict(how.most_common(6))}; "
                         f"shortest ({len(shortest[1])} bytes): {shortest[1][:300]!r}"
                         + (f" [{shortest[2][:200]}]" if shortest[2] else ""))
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return bool(self.by_kind)


def check_one(raw: bytes, how: str, expect: str | None, found: Findings) -> str:
    """Run the parse_event properties on one input; return 'valid' / 'invalid' / 'crash'."""
    try:
        res = verdict(raw)
    except BaseException as exc:  # noqa: BLE001 - any other exception is the finding
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        found.add(f"parse_event raised {type(exc).__name__} (not InvalidEvent): {str(exc)[:100]}", how, raw)
        return "crash"
    if isinstance(res, InvalidEvent):
        if not str(res).strip():
            found.add("InvalidEvent with an empty reason", how, raw)
        if expect == "valid":
            found.add(f"a valid event was refused: {str(res)[:120]}", how, raw)
        return "invalid"
    if not isinstance(res, Settlement):
        found.add(f"parse_event returned {type(res).__name__}", how, raw)
        return "crash"
    if expect == "invalid":
        found.add(f"accepted an input that must be refused ({how})", how, raw)
    for p in accepted_problems(raw, res):
        kind, _, detail = p.partition(" || ")
        found.add(kind, how, raw, detail)
    return "valid"


# --------------------------------------------------------------------------- named hostile inputs

def _ev(**over) -> dict:
    ev = make_event(t=T0)
    for k, v in over.items():
        if v is ...:
            ev.pop(k, None)
        else:
            ev[k] = v
    return ev


def _raw(**over) -> bytes:
    return orjson.dumps(_ev(**over))


_OK = orjson.dumps(_ev())
_ITEM = _ev()["items"][0]


def _nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return _OK[:-1] + b',"vendor_extra":' + opener * depth + closer * depth + b"}"


NAMED_INVALID: dict[str, bytes] = {
    "empty": b"",
    "whitespace only": b" \n\t ",
    "null": b"null",
    "true": b"true",
    "number": b"42",
    "string": b'"settlement"',
    "array of the event": b"[" + _OK + b"]",
    "binary": bytes(range(256)),
    "utf-16 encoded": _OK.decode().encode("utf-16"),
    "utf-32 encoded": _OK.decode().encode("utf-32"),
    "truncated": _OK[: len(_OK) // 2],
    "trailing garbage": _OK + b"garbage",
    "two events in one message": _OK + b"\n" + _OK,
    "NaN token": _OK.replace(b'"total_amount":96.0', b'"total_amount":NaN'),
    "Infinity token": _OK.replace(b'"total_amount":96.0', b'"total_amount":Infinity'),
    "-Infinity token": _OK.replace(b'"fund_paid":67.2', b'"fund_paid":-Infinity'),
    "1e999 overflows to inf": _OK.replace(b'"total_amount":96.0', b'"total_amount":1e999'),
    "400-digit integer amount": _OK.replace(b'"total_amount":96.0', b'"total_amount":' + b"9" * 400),
    "hex number": _OK.replace(b'"total_amount":96.0', b'"total_amount":0x60'),
    "single-quoted strings": _OK.replace(b'"', b"'"),
    "unescaped control char in a string": _OK.replace(b'"C1"', b'"C\x011"'),
    "lone surrogate escape": _OK.replace(b'"C1"', b'"\\ud800"'),
    "invalid UTF-8 in card_id": _OK.replace(b'"C1"', b'"C\xff1"'),
    "overlong UTF-8 in card_id": _OK.replace(b'"C1"', b'"C\xc0\xaf1"'),
    "invalid UTF-8 in an unknown field": _OK[:-1] + b',"vendor_extra":"\xc3\x28"}',
    "invalid UTF-8 in an item's unknown field": _OK.replace(b'"days_supply":28', b'"days_supply":28,"memo":"\xed\xa0\x80"'),
    "unknown field nested 5,000 deep (arrays)": _nested(5000),
    "unknown field nested 1,200 deep (arrays)": _nested(1200),
    "unknown field nested 3,000 deep (objects)": _OK[:-1] + b',"vendor_extra":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
    "oversize (max_event_bytes + 1)": _OK[:-1] + b',"pad":"' + b"x" * (MAX_BYTES - len(_OK) - 8) + b'"}',
    "oversize 10 MB": _OK[:-1] + b',"pad":"' + b"x" * 10_000_000 + b'"}',
    "items is an object": _raw(items={}),
    "items is a string": _raw(items="drugs"),
    "items is null": _raw(items=None),
    "items is a number": _raw(items=3),
    "items holds a number": _raw(items=[1]),
    "items holds a list": _raw(items=[[_ITEM]]),
    "item without code": _raw(items=[{k: v for k, v in _ITEM.items() if k != "code"}]),
    "item quantity 0": _raw(items=[{**_ITEM, "quantity": 0}]),
    "item quantity negative": _raw(items=[{**_ITEM, "quantity": -3}]),
    "item amount negative": _raw(items=[{**_ITEM, "amount": -96.0}]),
    "item amount absurd": _raw(items=[{**_ITEM, "amount": 1e15}]),
    "item days_supply negative": _raw(items=[{**_ITEM, "days_supply": -28}]),
    "item days_supply 1e9": _raw(items=[{**_ITEM, "days_supply": 10**9}]),
    "item category unknown": _raw(items=[{**_ITEM, "category": "spa"}]),
    "total negative": _raw(total_amount=-0.01),
    "total absurd (1e13 CNY)": _raw(total_amount=1e13, fund_paid=1.0),
    "total a string": _raw(total_amount="96.0"),
    "total a boolean": _raw(total_amount=True),
    "total null": _raw(total_amount=None),
    "fund_paid above total": _raw(fund_paid=1000.0),
    "self_paid negative": _raw(self_paid=-1.0),
    "event_id an integer": _raw(event_id=7),
    "event_id empty": _raw(event_id=""),
    "event_id 65 characters": _raw(event_id="E" * 65),
    "card_id an object": _raw(card_id={"id": "C1"}),
    "card_id a list": _raw(card_id=["C1"]),
    "visit_type unknown": _raw(visit_type="spa"),
    "institution_type unknown": _raw(institution_type="casino"),
    "birth_year 1800": _raw(birth_year=1800),
    "birth_year a float": _raw(birth_year=1987.5),
    "gender unknown": _raw(gender="X"),
    "event_time 1999": _raw(event_time="1999-12-31T23:59:59+08:00"),
    "event_time year 1": _raw(event_time="0001-01-01T00:00:00+00:00"),
    "event_time 30 years ahead": _raw(event_time="2056-11-24T09:00:00+08:00"),
    "event_time year 9999": _raw(event_time="9999-12-31T23:59:59+00:00"),
    "event_time 2 days ahead": _raw(event_time=datetime.fromtimestamp(NOW + 2 * 86400, TZ).isoformat()),
    "event_time without offset": _raw(event_time="2026-11-24T09:00:00"),
    "event_time a date only": _raw(event_time="2026-11-24"),
    "event_time epoch number": _raw(event_time=1795482785),
    "event_time month 13": _raw(event_time="2026-13-01T00:00:00+08:00"),
    "event_time offset +25:00": _raw(event_time="2026-11-24T09:00:00+25:00"),
    "admitted_at without offset": _raw(admitted_at="2026-11-20T09:00:00"),
    "diagnoses a string": _raw(diagnoses="E11"),
}
for _f in REQUIRED:
    NAMED_INVALID[f"missing {_f}"] = _raw(**{_f: ...})


@pytest.mark.parametrize("name", sorted(NAMED_INVALID))
def test_named_hostile_input_is_an_invalid_event_with_a_reason(name):
    raw = NAMED_INVALID[name]
    try:
        res = parse_event(raw, max_bytes=MAX_BYTES, future_tolerance_s=TOL, now=NOW)
    except InvalidEvent as exc:
        assert str(exc).strip(), "the reason must not be empty"
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"parse_event raised {type(exc).__name__} instead of InvalidEvent on {name!r}: {exc}")
    pytest.fail(f"parse_event accepted {name!r} ({len(raw)} bytes): {res.event_id!r}")


@pytest.mark.parametrize("instant", ["2000-01-01T02:00:00+00:00", "2026-11-24T01:00:00+00:00"])
def test_verdict_does_not_depend_on_how_the_offset_writes_the_same_instant(instant):
    """One instant, written with different UTC offsets: one verdict (the year limit is about time, not notation)."""
    t = datetime.fromisoformat(instant)
    verdicts = {}
    for hours in (0, 8, -5, 14, -12):
        s = t.astimezone(timezone(timedelta(hours=hours))).isoformat()
        try:
            parse_event(_raw(event_time=s), max_bytes=MAX_BYTES, future_tolerance_s=TOL, now=NOW)
            verdicts[s] = "valid"
        except InvalidEvent as exc:
            verdicts[s] = f"invalid: {exc}"
    assert len(set(verdicts.values())) == 1, verdicts


def test_named_inputs_through_the_processor_are_dead_lettered_with_original_bytes():
    """The whole table in ONE batch, with valid events around it: nothing stops the batch."""
    valid = [orjson.dumps(_ev(event_id=f"OK{i}")) for i in range(5)]
    # the processor here tolerates event times up to PROC_TOL ahead, so "2 days ahead" is valid for it
    named = {n: v for n, v in NAMED_INVALID.items() if n != "event_time 2 days ahead"}
    values = [valid[0]] + [named[n] for n in sorted(named)] + valid[1:]
    msgs = [Message(v, {H_RUN_ID: b"named"}, "settlements", 0, i) for i, v in enumerate(values)]
    proc = Processor(rules(), None, future_tolerance_s=PROC_TOL)
    try:
        by_run, res = proc.parse(msgs)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Processor.parse raised {type(exc).__name__} on a batch of hostile messages: {exc} "
                    "(one bad message must never stop the batch)")
    assert res.processed == {"named": 5}
    assert sorted(e.event_id for e in by_run["named"]) == [f"OK{i}" for i in range(5)]
    assert res.invalid == {"named": len(named)}
    assert len(res.dead_letters) == len(named)
    for dl, m in zip(res.dead_letters, msgs[1:-4]):
        assert dl.message is m and dl.message.value is m.value
        assert dl.reason.strip() and dl.run_id == "named"


# --------------------------------------------------------------------------- hypothesis: structure

def _json_leaf():
    return st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
        st.sampled_from(["", "0000", "未知", "<script>alert(1)</script>", "'; DROP TABLE alerts; --",
                         "\u202e\u202d", "💊" * 10, "\t\x1f:|", "2026-11-24T09:00:00+08:00",
                         "2026-11-24T09:00:00", "9999-12-31T23:59:59+00:00", "1999-01-01T00:00:00Z"]),
    )


def _json_value():
    return st.recursive(_json_leaf(), lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=25)


@st.composite
def _hostile_event_bytes(draw) -> tuple[bytes, str]:
    ev = json.loads(json.dumps(draw(st.sampled_from(corpus()))))
    how = []
    for _ in range(draw(st.integers(0, 4))):
        field = draw(st.sampled_from(FIELDS + ("items[0]", "items[0].field", "extra")))
        action = draw(st.sampled_from(["drop", "set", "set"]))
        how.append(f"{action} {field}")
        if field == "extra":
            ev[draw(st.text(min_size=1, max_size=12))] = draw(_json_value())
        elif field.startswith("items[0]"):
            items = ev.get("items")
            if not isinstance(items, list) or not items or not isinstance(items[0], dict):
                ev["items"] = draw(_json_value())
            elif field == "items[0]":
                if action == "set":
                    items[0] = draw(_json_value())
                else:
                    items.pop(0)
            else:
                f2 = draw(st.sampled_from(ITEM_FIELDS))
                if action == "drop":
                    items[0].pop(f2, None)
                else:
                    items[0][f2] = draw(_json_value())
        elif action == "drop":
            ev.pop(field, None)
        else:
            ev[field] = draw(_json_value())
    enc = draw(st.sampled_from(["orjson", "ascii", "utf8", "indent"]))
    if enc == "orjson":
        try:
            raw = orjson.dumps(ev)
        except orjson.JSONEncodeError:  # NaN keys, huge ints: the stdlib writes them
            raw = json.dumps(ev).encode()
    else:
        raw = json.dumps(ev, ensure_ascii=enc == "ascii", indent=2 if enc == "indent" else None,
                         allow_nan=True).encode("utf-8", "surrogatepass")
    post = draw(st.sampled_from(["none"] * 6 + ["bom", "dup_first", "dup_last", "bad_utf8", "deep", "pad",
                                                "truncate", "surrogate"]))
    if post == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif post in ("dup_first", "dup_last") and raw.startswith(b"{") and len(raw) > 2:
        f = draw(st.sampled_from(REQUIRED))
        extra = f'"{f}":{json.dumps(draw(_json_leaf()))}'.encode()
        raw = (b"{" + extra + b"," + raw[1:]) if post == "dup_first" else (raw.rstrip()[:-1] + b"," + extra + b"}")
    elif post == "bad_utf8":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                              b"\xc0\xaf", b"\xe2\x82"])) + raw[i:]
    elif post == "deep" and raw.rstrip().endswith(b"}"):
        d = draw(st.integers(1, 3000))
        raw = raw.rstrip()[:-1] + b',"deep":' + b"[" * d + b"]" * d + b"}"
    elif post == "pad" and raw.rstrip().endswith(b"}"):
        raw = raw.rstrip()[:-1] + b',"pad":"' + b"y" * draw(st.integers(MAX_BYTES - 2000, MAX_BYTES + 2000)) + b'"}'
    elif post == "truncate":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif post == "surrogate":
        raw = raw.replace(b'"card_id":"', b'"card_id":"\\udc00', 1)
    return raw, ",".join(how) + f" enc={enc} post={post}"


def hostile_messages():
    return st.one_of(
        st.binary(max_size=600).map(lambda b: (b, "binary")),
        _json_value().map(lambda v: (json.dumps(v, allow_nan=True).encode(), "json value")),
        _hostile_event_bytes(), _hostile_event_bytes(), _hostile_event_bytes(),
    )


@settings(HYP, max_examples=2500)
@given(msg=hostile_messages())
def test_parse_event_returns_a_settlement_or_raises_invalid_event(msg):
    raw, how = msg
    STATS["hypothesis parse_event"] += 1
    found = Findings()
    check_one(raw, how, None, found)
    assert not found, "\n" + found.report()


def _hop_events(card: str) -> list[bytes]:
    return [orjson.dumps(_ev(event_id=f"{card}-{k}", card_id=card, institution_id=f"P{k:03d}",
                             event_time=datetime.fromtimestamp(T0 + k * 1200, TZ).isoformat()))
            for k in range(13)]


@settings(HYP, max_examples=60)
@given(junk=st.lists(st.one_of(hostile_messages(), st.just((None, "no value")), st.just((b"", "eof"))),
                     min_size=1, max_size=25),
       data=st.data())
def test_processor_dead_letters_every_invalid_message_and_processes_the_valid_ones(stack, junk, data):
    """Hostile messages interleaved with a card-hopping card in ONE batch, through every enabled rule on Redis."""
    import redis.asyncio as aioredis

    STATS["hypothesis processor batches"] += 1
    run = "fz" + uuid.uuid4().hex[:10]
    card = "HOP" + uuid.uuid4().hex[:8]
    hop = _hop_events(card)
    msgs: list[Message] = []
    kinds: list[str] = []
    for v in hop:
        msgs.append(Message(v, {H_RUN_ID: run.encode()}, "settlements", 0, len(msgs)))
        kinds.append("hop")
    for raw, how in junk:
        pos = data.draw(st.integers(0, len(msgs)))
        if how == "eof":
            m = Message(b"", {H_RUN_ID: run.encode(), H_CONTROL: CONTROL_EOF}, "settlements", 0, -1)
        else:
            m = Message(raw, {H_RUN_ID: run.encode()}, "settlements", 0, -1)
        msgs.insert(pos, m)
        kinds.insert(pos, how)
    now = time.time()
    expect_invalid = []
    for m, k in zip(msgs, kinds):
        if k == "eof":
            continue
        if m.value is None:
            expect_invalid.append(m)
            continue
        try:
            v = parse_event(m.value, max_bytes=MAX_BYTES, future_tolerance_s=PROC_TOL, now=now)
        except InvalidEvent:
            expect_invalid.append(m)
            continue
        except Exception:  # noqa: BLE001 - reported by the Processor call below
            expect_invalid.append(m)
            continue
        assert isinstance(v, Settlement)

    async def go():
        r = aioredis.from_url(stack.redis_url)
        try:
            proc = Processor(rules(), r, future_tolerance_s=PROC_TOL)
            return await proc.process(msgs)
        finally:
            await r.aclose()

    try:
        res = asyncio.run(go())
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Processor.process raised {type(exc).__name__}: {str(exc)[:300]} on a batch with "
                    f"{kinds.count('hop')} valid events and hostile messages {[k for k in kinds if k != 'hop']}")
    n_eof = kinds.count("eof")
    assert len(res.eofs) == n_eof
    assert [dl.message for dl in res.dead_letters] == expect_invalid
    for dl in res.dead_letters:
        assert isinstance(dl.reason, str) and dl.reason.strip()
        orig = next(m for m in msgs if m is dl.message)
        assert dl.message.value is orig.value  # the original bytes, untouched
        assert dl.run_id == run
    assert res.invalid.get(run, 0) == len(expect_invalid)
    total = sum(res.processed.values()) + sum(res.invalid.values()) + len(res.eofs)
    assert total == len(msgs), "a message was lost or counted twice"
    hopping = [a for a in res.alerts if a.rule == "card_hopping" and a.subject_id == card]
    assert hopping, "the valid events of the batch were not processed (no card_hopping alert)"
    assert set().union(*(a.evidence_event_ids for a in hopping)) == {f"{card}-{k}" for k in range(13)}
    for a in res.alerts:
        errs = list(_alert_validator.iter_errors(msgspec.to_builtins(a)))
        assert not errs, f"{a.rule} produced an alert outside alert.schema.json: {errs[0].message}"


# --------------------------------------------------------------------------- seeded mutation fuzzer

_NUM = re.compile(rb"(?<=[:\[,])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_STR = re.compile(rb'"(?:[^"\\]|\\.)*"')
HOSTILE_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 60, b"-" + b"9" * 60, b"-0",
                   b"1e-400", b"0x10", b"01", b".5", b"+1", b"1.", b"-", b"1e", b"true", b"null", b'"1"', b"[]"]
HOSTILE_STRINGS = [b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\u0000"', b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"',
                   b'"\x01"', b'"\\x41"', b'"\\u12"', b'""', b'"' + b"z" * 300 + b'"', b"'x'", b'"\\"',
                   b'"<script>alert(1)</script>"', b'"\'; DROP TABLE alerts; --"', b'"\xe2\x80\xae\xe2\x80\x8f"',
                   b'"\xf0\x9f\x92\x8a"', b'"\\t\\u001f"', b'"2026-11-24T09:00:00"', b'"0001-01-01T00:00:00+14:00"']
HOSTILE_VALUES = [None, True, False, 0, -1, -0.01, 1e7 + 1, 1e300, 2**64, -(2**63), "", "x" * 70, "x" * 300, [], {},
                  [1], {"a": 1}, [[[[]]]], "2026-13-45T99:99:99+08:00", "NaN", "未知", "0000", 1.5, "96.0"]
TIME_OFFSETS = ["+08:00", "+00:00", "Z", "-12:00", "+14:00", "", "+23:59", "+24:00", "+0800", "z"]


class Mutator:
    """Random mutations of valid events; each returns (bytes, expectation or None)."""

    def __init__(self, rnd: random.Random, events: tuple[dict, ...]) -> None:
        self.r = rnd
        self.events = events
        self.raws = [orjson.dumps(e) for e in events]
        self.ops = [  # (weight, name, fn)
            (6, "unchanged", self.unchanged), (10, "flip_byte", self.flip_byte), (6, "flip_bit", self.flip_bit),
            (6, "truncate", self.truncate), (5, "delete_range", self.delete_range),
            (5, "insert_bytes", self.insert_bytes), (3, "duplicate_range", self.duplicate_range),
            (4, "splice", self.splice), (3, "binary", self.binary), (8, "number_token", self.number_token),
            (8, "string_token", self.string_token), (2, "encoding", self.encoding), (5, "dup_key", self.dup_key),
            (1, "deep_nesting", self.deep_nesting), (0.3, "oversize", self.oversize),
            (3, "whitespace", self.whitespace), (8, "drop_field", self.drop_field),
            (10, "hostile_value", self.hostile_value), (6, "items_shape", self.items_shape),
            (6, "item_field", self.item_field), (8, "time_shift", self.time_shift),
            (6, "amounts", self.amounts), (6, "swap_fields", self.swap_fields),
            (1, "many_items", self.many_items), (4, "unicode_ids", self.unicode_ids),
            (3, "stack", self.stack),
        ]
        self.cum = []
        total = 0.0
        for w, _, _ in self.ops:
            total += w
            self.cum.append(total)
        self.total = total

    def pick(self):
        x = self.r.random() * self.total
        for c, (_, name, fn) in zip(self.cum, self.ops):
            if x < c:
                return name, fn
        return self.ops[-1][1:]

    def base(self) -> tuple[dict, bytes]:
        i = self.r.randrange(len(self.events))
        return self.events[i], self.raws[i]

    def copy(self) -> dict:
        return orjson.loads(self.base()[1])

    # ---- byte level
    def unchanged(self):
        return self.base()[1], "valid"

    def flip_byte(self):
        b = bytearray(self.base()[1])
        for _ in range(self.r.randint(1, 4)):
            b[self.r.randrange(len(b))] = self.r.randrange(256)
        return bytes(b), None

    def flip_bit(self):
        b = bytearray(self.base()[1])
        i = self.r.randrange(len(b))
        b[i] ^= 1 << self.r.randrange(8)
        return bytes(b), None

    def truncate(self):
        b = self.base()[1]
        return b[: self.r.randrange(len(b))], "invalid"

    def delete_range(self):
        b = self.base()[1]
        i = self.r.randrange(len(b))
        return b[:i] + b[i + self.r.randint(1, 40):], None

    def insert_bytes(self):
        b = self.base()[1]
        i = self.r.randrange(len(b) + 1)
        return b[:i] + self.r.randbytes(self.r.randint(1, 8)) + b[i:], None

    def duplicate_range(self):
        b = self.base()[1]
        i, j = sorted(self.r.randrange(len(b)) for _ in range(2))
        k = self.r.randrange(len(b))
        return b[:k] + b[i:j] + b[k:], None

    def splice(self):
        a, b = self.base()[1], self.base()[1]
        return a[: self.r.randrange(len(a))] + b[self.r.randrange(len(b)):], None

    def binary(self):
        return self.r.randbytes(self.r.randint(0, 400)), None

    def number_token(self):
        b = self.base()[1]
        ms = list(_NUM.finditer(b))
        if not ms:
            return b, None
        m = self.r.choice(ms)
        return b[: m.start()] + self.r.choice(HOSTILE_NUMBERS) + b[m.end():], None

    def string_token(self):
        b = self.base()[1]
        ms = list(_STR.finditer(b))
        m = self.r.choice(ms)
        return b[: m.start()] + self.r.choice(HOSTILE_STRINGS) + b[m.end():], None

    def encoding(self):
        b = self.base()[1]
        kind = self.r.choice(["bom", "utf-16", "utf-16-le", "utf-32", "latin-1"])
        if kind == "bom":
            return b"\xef\xbb\xbf" + b, None
        if kind == "latin-1":  # the UTF-8 bytes re-encoded as Latin-1 text (mojibake, still UTF-8)
            return b.decode("latin-1").encode("utf-8"), None
        return b.decode().encode(kind), "invalid"

    def dup_key(self):
        ev, b = self.base()
        f = self.r.choice(REQUIRED + ("items", "institution_name", "person_id"))
        other = orjson.loads(self.base()[1]).get(f, self.r.choice(HOSTILE_VALUES))
        if self.r.random() < 0.5:
            other = self.r.choice(HOSTILE_VALUES)
        try:
            extra = f'"{f}":'.encode() + orjson.dumps(other)
        except orjson.JSONEncodeError:
            extra = f'"{f}":0'.encode()
        if self.r.random() < 0.5:
            return b"{" + extra + b"," + b[1:], None
        return b[:-1] + b"," + extra + b"}", None

    def deep_nesting(self):
        b = self.base()[1]
        d = self.r.choice([self.r.randint(1, 900), self.r.randint(900, 5000)])
        o, c = (b"[", b"]") if self.r.random() < 0.7 else (b'{"k":', b"}")
        inner = b"1" if o != b"[" else b""
        where = self.r.random()
        blob = o * d + inner + c * d
        if where < 0.6:
            return b[:-1] + b',"vendor_extra":' + blob + b"}", None
        if where < 0.8:  # inside an item's unknown field
            return b.replace(b'"category":', b'"memo":' + blob + b',"category":', 1), None
        return b"[" * d + b"]" * d, "invalid"

    def oversize(self):
        b = self.base()[1]
        n = self.r.randint(MAX_BYTES - len(b), MAX_BYTES + 4096)
        raw = b[:-1] + b',"pad":"' + b"p" * n + b'"}'
        return raw, ("invalid" if len(raw) > MAX_BYTES else None)

    def whitespace(self):
        """Insignificant whitespace between tokens (never inside a string): still the same valid event."""
        b = self.base()[1]
        out = bytearray()
        in_str = esc = False
        for ch in b:
            out.append(ch)
            if in_str:
                if esc:
                    esc = False
                elif ch == 0x5C:  # backslash
                    esc = True
                elif ch == 0x22:
                    in_str = False
            elif ch == 0x22:
                in_str = True
            elif ch in b",:[]{}" and self.r.random() < 0.3:
                out += self.r.choice([b" ", b"\n", b"\t", b"\r\n ", b"  "])
        return bytes(out), "valid"

    # ---- structure
    def _dump(self, ev) -> bytes:
        try:
            return orjson.dumps(ev)
        except orjson.JSONEncodeError:
            return json.dumps(ev, allow_nan=True).encode("utf-8", "surrogatepass")

    def drop_field(self):
        ev = self.copy()
        f = self.r.choice(FIELDS)
        ev.pop(f, None)
        return self._dump(ev), ("invalid" if f in REQUIRED else None)

    def hostile_value(self):
        ev = self.copy()
        ev[self.r.choice(FIELDS)] = self.r.choice(HOSTILE_VALUES)
        return self._dump(ev), None

    def items_shape(self):
        ev = self.copy()
        ev["items"] = self.r.choice([{}, "", None, 1, True, [1], [[]], [None], {"0": ev.get("items")},
                                     [{"code": "X"}], "[]", [[it] for it in ev.get("items", [])] or {}])
        return self._dump(ev), "invalid"

    def item_field(self):
        ev = self.copy()
        if not ev.get("items"):
            ev["items"] = [dict(_ITEM)]
        it = self.r.choice(ev["items"])
        f = self.r.choice(ITEM_FIELDS + ("extra",))
        if self.r.random() < 0.3:
            it.pop(f, None)
        else:
            it[f] = self.r.choice(HOSTILE_VALUES + [-1e-9, 1e6 + 1, 3661, 10**12])
        return self._dump(ev), None

    def time_shift(self):
        ev = self.copy()
        f = self.r.choice(["event_time", "event_time", "admitted_at", "discharged_at"])
        years = self.r.choice([-200, -40, -27, -26, -1, 0, 1, 5, 30, 7000])
        secs = self.r.choice([0, 1, 86_399, 86_401, 3 * 86_400]) * self.r.choice([1, -1])
        try:
            t = datetime(2026, 11, 24, 9, 13, 5, tzinfo=TZ) + timedelta(days=365.25 * years, seconds=secs)
            s = t.strftime("%Y-%m-%dT%H:%M:%S") + self.r.choice(TIME_OFFSETS)
        except (OverflowError, ValueError):
            s = "0000-00-00T00:00:00+08:00"
        ev[f] = s
        return self._dump(ev), None

    def amounts(self):
        ev = self.copy()
        f = self.r.choice(["total_amount", "fund_paid", "self_paid"])
        v = self.r.choice([-1, -0.001, -1e308, 1e7, 1e7 + 0.01, 1e8, 1e12, 1.7976931348623157e308, 5e-324, 0,
                           ev.get("total_amount", 0) + 0.02])
        ev[f] = v
        if f == "total_amount" and v < 0 or f != "self_paid" and v > 1e7:
            return self._dump(ev), "invalid"
        return self._dump(ev), None

    def swap_fields(self):
        ev = self.copy()
        if self.r.random() < 0.5:  # two fields of the same event trade values
            a, b = self.r.sample([f for f in FIELDS if f in ev] or list(ev), 2) if len(ev) > 1 else ("a", "b")
            ev[a], ev[b] = ev.get(b), ev.get(a)
        else:  # a field from another event
            other = orjson.loads(self.base()[1])
            f = self.r.choice(FIELDS)
            if f in other:
                ev[f] = other[f]
        return self._dump(ev), None

    def many_items(self):
        ev = self.copy()
        n = self.r.choice([0, 0, 200, 200, 1000, 3000])
        ev["items"] = [dict(_ITEM, code=f"XB01ACA{k:03d}") for k in range(n)]
        return self._dump(ev), None

    def unicode_ids(self):
        ev = self.copy()
        f = self.r.choice(["card_id", "event_id", "institution_id", "institution_name", "district", "physician_id"])
        pool = "卡医保\u202e\u200f\u0000\t\x1f:|{}<>&'\"\\💊🏥\ufeff\ud7ff\ue000\U0010ffff A0"
        ev[f] = "".join(self.r.choice(pool) for _ in range(self.r.randint(0, 80)))
        return self._dump(ev), None

    def stack(self):
        """Two mutations on top of each other (the second on the first's bytes when both are bytes)."""
        name, fn = self.pick()
        raw, _ = fn()
        if not raw:
            return raw, None
        b = bytearray(raw)
        for _ in range(self.r.randint(1, 3)):
            b[self.r.randrange(len(b))] = self.r.randrange(256)
        return bytes(b), None


async def isolate_redis_failure(r, msgs: list[Message], exc: Exception) -> tuple[str, bytes | None, str]:
    """Which detector, and which single message (on a fresh run), make ``Processor.process`` fail."""
    from detectors.config import RuleSet

    full = rules()
    for det in full.detectors:
        rs = RuleSet([det], full.lateness_s, full.version, full.versions)

        async def fails(sub: list[Message]) -> Exception | None:
            run = "iso" + uuid.uuid4().hex[:8]
            p = Processor(rs, r, future_tolerance_s=PROC_TOL)
            try:
                await p.process([Message(m.value, {H_RUN_ID: run.encode()}, m.topic, m.partition, m.offset)
                                 for m in sub])
            except Exception as e:  # noqa: BLE001
                return e
            return None

        err = await fails(msgs)
        if err is None:
            continue
        cur = msgs
        while len(cur) > 1:
            half = len(cur) // 2
            e1 = await fails(cur[:half])
            if e1 is not None:
                cur, err = cur[:half], e1
                continue
            e2 = await fails(cur[half:])
            if e2 is not None:
                cur, err = cur[half:], e2
                continue
            break
        one = cur[0].value if len(cur) == 1 else None
        return det.rule, one, f"{'' if one else f'needs {len(cur)} messages together; '}{err}"
    return "(not reproducible on a fresh run)", None, str(exc)


def test_mutation_fuzz_at_least_100k_inputs(stack, capsys, record_property):
    """>= 100,000 mutated inputs: parse_event and Processor.parse properties; a share through Redis too."""
    import redis.asyncio as aioredis

    rnd = random.Random(FUZZ_SEED)
    mut = Mutator(rnd, corpus())
    found = Findings()
    outcome: Counter = Counter()
    by_op: Counter = Counter()
    proc = Processor(rules(), None, future_tolerance_s=PROC_TOL)
    run_ids = [b"fuzz", b"", b"..\xff/../x", b"live"]
    t0 = time.perf_counter()
    batch: list[tuple[bytes | None, str]] = []
    redis_batches: list[list[Message]] = []
    n_batches = 0

    def check_batch(items: list[tuple[bytes | None, str]]) -> None:
        nonlocal n_batches
        n_batches += 1
        msgs: list[Message] = []
        for i, (raw, how) in enumerate(items):
            hdr = {H_RUN_ID: run_ids[i % len(run_ids)]} if i % 7 else {}
            msgs.append(Message(raw, hdr, "settlements", i % 4, i, None))
        # control messages in between: counted, never parsed, never lost
        for j in range(3):
            msgs.insert(rnd.randrange(len(msgs) + 1),
                        Message(b"", {H_RUN_ID: b"fuzz", H_CONTROL: CONTROL_EOF}, "settlements", j, -1))
        now = time.time()
        crashing = []
        expected_dead = []
        for m in msgs:
            if m.headers.get(H_CONTROL) == CONTROL_EOF:
                continue
            if m.value is None:
                expected_dead.append(m)
                continue
            try:
                parse_event(m.value, max_bytes=proc.max_event_bytes, future_tolerance_s=PROC_TOL, now=now)
            except InvalidEvent:
                expected_dead.append(m)
            except Exception:  # noqa: BLE001 - already reported by check_one
                crashing.append(m)
        try:
            by_run, res = proc.parse(msgs)
        except Exception as exc:  # noqa: BLE001
            found.add(f"Processor.parse raised {type(exc).__name__} for the whole batch "
                      "(one hostile message stops the batch: the worker exits and the batch is redelivered forever)",
                      "batch", crashing[0].value if crashing else None)
            msgs = [m for m in msgs if m not in crashing]
            try:
                by_run, res = proc.parse(msgs)
            except Exception as exc2:  # noqa: BLE001
                found.add(f"Processor.parse raised {type(exc2).__name__} even without the crashing messages",
                          "batch", None)
                return
        if [dl.message for dl in res.dead_letters] != expected_dead:
            found.add("dead letters are not exactly the messages parse_event refuses", "batch", None)
        for dl in res.dead_letters:
            if not (isinstance(dl.reason, str) and dl.reason.strip()):
                found.add("dead letter without a reason", "batch", dl.message.value)
            if dl.message.value is None and dl.message not in expected_dead:
                found.add("dead letter lost its original bytes", "batch", None)
        orig = {id(m): m.value for m in msgs}
        if any(orig.get(id(dl.message), object()) is not dl.message.value for dl in res.dead_letters):
            found.add("a dead letter does not carry the original bytes object", "batch", None)
        n_in = len(msgs)
        n_out = sum(res.processed.values()) + sum(res.invalid.values()) + len(res.eofs)
        if n_in != n_out or len(res.dead_letters) != sum(res.invalid.values()):
            found.add(f"messages lost or double counted: {n_in} in, {n_out} out", "batch", None)
        if n_batches % REDIS_EVERY == 0:
            redis_batches.append(msgs)

    for _ in range(FUZZ_CASES):
        name, fn = mut.pick()
        raw, expect = fn()
        by_op[name] += 1
        outcome[check_one(raw, name, expect, found)] += 1
        batch.append((raw, name))
        if rnd.random() < 0.002:
            batch.append((None, "no value"))
        if len(batch) >= BATCH:
            check_batch(batch)
            batch = []
    if batch:
        check_batch(batch)
    t_parse = time.perf_counter() - t0

    # a share of the mutated batches through every enabled detector on the real Redis
    async def through_redis():
        r = aioredis.from_url(stack.redis_url)
        run = "fuzz" + uuid.uuid4().hex[:8]
        try:
            p = Processor(rules(), r, future_tolerance_s=PROC_TOL)
            n_alerts = 0
            for msgs in redis_batches:
                safe = [Message(m.value, {**m.headers, H_RUN_ID: run.encode()}, m.topic, m.partition, m.offset)
                        for m in msgs]
                try:
                    res = await p.process(safe)
                except Exception as exc:  # noqa: BLE001
                    rule, raw, why = await isolate_redis_failure(r, safe, exc)
                    found.add(f"Processor.process raised {type(exc).__name__} in detector {rule} on a batch of "
                              "accepted mutated events (the worker exits; the batch is redelivered forever)",
                              "redis", raw, why[:600])
                    continue
                for a in res.alerts:
                    n_alerts += 1
                    errs = list(_alert_validator.iter_errors(msgspec.to_builtins(a)))
                    if errs:
                        found.add(f"{a.rule} alert outside alert.schema.json: {errs[0].message[:100]}", "redis", None)
            return n_alerts
        finally:
            await r.aclose()

    t1 = time.perf_counter()
    n_alerts = asyncio.run(through_redis())
    t_redis = time.perf_counter() - t1
    n = sum(by_op.values())
    STATS["mutation"] += n
    record_property("fuzz_cases", n)
    record_property("fuzz_seconds", round(t_parse + t_redis, 1))
    with capsys.disabled():
        print(f"\n[fuzz] {n:,} mutated inputs (seed {FUZZ_SEED}) in {t_parse:.1f} s: {dict(outcome)}; "
              f"{n_batches} Processor.parse batches; {len(redis_batches)} batches through Redis "
              f"({n_alerts} alerts) in {t_redis:.1f} s; hypothesis: {dict(STATS)}")
    assert n >= 100_000
    assert outcome["valid"] > 1000 and outcome["invalid"] > 10_000, "the fuzzer must exercise both sides"
    assert not found, f"\n{found.report()}"


def test_fast_schema_check_agrees_with_jsonschema():
    """The fast contract check used by the fuzzer gives jsonschema's verdict (valid events and mutated ones)."""
    rnd = random.Random(7)
    mut = Mutator(rnd, corpus()[:200])
    docs = [dict(e) for e in corpus()[:200]]
    for _ in range(1500):
        _, fn = mut.pick()
        raw, _ = fn()
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        docs.append(d)
    n_bad = 0
    for d in docs:
        fast = not schema_errors(SCHEMA, d)
        slow = _validator.is_valid(d)
        assert fast == slow, f"fast {fast} vs jsonschema {slow} on {str(d)[:300]}: {schema_errors(SCHEMA, d)}"
        n_bad += not slow
    assert n_bad > 100 and len(docs) - n_bad > 200
