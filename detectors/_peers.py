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

A card's month state (one JSON value per card and month) keeps its group (``gb`` base
``category|band``, ``gd`` diagnosis key; unknown parts are filled in later and a 门诊大病
diagnosis always wins, moving the card) and ``h[day]`` = its value and group after that day.

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
from typing import Any, Sequence

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
        return self._base(ev.insured_category, ev.birth_year, year or event_year(ev.ts))

    @lru_cache(maxsize=4096)
    def _base(self, cat: str | None, birth_year: int | None, year: int) -> str:
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
local function pk_bucket(edges, v)
  local lo, hi = 0, #edges
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if edges[mid] <= v then lo = mid else hi = mid - 1 end
  end
  return lo
end

local function pk_key(prefix, ym, g, dom)
  return prefix .. ':' .. ym .. ':' .. g .. ':' .. dom
end

-- the peer configuration (a decoded PeerSpec.config()): enabled, floor, q, factor, min_peer, integer, edges
local function pk_config(x)
  local c = {enabled = x.enabled, floor = x.floor, q = x.q, factor = x.factor, min_peer = x.min_peer,
             integer = x.integer, edges = x.edges}
  c.nb = #c.edges
  return c
end

-- the card's group after this event: base 'category|band' and diagnosis key ('S:' 门诊大病, 'C:' chapter,
-- '?' unknown); unknown parts are filled in later, a 门诊大病 diagnosis always wins
local function pk_regroup(ob, od, eb, ed)
  local nb, nd = ob, od
  if not ob or (string.find(ob, '?', 1, true) and not string.find(eb, '?', 1, true)) then nb = eb end
  if not od or (od == '?' and ed ~= '?') or (string.sub(ed, 1, 2) == 'S:' and string.sub(od, 1, 2) ~= 'S:') then
    nd = ed
  end
  return nb, nd
end

-- the histogram a card is counted in: a 门诊大病 group holds all its patients, others are split by base
local function pk_group(b, d)
  if string.sub(d, 1, 2) == 'S:' then return 'g:*|*|' .. d end
  return 'g:' .. b .. '|' .. d
end

-- move a card's contribution from (group g0, value v0) to (g1, v1) in the delta histogram of day dom;
-- a histogram's member count is the sum of its buckets
local function pk_update(prefix, ym, dom, ttl, c, ob, od, v0, nb, nd, v1)
  local g1 = pk_group(nb, nd)
  local b1 = pk_bucket(c.edges, v1)
  local g0 = false
  if ob then g0 = pk_group(ob, od) end
  if g0 then
    local b0 = pk_bucket(c.edges, v0)
    if g0 == g1 and b0 == b1 then return end
    local k0 = pk_key(prefix, ym, g0, dom)
    if redis.call('HINCRBY', k0, b0, -1) == -1 then redis.call('EXPIRE', k0, ttl) end
  end
  local k1 = pk_key(prefix, ym, g1, dom)
  if redis.call('HINCRBY', k1, b1, 1) == 1 then redis.call('EXPIRE', k1, ttl) end
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

-- peers' snapshot as of day rdom for the card's group (h = the card's {value, base, dx} after each day):
-- nil when fewer than min_peer other members, else {peers, median, q-quantile} (numbers as strings)
local function pk_peers(prefix, ym, rdom, c, h, gb, gd)
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
  for d = rdom, 1, -1 do
    local own = h[tostring(d)]
    if own then
      if pk_group(own[2], own[3]) == g then
        local b = pk_bucket(c.edges, own[1])
        hist[b] = hist[b] - 1
      end
      break
    end
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

-- the evidence of a card state: flat {event_id, time, …}
local function pk_evidence(ev)
  local out = {}
  for id, t in pairs(ev) do
    out[#out + 1] = id
    out[#out + 1] = t
  end
  return out
end
"""
