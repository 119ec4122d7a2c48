"""Settlement parsing against the contract: valid events pass, every kind of bad input gets a reason."""

from __future__ import annotations

import orjson
import pytest

from stream.events import InvalidEvent, parse_event
from tests.conftest import CONTRACT
from tests.helpers import make_event

EXAMPLES = (CONTRACT / "example-events.jsonl").read_bytes().splitlines()


def test_contract_examples_parse_and_keep_their_bytes():
    for line in EXAMPLES:
        ev = parse_event(line, now=2e9)
        assert ev.raw == line
        assert ev.event_id == orjson.loads(line)["event_id"]


def test_extra_fields_are_allowed_and_preserved():
    raw = orjson.dumps(make_event(vendor_extra={"x": "<b>1</b>"}))
    ev = parse_event(raw, now=2e9)
    assert orjson.loads(ev.raw)["vendor_extra"] == {"x": "<b>1</b>"}


def test_event_time_offsets_are_honoured():
    a = parse_event(orjson.dumps(make_event(event_time="2026-11-24T09:00:00+08:00")), now=2e9)
    b = parse_event(orjson.dumps(make_event(event_time="2026-11-24T01:00:00+00:00")), now=2e9)
    assert a.ts == b.ts


def _bad(**over):
    ev = make_event()
    for k, v in over.items():
        if v is ...:
            del ev[k]
        else:
            ev[k] = v
    return orjson.dumps(ev)


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "Expected `object`, got `array`"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"", "not valid JSON"),
    (_bad(card_id=...), "Object missing required field `card_id`"),
    (_bad(card_id=42), "Expected `str`, got `int` - at `$.card_id`"),
    (_bad(card_id=""), "Expected `str` of length >= 1 - at `$.card_id`"),
    (_bad(items="drugs"), "Expected `array`, got `str` - at `$.items`"),
    (_bad(total_amount=-5), "Expected `float` >= 0.0 - at `$.total_amount`"),
    (_bad(total_amount=1e12), "- at `$.total_amount`"),
    (_bad(visit_type="spa"), "Invalid enum value 'spa' - at `$.visit_type`"),
    (_bad(event_time="yesterday"), "at `$.event_time`"),
    (_bad(event_time="2026-11-24T09:00:00"), "event_time has no UTC offset"),
    (_bad(event_time="1970-01-01T00:00:00+08:00"), "is before 2000"),
    (_bad(event_time="2099-01-01T00:00:00+08:00"), "in the future"),
    (_bad(fund_paid=500.0), "fund_paid 500.0 exceeds total_amount 96.0"),
    (_bad(items=[{"code": "X", "category": "drug", "quantity": 0, "amount": 1}]),
     "Expected `float` > 0.0 - at `$.items[0].quantity`"),
    (b'{"event_id": "' + b"x" * 300_000 + b'"}', "exceeds max_event_bytes=262144"),
])
def test_invalid_input_is_rejected_with_a_reason(raw, reason):
    with pytest.raises(InvalidEvent) as exc:
        parse_event(raw, now=1.9e9)
    assert reason in str(exc.value)
