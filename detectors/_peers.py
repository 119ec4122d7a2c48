"""Peer groups, calendar buckets and fixed-bucket histograms shared by the card rules.

``visit_frequency`` (就诊次数异常) and ``cost_anomaly`` (就诊费用异常) compare a card's
month-to-date value (visits, CNY) with its *peers*: cards of the same insured category
(在职/退休/居民/少儿), age band and ICD-10 chapter of the primary diagnosis. A 门诊大病
(major outpatient disease: dialysis N18.5, cancer treatment, transplant …) diagnosis defines a
group of its own across categories and ages, so a dialysis patient going three times a week
is compared with dialysis patients, never with young employees with a cold. A group with
fewer than ``min_peer_size`` other members is not judged at all.

The peer distribution is a fixed-bucket histogram kept incrementally in Redis as *daily
deltas*: when a card's month-to-date value moves from bucket ``b0`` to ``b1`` on day ``d``,
the delta hash ``…:peer:{YYYY-MM}:{group}:{d}`` gets ``b0 -= 1, b1 += 1`` (one ``HINCRBY``
when the card joins). The histogram of every member's value *as of the end of day R* is the
sum of the deltas of days 1..R (its member count is the sum of its buckets). An event at
time ``t`` is compared with the snapshot of the last day ``R`` that was complete at ``t``
(``R``'s end + lateness <= ``t``), so the verdict is a function of event time only, never of
how partitions interleave; the card's own value as of ``R`` is taken out of the snapshot. The
bound is ``max(floor, factor x the peers' q-quantile)`` — the top of the group times a margin —
with the quantile read as the upper edge of its bucket (exact for unit buckets).

A card's month state keeps its groups (base ``category|band`` and diagnosis key; unknown parts
are filled in later and a 门诊大病 diagnosis always wins, moving the card) and, per day it had
an event, its value and group after that day.

Calendar state (both rules): one field of the per-card hash ``h`` (:func:`detectors.base.card_key`)
per rule, a MessagePack array ``[years, months]`` (``cmsgpack`` in Lua: numbers in binary, about
2x faster to write than cjson's and a third smaller) with the buckets ordered by their end
(epoch seconds): a year ``[end, ...counts]``, a month ``[end, ...counts, evidence, ..., h,
groups]`` where evidence is ``[event_id, time, ...]`` ordered by (time, id), ``h`` is ``[day,
value, group number, ...]`` ordered by day and groups ``[base, dx, ...]``. A month (a year) is
kept until the card's newest event is ``lateness_s`` + :data:`REDELIVERY_S` past its end: every
event within lateness, and a redelivered batch, still finds it; an event of a month no longer
kept is late and ignored. The hash expires ``card_ttl_s`` (a year + lateness) after the card's
last event.

>>> dx_key("N18.500", ("N18.5", "C")), dx_key("J06.9", ("N18.5",)), dx_key(None, ())
('S:N18.5', 'C:X', '?')
>>> age_band(67, (0, 18, 60, 70)), age_band(None, (0, 18)), age_band(5, (0, 7))
('60-69', '?', '0-6')
>>> PeerSpec("visit_frequency", {"min_visits": 8, "quantile": 0.99, "factor": 2.0, "min_peer_size": 30,
...          "age_bands_years": [0, 18, 60], "buckets": [1, 2, 3]}, floor_field="min_visits", integer=True)
PeerSpec(floor=8, quantile=0.99, factor=2.0, min_peer_size=30)
>>> PeerSpec("visit_frequency", {"min_visits": 8, "quantile": 1.5}, floor_field="min_visits", integer=True)
Traceback (most recent call last):
...
ValueError: visit_frequency: peers.quantile must be a number between 0.5 and 1 (exclusive), got 1.5
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from struct import Struct
from typing import Any, Iterator, Sequence

from msgspec import Raw
from msgspec.msgpack import encode as _pack

from detectors.base import check_positive

#: calendar buckets (day, month, year) are local time in Shanghai
TZ_OFFSET_S = 8 * 3600
TZ = timezone(timedelta(seconds=TZ_OFFSET_S))
_EPOCH_ORD = date(1970, 1, 1).toordinal()

# ICD-10 chapters (first three characters) -> chapter, Chinese name
_CHAPTERS: tuple[tuple[str, str, str, str], ...] = (
    ("A00", "B99", "I", "传染病和寄生虫病"), ("C00", "D48", "II", "肿瘤"), ("D50", "D89", "III", "血液及免疫疾病"),
    ("E00", "E90", "IV", "内分泌营养代谢疾病"), ("F00", "F99", "V", "精神和行为障碍"), ("G00", "G99", "VI", "神经系统疾病"),
    ("H00", "H59", "VII", "眼和附器疾病"), ("H60", "H95", "VIII", "耳和乳突疾病"), ("I00", "I99", "IX", "循环系统疾病"),
    ("J00", "J99", "X", "呼吸系统疾病"), ("K00", "K93", "XI", "消化系统疾病"), ("L00", "L99", "XII", "皮肤和皮下组织疾病"),
    ("M00", "M99", "XIII", "肌肉骨骼系统疾病"), ("N00", "N99", "XIV", "泌尿生殖系统疾病"), ("O00", "O99", "XV", "妊娠分娩和产褥期"),
    ("P00", "P96", "XVI", "围生期情况"), ("Q00", "Q99", "XVII", "先天性畸形"), ("R00", "R99", "XVIII", "症状和体征"),
    ("S00", "T98", "XIX", "损伤和中毒"), ("V01", "Y98", "XX", "外因"), ("Z00", "Z99", "XXI", "影响健康状态的因素"),
    ("U00", "U99", "XXII", "特殊目的编码"),
)
_CHAPTER_NAME = {c: n for _, _, c, n in _CHAPTERS}
CATEGORY_ZH = {"employee": "在职职工", "retiree": "退休人员", "resident": "城乡居民", "child": "少儿"}


def icd_chapter(code: str | None) -> str | None:
    """ICD-10 chapter (roman numeral) of a diagnosis code, ``None`` when it is not ICD-10 shaped.

    >>> icd_chapter("I10"), icd_chapter("d61.9"), icd_chapter("T78.4"), icd_chapter("xyz")
    ('IX', 'III', 'XIX', None)
    """
    if not code:
        return None
    c = code.strip().upper()[:3]
    if len(c) < 3 or not c[0].isalpha() or not c[1:3].isdigit():
        return None
    for lo, hi, chapter, _ in _CHAPTERS:
        if lo <= c <= hi:
            return chapter
    return None


@lru_cache(maxsize=4096)
def _dx_key(code: str | None, special: tuple[str, ...]) -> str:
    if not code:
        return "?"
    c = code.strip().upper()
    for p in special:
        if c.startswith(p):
            return "S:" + p
    ch = icd_chapter(c)
    return "C:" + ch if ch else "?"


def dx_key(code: str | None, special_prefixes: Sequence[str]) -> str:
    """Peer key of a primary diagnosis: ``S:<prefix>`` for a 门诊大病 code, ``C:<chapter>``, ``?`` if none."""
    return _dx_key(code, tuple(special_prefixes))


def is_special(key: str) -> bool:
    return key.startswith("S:")


def dx_label(key: str, lang: str) -> str:
    """Human name of a diagnosis key: ``门诊大病 N18.5`` / ``IX 循环系统疾病``."""
    if key.startswith("S:"):
        return ("major outpatient disease " if lang == "en" else "门诊大病 ") + key[2:]
    if key.startswith("C:"):
        ch = key[2:]
        return f"ICD-10 chapter {ch}" if lang == "en" else f"{ch} {_CHAPTER_NAME.get(ch, '')}".strip()
    return "diagnosis unknown" if lang == "en" else "诊断不详"


def group_label(base: str, dx: str, lang: str) -> str:
    """``退休人员 70-79 岁 IX 循环系统疾病`` for a peer group (``*`` parts are left out)."""
    cat, _, band = base.partition("|")
    parts = []
    if cat not in ("*", "?"):
        parts.append(cat if lang == "en" else CATEGORY_ZH.get(cat, cat))
    if band not in ("*", "?", ""):
        parts.append(f"aged {band}" if lang == "en" else f"{band} 岁")
    parts.append(dx_label(dx, lang))
    return " ".join(parts)


def age_band(age: int | None, bands: Sequence[int]) -> str:
    """Label of the age band (``bands`` = ascending lower edges) holding ``age``; ``?`` if unknown."""
    if age is None or age < 0:
        return "?"
    k = -1
    for i, lo in enumerate(bands):
        if age >= lo:
            k = i
    if k < 0:
        return "?"
    if k == len(bands) - 1:
        return f"{bands[k]}+"
    return f"{bands[k]}-{bands[k + 1] - 1}"


# ----------------------------------------------------------------------------- calendar

def local_day(ts: float) -> int:
    """Local (+08:00) calendar day number of an event time (days since 1970-01-01)."""
    return int((ts + TZ_OFFSET_S) // 86400)


def day_start(day: int) -> int:
    """Epoch seconds of local midnight that starts ``day``."""
    return day * 86400 - TZ_OFFSET_S


@lru_cache(maxsize=1024)
def _day_info(day: int) -> tuple[str, int, int, int, str, int, int, int]:
    d = date.fromordinal(day + _EPOCH_ORD)
    nxt = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
    month_start = day_start(date(d.year, d.month, 1).toordinal() - _EPOCH_ORD)
    month_end = day_start(nxt.toordinal() - _EPOCH_ORD)
    year_start = day_start(date(d.year, 1, 1).toordinal() - _EPOCH_ORD)
    year_end = day_start(date(d.year + 1, 1, 1).toordinal() - _EPOCH_ORD)
    return f"{d.year:04d}-{d.month:02d}", d.day, month_start, month_end, f"{d.year:04d}", year_start, year_end, d.year


class Calendar:
    """Event-time calendar buckets of one event (local +08:00) and its reference day for peers.

    >>> from stream.events import iso
    >>> c = Calendar(datetime(2026, 11, 2, 0, 30, tzinfo=TZ).timestamp(), lateness_s=3600)
    >>> c.month, c.dom, c.year, iso(c.month_end), c.ref_dom
    ('2026-11', 2, '2026', '2026-12-01T00:00:00+08:00', 0)
    >>> Calendar(datetime(2026, 11, 2, 1, 0, tzinfo=TZ).timestamp(), lateness_s=3600).ref_dom
    1
    """

    __slots__ = ("day", "month", "dom", "month_start", "month_end", "year", "year_start", "year_end", "ref_dom",
                 "year_no")

    def __init__(self, ts: float, lateness_s: int) -> None:
        self.day = local_day(ts)
        (self.month, self.dom, self.month_start, self.month_end, self.year, self.year_start, self.year_end,
         self.year_no) = _day_info(self.day)
        ref = local_day(ts - lateness_s) - 1          # last day complete at ts (its end + lateness <= ts)
        self.ref_dom = max(0, self.dom - (self.day - ref))


    def bounds(self, window: str) -> tuple[str, int, int]:
        """(bucket label, start, end) of the event's ``month`` or ``year`` bucket."""
        if window == "month":
            return self.month, self.month_start, self.month_end
        return self.year, self.year_start, self.year_end


def event_year(ts: float) -> int:
    return _day_info(local_day(ts))[7]


def buckets_of(ts: float, lateness_s: int) -> tuple[int, str, int, str, int, int, int]:
    """Fast path of :class:`Calendar` for ``queue``: (day of month, month, month end, year, year end, year
    number, reference day of month)."""
    day = int((ts + TZ_OFFSET_S) // 86400)
    month, dom, _, month_end, year, _, year_end, year_no = _day_info(day)
    ref = int((ts - lateness_s + TZ_OFFSET_S) // 86400) - 1
    return dom, month, month_end, year, year_end, year_no, max(0, dom - (day - ref))


def cal_rows(batch: "CalBatch", evs: Sequence[tuple[int, Any]], lateness_s: int) -> Iterator[tuple]:
    """A calendar rule's ``queue`` loop over its events ``(index, event)``: per event ``(index, event, t, once,
    day of month, month index in ``batch``, month end, year end, year number, reference day of month)``, with
    ``t`` the event time as card states keep it (:func:`event_time`) and ``once`` whether the event is its
    card's only one among ``evs``. :func:`buckets_of` depends on the day and the reference day only, so it
    runs when one of them changes (a few times a batch), not for every event.

    >>> from datetime import datetime
    >>> ts = datetime(2026, 11, 24, 9, 30, tzinfo=TZ).timestamp()
    >>> a, b = (type("Ev", (), {"ts": ts, "card_id": c}) for c in ("C1", "C2"))
    >>> [(i, t, once, dom, mi, year_no) for i, _, t, once, dom, mi, _, _, year_no, _ in
    ...  cal_rows(CalBatch(), [(0, a), (1, b), (2, a)], 3600)]
    [(0, 1795483800, False, 24, 1, 2026), (1, 1795483800, True, 24, 1, 2026), (2, 1795483800, False, 24, 1, 2026)]
    """
    seen: dict[str, int] = {}
    for _, ev in evs:
        seen[ev.card_id] = seen.get(ev.card_id, 0) + 1
    month_of = batch.month
    day = ref = -1
    dom = mi = month_end = year_end = year_no = ref_dom = 0
    for i, ev in evs:
        ts = ev.ts
        d, r = int((ts + TZ_OFFSET_S) // 86400), int((ts - lateness_s + TZ_OFFSET_S) // 86400)
        if d != day or r != ref:
            day, ref = d, r
            dom, month, month_end, _, year_end, year_no, ref_dom = buckets_of(ts, lateness_s)
            mi = month_of(month, month_end, year_end)
        t = int(ts)   # event_time(ts), inline
        if t != ts:
            t = ts
        yield i, ev, t, seen[ev.card_id] == 1, dom, mi, month_end, year_end, year_no, ref_dom


#: how long past a month's (year's) end + lateness a card keeps it, in event time of the card's newest event:
#: a crash can make the worker redeliver the (at most two) batches it had not committed, and their events
#: must find their months to give the same verdicts again
REDELIVERY_S = 86400


def event_time(ts: float) -> float:
    """An event time as the card states keep it: whole seconds as an integer (shorter), else as it is.

    >>> event_time(1795482785.0), event_time(1795482785.98765)
    (1795482785, 1795482785.98765)
    """
    return int(ts) if ts.is_integer() else ts


def fresh_time(t: float | int) -> bool:
    """Can a card's first state, holding event time ``t``, be built in Python byte for byte as Lua's cmsgpack
    writes it? (``msgspec`` writes every float as float64, cmsgpack a float that float32 holds exactly as
    float32: such times — small test values — take the Lua path.)

    >>> fresh_time(1795482785), fresh_time(1795482785.25), fresh_time(1000.5)
    (True, True, False)
    """
    if isinstance(t, int):
        return True
    try:
        return _F32.unpack(_F32.pack(t))[0] != t
    except OverflowError:
        return True


_F32 = Struct("<f")


def mp_str(body: bytes) -> Raw:
    """``body`` as a MessagePack *str* (Redis 7.0's cmsgpack does not read *bin*), to embed in a batch's rows.

    >>> bytes(mp_str(b"ab")), bytes(mp_str(b"x" * 40))[:2]
    (b'\\xa2ab', b'\\xd9(')
    """
    n = len(body)
    if n < 32:
        return Raw(bytes((0xa0 | n,)) + body)
    if n <= 0xff:
        return Raw(bytes((0xd9, n)) + body)
    if n <= 0xffff:
        return Raw(b"\xda" + n.to_bytes(2, "big") + body)
    return Raw(b"\xdb" + n.to_bytes(4, "big") + body)


# ----------------------------------------------------------------------------- configuration

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_edges(owner: str, name: str, edges: Any, *, integer: bool) -> tuple[float, ...]:
    """Bucket edges: a non-empty strictly increasing list of positive numbers (integers for counts)."""
    kind = "integers" if integer else "numbers"
    if (not isinstance(edges, (list, tuple)) or not edges
            or not all((isinstance(e, int) if integer else _is_num(e)) and not isinstance(e, bool) and e > 0
                       for e in edges)):
        raise ValueError(f"{owner}: {name} must be a non-empty list of positive {kind}, got {edges!r}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"{owner}: {name} must be strictly increasing, got {list(edges)!r}")
    return tuple(edges)


def check_prefixes(owner: str, name: str, prefixes: Any) -> tuple[str, ...]:
    if isinstance(prefixes, str) or not isinstance(prefixes, (list, tuple)) or \
            not all(isinstance(p, str) and p.strip() for p in prefixes):
        raise ValueError(f"{owner}: {name} must be a list of non-empty strings, got {prefixes!r}")
    return tuple(sorted({p.strip().upper() for p in prefixes}, key=lambda p: (-len(p), p)))


class PeerSpec:
    """The ``peers`` block of a card rule, validated (messages name the field and the value)."""

    FIELDS = ("quantile", "factor", "min_peer_size", "age_bands_years", "buckets")

    def __init__(self, owner: str, cfg: Any, *, floor_field: str, integer: bool) -> None:
        if not isinstance(cfg, dict):
            raise ValueError(f"{owner}: peers must be a mapping, got {cfg!r}")
        unknown = set(cfg) - {*self.FIELDS, floor_field, "enabled"}
        if unknown:
            raise ValueError(f"{owner}: peers has unknown field(s) {sorted(unknown)}")
        self.enabled = cfg.get("enabled", True)
        if not isinstance(self.enabled, bool):
            raise ValueError(f"{owner}: peers.enabled must be true or false, got {self.enabled!r}")
        self.floor_field = floor_field
        self.integer = integer
        floor = cfg.get(floor_field)
        check_positive(owner, f"peers.{floor_field}", floor, integer=integer)
        self.floor = floor
        q = cfg.get("quantile", 0.99)
        if not _is_num(q) or not 0.5 < q < 1:
            raise ValueError(f"{owner}: peers.quantile must be a number between 0.5 and 1 (exclusive), got {q!r}")
        self.quantile = float(q)
        f = cfg.get("factor", 2.0)
        if not _is_num(f) or f < 1:
            raise ValueError(f"{owner}: peers.factor must be a number >= 1, got {f!r}")
        self.factor = float(f)
        m = cfg.get("min_peer_size", 30)
        check_positive(owner, "peers.min_peer_size", m, integer=True)
        self.min_peer_size = m
        bands = cfg.get("age_bands_years", [0, 7, 18, 35, 45, 60, 70, 80])
        if (not isinstance(bands, (list, tuple)) or not bands
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in bands)
                or bands[0] != 0 or any(b <= a for a, b in zip(bands, bands[1:]))):
            raise ValueError(f"{owner}: peers.age_bands_years must be strictly increasing non-negative integers "
                             f"starting at 0, got {bands!r}")
        self.age_bands = tuple(bands)
        default_edges = list(range(1, 11)) + [12, 14, 16, 18, 20, 25, 30, 40, 50, 60, 80, 100]
        self.edges = check_edges(owner, "peers.buckets", cfg.get("buckets", default_edges), integer=integer)
        if self.floor < self.edges[0]:
            raise ValueError(f"{owner}: peers.{floor_field} must be >= the first bucket edge {self.edges[0]}, got {self.floor!r}")

    def config(self) -> dict[str, Any]:
        """The peer configuration as the Lua library reads it (``pk_config``)."""
        return {"enabled": self.enabled, "floor": float(self.floor), "q": self.quantile, "factor": self.factor,
                "min_peer": self.min_peer_size, "integer": self.integer, "edges": [float(e) for e in self.edges]}

    def params(self) -> dict[str, Any]:
        return {"enabled": self.enabled, self.floor_field: self.floor, "quantile": self.quantile,
                "factor": self.factor, "min_peer_size": self.min_peer_size,
                "age_bands_years": list(self.age_bands), "buckets": list(self.edges)}

    def base(self, ev: Any, year: int | None = None) -> str:
        """``category|age band`` of an event's card (``?`` where unknown)."""
        return self.base_of(ev.insured_category, ev.birth_year, year or event_year(ev.ts))

    @lru_cache(maxsize=4096)
    def base_of(self, cat: str | None, birth_year: int | None, year: int) -> str:
        """``category|age band`` of an insured category and birth year in ``year``."""
        age = year - birth_year if birth_year else None
        return f"{cat or '?'}|{age_band(age, self.age_bands)}"

    def __repr__(self) -> str:
        return (f"PeerSpec(floor={self.floor!r}, quantile={self.quantile!r}, factor={self.factor!r}, "
                f"min_peer_size={self.min_peer_size!r})")


def peer_bound(spec: PeerSpec, q_value: float) -> float:
    """The value a card must reach: ``max(floor, factor x peer quantile)``."""
    return max(float(spec.floor), spec.factor * q_value)


@lru_cache(maxsize=1024)
def day_label(day: int) -> str:
    """``2026-11-05`` for a local day number."""
    return date.fromordinal(day + _EPOCH_ORD).isoformat()


# ----------------------------------------------------------------------------- Lua library
#
# Included at the top of the card rules' scripts. Redis turns Lua numbers into integers in
# replies, so fractional results are returned as strings. Keys are built in the scripts from
# the rule's prefix (standalone Redis; the group of a card is only known inside the script,
# from its state).

LUA_LIB = r"""
local floor, sfind, ssub = math.floor, string.find, string.sub
-- shared by reference, never written: what a missing list reads as
local EMPTY = {}

local function pk_bucket(edges, v)
  local lo, hi = 0, #edges
  while lo < hi do
    local s = lo + hi + 1
    local mid = (s - s % 2) / 2   -- floor(s / 2) without a call
    if edges[mid] <= v then lo = mid else hi = mid - 1 end
  end
  return lo
end

-- day numbers as strings (for keys), each converted once per script run: Lua's number to string is a sprintf
local DS = {}
local function pk_dstr(d)
  local s = DS[d]
  if not s then
    s = tostring(d)
    DS[d] = s
  end
  return s
end

local function pk_key(prefix, ym, g, dom)
  return prefix .. ':' .. ym .. ':' .. g .. ':' .. pk_dstr(dom)
end

-- the peer configuration (a decoded PeerSpec.config()): enabled, floor, q, factor, min_peer, integer, edges
local function pk_config(x)
  local c = {enabled = x.enabled, floor = x.floor, q = x.q, factor = x.factor, min_peer = x.min_peer,
             integer = x.integer, edges = x.edges}
  c.nb = #c.edges
  c.bs = {}
  for b = 0, c.nb do c.bs[b] = tostring(b) end
  return c
end

-- the card's group after this event: base 'category|band' and diagnosis key ('S:' 门诊大病, 'C:' chapter,
-- '?' unknown); unknown parts are filled in later, a 门诊大病 diagnosis always wins
local function pk_regroup(ob, od, eb, ed)
  if ob == eb and od == ed then return ob, od end
  local nb, nd = ob, od
  if not ob or (sfind(ob, '?', 1, true) and not sfind(eb, '?', 1, true)) then nb = eb end
  if not od or (od == '?' and ed ~= '?') or (ssub(ed, 1, 2) == 'S:' and ssub(od, 1, 2) ~= 'S:') then
    nd = ed
  end
  return nb, nd
end

-- the histogram a card is counted in: a 门诊大病 group holds all its patients, others are split by base
local GC = {}
local function pk_group(b, d)
  local t = GC[b]
  if not t then
    t = {}
    GC[b] = t
  end
  local g = t[d]
  if not g then
    if ssub(d, 1, 2) == 'S:' then g = 'g:*|*|' .. d else g = 'g:' .. b .. '|' .. d end
    t[d] = g
  end
  return g
end

-- the batch's months (see cal_months): {ym = 'YYYY-MM', me = month end, ye = year end, keys = {group -> {day ->
-- delta key}}}
local function cal_months(flat)
  local out = {}
  for i = 1, #flat, 3 do
    out[#out + 1] = {ym = flat[i], me = flat[i + 1], ye = flat[i + 2], keys = {}}
  end
  return out
end

-- a calendar script's arguments (see CalBatch): ARGV[1] key prefix P, ARGV[2] card hash prefix, ARGV[3] JSON
-- config, ARGV[4..6] the batch's months, peer groups and rows as MessagePack flat arrays.
-- Returns P, card hash prefix, peer key prefix, config, peer config (pk_config), months, groups, rows.
local function cal_args()
  local cfg = cjson.decode(ARGV[3])
  return ARGV[1], ARGV[2], ARGV[1] .. ':peer', cfg, pk_config(cfg.peers), cal_months(cmsgpack.unpack(ARGV[4])),
         cmsgpack.unpack(ARGV[5]), cmsgpack.unpack(ARGV[6])
end

-- the batch's pending histogram deltas: key -> {bucket -> delta}, the month end of each key and the earliest
-- event time that touched it (its TTL runs to the month end + lateness as of that event)
local PD, PM, PT = {}, {}, {}
local function pk_add(prefix, mo, g, dom, t, b, delta)
  local kg = mo.keys[g]
  if not kg then
    kg = {}
    mo.keys[g] = kg
  end
  local k = kg[dom]
  if not k then
    k = pk_key(prefix, mo.ym, g, dom)
    kg[dom] = k
  end
  local d = PD[k]
  if not d then
    PD[k] = {[b] = delta}
    PM[k] = mo.me
    PT[k] = t
    return
  end
  if t < PT[k] then PT[k] = t end
  d[b] = (d[b] or 0) + delta
end

-- apply the batch's histogram deltas (one HINCRBY per key and bucket); a key whose bucket was 0 before gets
-- its TTL (the month end + lateness, as of the key's earliest event in the batch). Call before reading
-- histograms (pk_peers).
local function pk_flush(c, late)
  for k, t in pairs(PD) do
    local new = false
    for b, d in pairs(t) do
      if d ~= 0 and redis.call('HINCRBY', k, c.bs[b], d) == d then new = true end
    end
    if new then
      local ttl = floor(PM[k] - PT[k]) + late
      if ttl < 1 then ttl = 1 end
      redis.call('EXPIRE', k, ttl)
    end
  end
  PD, PM, PT = {}, {}, {}
end

local function pk_quantile(hist, nb, total, q)
  local need = math.ceil(q * total - 1e-9)
  if need < 1 then need = 1 end
  local s = 0
  for b = 0, nb do
    s = s + hist[b]
    if s >= need then return b end
  end
  return nb
end

local function pk_value(c, b)
  if b >= c.nb then return c.edges[c.nb] end
  if c.integer then return c.edges[b + 1] - 1 end
  return c.edges[b + 1]
end

-- peers' snapshot as of day rdom for the card's group (own = the card's {value, base, dx} after the last day
-- <= rdom it had an event, see cal_own): nil when fewer than min_peer other members, else {peers, median,
-- q-quantile} (numbers as strings)
local function pk_peers(prefix, ym, rdom, c, own, gb, gd)
  if rdom < 1 then return nil end
  local g = pk_group(gb, gd)
  local hist = {}
  for b = 0, c.nb do hist[b] = 0 end
  for d = 1, rdom do
    local f = redis.call('HGETALL', pk_key(prefix, ym, g, d))
    for i = 1, #f, 2 do
      local b = tonumber(f[i])
      hist[b] = hist[b] + tonumber(f[i + 1])
    end
  end
  if own and pk_group(own[2], own[3]) == g then
    local b = pk_bucket(c.edges, own[1])
    hist[b] = hist[b] - 1
  end
  local total = 0
  for b = 0, c.nb do total = total + hist[b] end
  if total < c.min_peer or total < 1 then return nil end
  local med = pk_value(c, pk_quantile(hist, c.nb, total, 0.5))
  local qv = pk_value(c, pk_quantile(hist, c.nb, total, c.q))
  return {total, tostring(med), tostring(qv)}
end

-- does value v reach the peer bound max(floor, factor x q-quantile)?
local function pk_fires(c, v, peer)
  if not peer then return false end
  local bound = c.factor * tonumber(peer[3])
  if bound < c.floor then bound = c.floor end
  return v >= bound - 1e-9
end

-- ---- calendar state of one card and rule: one field of the card hash, MessagePack [years, months] (see the
-- module docstring; cmsgpack writes numbers in binary, several times faster than cjson's sprintf). A year is
-- an array {end, ...counts}; a month a table {me = end, ev, h, gs, gb, gd, ...} decoded from and encoded to
-- the rule's array by its own mdec / menc, with every field it will get set in its constructor (false when
-- empty: a list a month has not needed yet, an empty group) so it is allocated once. Few tables are made per
-- event, each with its first contents (a table grown an element at a time is reallocated at each power of 2):
-- tables cost allocation and GC time.

-- index of dom's triple in a flat list {dom, x, y, dom, x, y, ...} ordered by dom; {dom, 0, 0} is added if missing
local function cal_tri(a, dom)
  local n = #a
  local i = n - 2
  while i >= 1 and a[i] > dom do i = i - 3 end
  if i >= 1 and a[i] == dom then return i end
  i = i + 3
  if i > n then
    a[i], a[i + 1], a[i + 2] = dom, 0, 0
  else
    table.insert(a, i, 0)
    table.insert(a, i, 0)
    table.insert(a, i, dom)
  end
  return i
end

-- is x in list a (false: empty)? (a set is built once the list is long, kept in SETS[a] up to date by cal_put:
-- not in the list itself, which may be packed)
local SETS = {}
local function cal_in(a, x)
  if not a then return false end
  local set = SETS[a]
  if set then return set[x] == true end
  local n = #a
  if n > 24 then
    set = {}
    for i = 1, n do set[a[i]] = true end
    SETS[a] = set
    return set[x] == true
  end
  for i = 1, n do
    if a[i] == x then return true end
  end
  return false
end

-- append x to list a (its set too, if built)
local function cal_put(a, x)
  a[#a + 1] = x
  local set = SETS[a]
  if set then set[x] = true end
end

-- has a month seen event id? (its evidence: flat {id, time, ...}; a set of the ids is built in m.set once
-- the month has many)
local function cal_seen(m, id)
  local set = m.set
  if set then return set[id] == true end
  local ev = m.ev
  if not ev then return false end
  local n = #ev
  if n > 48 then
    set = {}
    for i = 1, n, 2 do set[ev[i]] = true end
    m.set = set
    return set[id] == true
  end
  for i = 1, n, 2 do
    if ev[i] == id then return true end
  end
  return false
end

-- add an event to a month's evidence, kept ordered by (time, id) whatever the arrival order
local function cal_ev_add(m, id, t)
  local ev = m.ev
  if not ev then
    m.ev = {id, t}
    return
  end
  local n = #ev
  local p = n + 1
  while p > 1 and (ev[p - 1] > t or (ev[p - 1] == t and ev[p - 2] > id)) do p = p - 2 end
  if p > n then
    ev[p], ev[p + 1] = id, t
  else
    table.insert(ev, p, t)
    table.insert(ev, p, id)
  end
  local set = m.set
  if set then set[id] = true end
end

-- record the card's peer value v and current group after day dom (h: flat {dom, value, group number}; gs the
-- month's peer groups, flat {base, dx, base, dx, ...} in order of appearance, the last is the current one)
local function cal_h_set(m, dom, v)
  local gs = m.gs
  local n
  if not gs then
    m.gs = {m.gb, m.gd}
    n = 2
  else
    n = #gs
    if n == 0 or gs[n - 1] ~= m.gb or gs[n] ~= m.gd then
      gs[n + 1], gs[n + 2] = m.gb, m.gd
      n = n + 2
    end
  end
  local h = m.h
  if not h then
    m.h = {dom, v, n / 2}
    return
  end
  local i = cal_tri(h, dom)
  h[i + 1] = v
  h[i + 2] = n / 2
end

-- the card's own {value / scale, base, dx} after the last day <= rdom it had an event, nil if none
local function cal_own(m, rdom, scale)
  local h = m.h
  if not h then return nil end
  local i = #h - 2
  while i >= 1 and h[i] > rdom do i = i - 3 end
  if i < 1 then return nil end
  local g = 2 * h[i + 2]
  return {h[i + 1] / scale, m.gs[g - 1], m.gs[g]}
end

-- the card's state for field of hash key: years and months ordered by their end (false: none), and the card's
-- newest event time (the last evidence of its last month)
local function cal_load(key, field, mdec)
  local raw = redis.call('HGET', key, field)
  if not raw then return {key = key, years = false, months = false, newest = false} end
  local v = cmsgpack.unpack(raw)
  local ms = v[2]
  for i = 1, #ms do ms[i] = mdec(ms[i]) end
  local last = ms[#ms]
  local newest = false
  if last then newest = last.ev[#last.ev] end
  return {key = key, years = v[1], months = ms, newest = newest}
end

-- the month ending at me (created by new(me) if missing); fresh is true when it was created
local function cal_month(S, me, new)
  local ms = S.months
  if not ms then
    local m = new(me)
    S.months = {m}
    return m, true
  end
  local i = #ms
  while i >= 1 and ms[i].me > me do i = i - 1 end
  if i >= 1 and ms[i].me == me then return ms[i], false end
  local m = new(me)
  table.insert(ms, i + 1, m)
  return m, true
end

-- the year ending at ye, nil if none
local function cal_find_year(S, ye)
  local ys = S.years
  if not ys then return nil end
  for i = #ys, 1, -1 do
    if ys[i][1] == ye then return ys[i] end
  end
  return nil
end

-- the year ending at ye: {ye, 0 x n} if missing
local function cal_year(S, ye, n)
  local ys = S.years
  local y
  if n == 2 then y = {ye, 0, 0} else
    y = {ye}
    for k = 2, n + 1 do y[k] = 0 end
  end
  if not ys then
    S.years = {y}
    return y
  end
  local i = #ys
  while i >= 1 and ys[i][1] > ye do i = i - 1 end
  if i >= 1 and ys[i][1] == ye then return ys[i] end
  table.insert(ys, i + 1, y)
  return y
end

-- write the state back, without the buckets the card's newest event is keep seconds past the end of
-- (lateness + a redelivery margin: no event within lateness, nor a redelivered one, can reach them any more;
-- an event that does is ignored, see cal_event). S stays as it was (the batch's verdicts may still read it).
local function cal_store(S, field, keep, menc)
  local ys, newest = S.years or EMPTY, S.newest
  if ys[1] and ys[1][1] + keep <= newest then
    local kept = {}
    for _, y in ipairs(ys) do
      if y[1] + keep > newest then kept[#kept + 1] = y end
    end
    ys = kept
  end
  local src = S.months or EMPTY
  local ms
  if #src == 1 then
    if src[1].me + keep > newest then ms = {menc(src[1])} else ms = EMPTY end
  else
    ms = {}
    for _, m in ipairs(src) do
      if m.me + keep > newest then ms[#ms + 1] = menc(m) end
    end
  end
  redis.call('HSET', S.key, field, cmsgpack.pack({ys, ms}))
end

-- one batch's calendar state: the cards it loaded, those to write back, the months it touched (in order)
local function cal_batch(cp, field, keep, mdec, mnew)
  return {cp = cp, field = field, keep = keep, mdec = mdec, mnew = mnew, cards = {}, dirty = {}, order = {}}
end

-- an event of card at t in month mo (see cal_months): its card state S and month m when it counts; nil when
-- its month is no longer kept (late: the card's newest event is keep past its end) or it was counted before
-- (redelivered)
local function cal_event(B, card, mo, idx, rdom, eid, t)
  local S = B.cards[card]
  if not S then
    S = cal_load(B.cp .. card, B.field, B.mdec)
    B.cards[card] = S
  end
  local me = mo.me
  local newest = S.newest
  if newest and me + B.keep <= newest then return nil end
  local m, fresh = cal_month(S, me, B.mnew)
  if not m.li then
    local order = B.order
    order[#order + 1] = m
    m.S, m.mo = S, mo
  end
  m.li, m.lr = idx, rdom   -- judged as of its last event in the batch
  if not fresh and cal_seen(m, eid) then return nil end
  cal_ev_add(m, eid, t)
  B.dirty[card] = S
  if not newest or t > newest then S.newest = t end
  return S, m
end

-- the month's card moves in its peer histograms from v0 to v1 on day dom (regrouped by this event's buckets
-- eb/ed; its group key and the bucket of its value are kept in m.g, m.pb), applied by pk_flush; a histogram's
-- member count is the sum of its buckets. The day's running value becomes hv.
local function cal_peer_move(prefix, pc, m, dom, t, eb, ed, v0, v1, hv)
  local ob, od = m.gb, m.gd
  local g0 = m.g
  local g1 = g0
  if ob ~= eb or od ~= ed then
    local nb, nd = pk_regroup(ob, od, eb, ed)
    if nb ~= ob or nd ~= od then
      if ob and not g0 then g0 = pk_group(ob, od) end
      g1 = pk_group(nb, nd)
      m.gb, m.gd = nb, nd
    end
  end
  if not g1 then   -- decoded month, same group
    g1 = pk_group(ob, od)
    g0 = g1
  end
  m.g = g1
  local edges = pc.edges
  local b1 = pk_bucket(edges, v1)
  if ob then
    local b0 = m.pb or pk_bucket(edges, v0)
    if g0 ~= g1 or b0 ~= b1 then
      pk_add(prefix, m.mo, g0, dom, t, b0, -1)
      pk_add(prefix, m.mo, g1, dom, t, b1, 1)
    end
  else
    pk_add(prefix, m.mo, g1, dom, t, b1, 1)
  end
  m.pb = b1
  cal_h_set(m, dom, hv)
end

-- a card's first event, the batch's only event of the card: its state as Python built it (byte for byte what
-- cal_store would write for the card from nothing) is written if the card has none — one HSETNX, no read, no
-- decode, no encode, no table; false when the card has a state (the caller then takes the cal_event path)
local function cal_fresh(B, card, val)
  return redis.call('HSETNX', B.cp .. card, B.field, val) == 1
end

-- a first event's peer histogram move: the card joins group (gb, gd) in the bucket of v on day dom
local function cal_fresh_peer(prefix, pc, mo, gb, gd, dom, t, v)
  pk_add(prefix, mo, pk_group(gb, gd), dom, t, pk_bucket(pc.edges, v), 1)
end

-- a first event that may fire (Python knows when it cannot) is judged with the batch's card-months, as its
-- state written decodes
local function cal_fresh_judge(B, val, mo, idx, rdom)
  local v = cmsgpack.unpack(val)
  local m = B.mdec(v[2][1])
  m.S, m.mo, m.li, m.lr = {years = v[1]}, mo, idx, rdom
  local order = B.order
  order[#order + 1] = m
end

-- the evidence of a month: flat {event_id, time (string, exact), …}
local function pk_evidence(ev)
  local out = {}
  for i = 1, #ev, 2 do
    out[i] = ev[i]
    out[i + 1] = string.format('%.17g', ev[i + 1])
  end
  return out
end
"""


class CalBatch:
    """A batch for a calendar rule's script: its rows, with months and peer groups sent once and referred to by
    index (ARGV[4..6], read by ``cal_args`` in :data:`LUA_LIB`).

    >>> b = CalBatch()
    >>> b.month("2026-11", 1, 2), b.month("2026-12", 3, 4), b.month("2026-11", 1, 2)
    (1, 2, 1)
    >>> b.group(("employee:40", "I10")), b.group(("employee:40", "I10"))
    (1, 1)
    """

    __slots__ = ("rows", "_months", "_cal", "_groups", "_gflat")

    def __init__(self) -> None:
        self.rows: list[Any] = []  # flat: the rule's fields of each row, one after the other
        self._months: dict[str, int] = {}
        self._cal: list[Any] = []
        self._groups: dict[tuple[str, str], int] = {}
        self._gflat: list[str] = []

    def month(self, month: str, month_end: int, year_end: int) -> int:
        """The month's index (from 1) in the batch."""
        mi = self._months.get(month)
        if mi is None:
            self._cal += (month, month_end, year_end)
            mi = self._months[month] = len(self._months) + 1
        return mi

    def group(self, g: tuple[str, str]) -> int:
        """The peer group's index (from 1) in the batch: (base, diagnosis key)."""
        gi = self._groups.get(g)
        if gi is None:
            self._gflat += g
            gi = self._groups[g] = len(self._groups) + 1
        return gi

    def queue(self, pipe: Any, sha: str, key: str, card_prefix: str, cfg: bytes) -> int:
        """Queue the script for the batch (nothing without rows); the number of replies."""
        if not self.rows:
            return 0
        pipe.evalsha(sha, 0, key, card_prefix, cfg, _pack(self._cal), _pack(self._gflat), _pack(self.rows))
        return 1


def _dec(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def cal_replies(replies: Sequence[Any], max_evidence: int) -> Iterator[tuple[int, list[int], tuple | None,
                                                                              list[str], list[float]]]:
    """A calendar script's verdicts: (event index, values, peer info or None, evidence ids, their times), the
    evidence the latest ``max_evidence`` in (time, id) order; peer info (peers, quantile, bound, base, dx)."""
    if not replies:
        return
    for idx, values, peer, flat in replies[0]:
        ids = [_dec(x) for x in flat[0::2]]
        times = [float(_dec(x)) for x in flat[1::2]]
        order = sorted(range(len(ids)), key=lambda j: (times[j], ids[j]))[-max_evidence:]
        pinfo = None if not peer else (int(peer[0]), float(_dec(peer[1])), float(_dec(peer[2])), _dec(peer[3]),
                                       _dec(peer[4]))
        yield int(idx), [int(x) for x in values], pinfo, [ids[j] for j in order], [times[j] for j in order]
