"""One contract for every detector.

river's ``learn_one`` / ``score_one`` is the model, adapted to a stream that is
processed a fetched batch at a time with one Redis round trip per batch:

* ``queue(pipe, events, ns)`` adds the detector's Redis work for the whole batch to
  a shared pipeline (typically one ``EVALSHA`` of a Lua script) and returns how many
  replies it will read. Learning (updating the windows) and scoring happen
  together, atomically, inside Redis, in event time.
* ``collect(events, replies, ns)`` turns its replies into :class:`~alerts.model.Alert`s.

Parameters are constructor arguments, validated there with messages that name
the field and the value; units are in the names (``window_s``). Redis keys are
derived from the parameters and the subject: ``cw:{run}:{rule}:{window_s}:{card}``.

Per-card state lives in one Redis hash per card (:func:`card_key`), one field per rule named
from its parameters (``card_hopping:86400,604800``), so a card costs one key, not one per rule
and window: fewer keys is less memory and far fewer cache misses in Redis. A detector that
keeps card state names the hash it uses (``card_hash``: ``"c"`` for recent activity, ``"h"``
for calendar history) and how long after a card's last event it needs it (``card_ttl_s``);
the processor sets the hash's TTL once per card and batch to the largest of them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import orjson

from alerts.model import Alert
from stream.events import Settlement


#: Lua shared by detectors that keep episodes (prepend it to a script): the episode of ``ek`` that event
#: time ``t`` belongs to, extended while firing events stay within ``window`` of its last one; a new
#: episode starts otherwise (and its evidence set ``vk`` is cleared). Returns the episode start.
EPISODE_LUA = r"""
local function episode(ek, vk, t, window)
  local ep = redis.call('HMGET', ek, 'start', 'last')
  local start = tonumber(ep[1])
  local last = tonumber(ep[2])
  if start and (t - last) <= window and t >= start - window then
    if t > last then redis.call('HSET', ek, 'last', t) end
  else
    start = t
    redis.call('HSET', ek, 'start', t, 'last', t)
    redis.call('DEL', vk)
  end
  return start
end
"""


#: Lua shared by rules that keep sorted event lists as cjson arrays in a card-hash field (prepend it):
#: ``bytes_lt`` orders strings byte by byte, as a sorted set orders members (Lua's ``<`` is locale
#: strcoll); cjson keeps 14 digits of a number, so ``times_save`` writes a fractional event time as
#: ``%.17g`` text and ``times_load`` reads it back exactly (the times sit every ``step`` values from ``first``).
TIMES_LUA = r"""
local function bytes_lt(a, b)
  for k = 1, math.min(#a, #b) do
    local x, y = string.byte(a, k), string.byte(b, k)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function times_load(st, first, step)
  for m = first, #st, step do
    if type(st[m]) == 'string' then st[m] = tonumber(st[m]) end
  end
  return st
end
local function times_save(st, first, step)
  for m = first, #st, step do
    if st[m] % 1 ~= 0 then st[m] = string.format('%.17g', st[m]) end
  end
  return cjson.encode(st)
end
"""


@dataclass(frozen=True)
class Namespace:
    """Where a run's state lives: ``cw:{run_id}`` (``live`` for the live stream)."""

    run_id: str

    @property
    def prefix(self) -> str:
        return f"cw:{self.run_id}"

    def card_prefix(self, card_hash: str) -> str:
        """Prefix of a run's per-card hashes; the card id is appended (in Lua: ``cp .. card``).

        >>> Namespace("live").card_prefix("c") + "3101"
        'cw:live:c:3101'
        """
        return f"{self.prefix}:{card_hash}:"


def card_key(ns: Namespace, card_hash: str, card: str) -> str:
    """The Redis hash holding one card's state for every rule that uses ``card_hash``.

    >>> card_key(Namespace("r1"), "h", "3101")
    'cw:r1:h:3101'
    """
    return ns.card_prefix(card_hash) + card


#: Lua shared by scripts that expire keys once per batch (prepend it): ``now_ms()`` is the server's time in
#: ms, ``expire_at(ttl)`` now + ``ttl`` seconds as a ``PEXPIREAT`` time (text, ms). One absolute time for a
#: batch's keys is cheaper than an ``EXPIRE`` each: Redis rewrites every ``EXPIRE`` into a ``PEXPIREAT`` anyway.
EXPIRE_AT_LUA = r"""
local function now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
local function expire_at(ttl)
  return string.format('%d', now_ms() + ttl * 1000)
end
"""


#: Lua run once per batch, card hash and run by the processor: expire every card hash touched
#: (ARGV[1] the hash prefix, ARGV[2] the TTL in seconds, ARGV[3] the distinct card ids as a JSON array).
TOUCH_LUA = EXPIRE_AT_LUA + r"""
local p = ARGV[1]
local at = expire_at(tonumber(ARGV[2]))
local cards = cjson.decode(ARGV[3])
for i = 1, #cards do redis.call('PEXPIREAT', p .. cards[i], at) end
return #cards
"""
#: the card hashes a detector may use
CARD_HASHES = ("c", "h")


class Memo(dict):
    """``key -> fn(key)``, computed on first sight: a queue-side cache for what recurs from event to event
    (diagnoses, peer groups, drug codes, institutions). Bounded: a full memo starts over (what recurs changes
    slowly, so a long stream keeps its hits).

    >>> m = Memo(str.upper, limit=2)
    >>> m["a"], m["b"], len(m), m["c"], len(m)
    ('A', 'B', 2, 'C', 1)
    """

    __slots__ = ("fn", "limit")

    def __init__(self, fn: Any, limit: int = 100_000) -> None:
        super().__init__()
        self.fn = fn
        self.limit = limit

    def __missing__(self, key: Any) -> Any:
        if len(self) >= self.limit:
            self.clear()
        value = self[key] = self.fn(key)
        return value


def check_positive(owner: str, name: str, value: Any, *, integer: bool = False) -> None:
    """Raise ``ValueError`` naming the parameter unless ``value`` is a positive number.

    >>> check_positive("card_hopping", "window_s", -5)
    Traceback (most recent call last):
    ...
    ValueError: card_hopping: window_s must be a positive number, got -5
    """
    kind = "integer" if integer else "number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive {kind}, got {value!r}")


def config_version(cfg: Any) -> str:
    """Stable short hash of a rule's configuration (its ``rule_version``).

    >>> config_version({"b": 1, "a": [2, 3]}) == config_version({"a": [2, 3], "b": 1})
    True
    """
    return hashlib.sha256(orjson.dumps(cfg, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


class Detector(ABC):
    """Base class of every rule and model (see the module docstring)."""

    rule: ClassVar[str]
    subject_type: ClassVar[str] = "card"
    #: Lua sources this detector runs; the processor loads them (``SCRIPT LOAD``) before use
    scripts: ClassVar[tuple[str, ...]] = ()
    #: the per-card hash this detector keeps its card state in (``"c"`` recent, ``"h"`` calendar
    #: history; ``""`` none) and how long after a card's last event it needs it (event-time rules
    #: add their ``lateness_s``); the processor expires each card hash at the largest such TTL
    card_hash: ClassVar[str] = ""
    card_ttl_s: int = 0

    def __init__(self, *, lateness_s: int = 3600, lang: str = "zh", version: str = "") -> None:
        if isinstance(lateness_s, bool) or not isinstance(lateness_s, int) or lateness_s < 0:
            raise ValueError(f"{self.rule}: lateness_s must be a non-negative integer, got {lateness_s!r}")
        if lang not in ("zh", "en"):
            raise ValueError(f"{self.rule}: lang must be 'zh' or 'en', got {lang!r}")
        self.lateness_s = lateness_s
        self.lang = lang
        self.version = version

    @staticmethod
    def sha(script: str) -> str:
        """The ``EVALSHA`` digest of a Lua source."""
        return hashlib.sha1(script.encode()).hexdigest()

    def key(self, ns: Namespace, *parts: Any) -> str:
        return ":".join([ns.prefix, self.rule, *map(str, parts)])

    @abstractmethod
    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        """Queue this batch's Redis work on ``pipe``; return the number of replies to read."""

    @abstractmethod
    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        """Turn this detector's replies into alerts (one per rule, subject and episode)."""

    def params(self) -> dict[str, Any]:
        """The constructor parameters (for docs and ``rule_version``)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
