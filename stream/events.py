"""The settlement event: parse and validate one Kafka message, fast.

Follows ``shared/contract/settlement-event.schema.json``. Unknown fields are
allowed; the original bytes are kept on the parsed event (``raw``) so nothing a
source sent is lost as evidence.

>>> ev = parse_event(b'{"event_id":"E1","event_time":"2026-11-24T09:13:05+08:00",'
...     b'"card_id":"C1","institution_id":"H1","institution_type":"hospital",'
...     b'"district":"310104","visit_type":"outpatient","items":[],'
...     b'"total_amount":44.0,"fund_paid":30.8,"extra":"kept"}')
>>> ev.card_id, ev.ts
('C1', 1795482785.0)
>>> parse_event(b'{"event_id": 5}')
Traceback (most recent call last):
...
stream.events.InvalidEvent: Expected `str`, got `int` - at `$.event_id`
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

MAX_AMOUNT_CNY = 10_000_000.0
MIN_EVENT_YEAR = 2000
_MIN_TS = 946684800.0  # 2000-01-01T00:00:00Z

NonEmpty64 = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Money = Annotated[float, msgspec.Meta(ge=0, le=MAX_AMOUNT_CNY)]


class InvalidEvent(ValueError):
    """A message that is not a valid settlement; ``str(exc)`` is the reason."""


class Item(msgspec.Struct, forbid_unknown_fields=False):
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    category: Literal["drug", "exam", "treatment", "material", "registration", "bed", "other"]
    quantity: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)]
    amount: Money
    name: str | None = None
    unit_price: Annotated[float, msgspec.Meta(ge=0, le=MAX_AMOUNT_CNY)] | None = None
    days_supply: Annotated[int, msgspec.Meta(ge=0, le=3660)] | None = None
    trace_codes: list[Annotated[str, msgspec.Meta(min_length=1, max_length=128)]] = []


class Settlement(msgspec.Struct, forbid_unknown_fields=False):
    event_id: NonEmpty64
    event_time: datetime
    card_id: NonEmpty64
    institution_id: NonEmpty
    institution_type: Literal["hospital", "community", "pharmacy"]
    district: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    visit_type: Literal["outpatient", "emergency", "inpatient", "pharmacy"]
    items: list[Item]
    total_amount: Money
    fund_paid: Money
    person_id: str | None = None
    birth_year: Annotated[int, msgspec.Meta(ge=1900, le=2100)] | None = None
    gender: Literal["M", "F"] | None = None
    insured_category: Literal["employee", "retiree", "resident", "child"] | None = None
    institution_name: str | None = None
    institution_level: Literal[1, 2, 3] | None = None
    department: str | None = None
    physician_id: str | None = None
    admission_id: str | None = None
    admitted_at: datetime | None = None
    discharged_at: datetime | None = None
    diagnoses: list[str] = []
    self_paid: Money | None = None
    # filled in by parse_event, never read from the message
    ts: float = 0.0
    raw: bytes = b""
    partition: int = -1


_decoder = msgspec.json.Decoder(Settlement)


def _decode(decoder: msgspec.json.Decoder, raw: bytes, max_bytes: int) -> Any:
    """``decoder.decode(raw)``, any failure raised as :class:`InvalidEvent` with the reason."""
    if len(raw) > max_bytes:
        raise InvalidEvent(f"message of {len(raw)} bytes exceeds max_event_bytes={max_bytes}")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidEvent("not valid JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"not valid UTF-8 at byte {exc.start}") from None


def parse_event(raw: bytes, *, max_bytes: int = 256 * 1024, future_tolerance_s: float = 86_400,
                now: float | None = None) -> Settlement:
    """Decode and validate one message; raise :class:`InvalidEvent` with the reason."""
    ev = _decode(_decoder, raw, max_bytes)
    try:
        raw.decode("utf-8")  # msgspec skips unknown fields without checking them; evidence must be valid text
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"not valid UTF-8 at byte {exc.start}") from None
    t = ev.event_time
    if t.tzinfo is None:
        raise InvalidEvent("event_time has no UTC offset - at `$.event_time`")
    ts = t.timestamp()
    if ts < _MIN_TS:
        raise InvalidEvent(f"event_time {t.isoformat()} is before {MIN_EVENT_YEAR} - at `$.event_time`")
    limit = (time.time() if now is None else now) + future_tolerance_s
    if ts > limit:
        raise InvalidEvent(f"event_time {t.isoformat()} is more than {future_tolerance_s:.0f} s in the future - at `$.event_time`")
    for name in ("admitted_at", "discharged_at"):
        v = getattr(ev, name)
        if v is not None and v.tzinfo is None:
            raise InvalidEvent(f"{name} has no UTC offset - at `$.{name}`")
    if ev.fund_paid > ev.total_amount + 0.01:
        raise InvalidEvent(f"fund_paid {ev.fund_paid} exceeds total_amount {ev.total_amount}")
    ev.ts = ts
    ev.raw = raw
    return ev


class _Keyed(msgspec.Struct, forbid_unknown_fields=False):
    card_id: NonEmpty64


_key_decoder = msgspec.json.Decoder(_Keyed)


def event_key(raw: bytes, *, max_bytes: int = 256 * 1024) -> bytes:
    """The partitioning key of a message (its ``card_id``, UTF-8), checking only what partitioning needs:
    size, JSON syntax, and a ``card_id``. About a seventh of :func:`parse_event`'s time; the worker parses
    and validates every message in full (and dead-letters what fails), so a replay need not do it twice.

    >>> event_key(b'{"card_id":"C1","event_time":"no time"}')
    b'C1'
    >>> event_key(b'{"event_id":"E1"}')
    Traceback (most recent call last):
    ...
    stream.events.InvalidEvent: Object missing required field `card_id`
    """
    return _decode(_key_decoder, raw, max_bytes).card_id.encode()


def iso(ts: float, tz_hours: int = 8) -> str:
    """Event-time seconds to ISO 8601 with the given UTC offset (default +08:00).

    >>> iso(1795482785.0)
    '2026-11-24T09:13:05+08:00'
    """
    from datetime import timedelta, timezone

    return datetime.fromtimestamp(ts, timezone(timedelta(hours=tz_hours))).isoformat(timespec="seconds")
