"""Features of one settlement for the online models (``ml_outlier``): the windows in Redis + the event itself.

One function, :func:`features`, turns a settlement and its :class:`Window` (what the
batched Lua script :data:`LUA` returned for it) into a flat ``dict[str, float]`` that
river models take as is. Every feature is in event time; units are in the names.

======================  =========================================================================
``amount_cny``          total amount of the settlement (CNY)
``fund_share``          fund-paid share of the total (0-1; 0 when the total is 0)
``n_lines``             number of billed lines
``resale_share``        share of the amount spent on resale-prone drugs (``resale_prone_drugs``)
``hour``                hour of day at +08:00 (0-24, fractional)
``card_n_1h`` …         the card's settlements in the last 1 h / 24 h / 7 d (this one included)
``card_inst_1h`` …      distinct institutions of the card in the last 1 h / 24 h / 7 d
``card_dist_1h`` …      distinct districts of the card in the last 1 h / 24 h / 7 d
``days_supply_ratio``   (days of drugs still on hand from the card's purchases in the last 7 d
                        + days supplied now) / 30: ≈1 for a monthly refill, ≫1 when stockpiling
``phys_vol_ratio``      (physician's settlements today + 1) / (their daily baseline + 1)
``inst_vol_ratio``      the same for the institution
======================  =========================================================================

Determinism. The same seeded replay must give the same features however the broker's
partitions interleave in the fetched batches. A card lives in one partition, so card
windows see the same events in the same order on every run. Physicians and institutions
are served by cards of every partition, so a shared counter would depend on which
partition got ahead; their volumes are therefore counted **per input partition**
(``…:p{partition}:phys:{id}``): each partition sees a fixed sample (its cards) of every
physician's patients, in a fixed order, and the ratio today / baseline is the same
signal on a sample. The baseline is the running mean of the completed past days
(exponential with a 7-day memory once 7 days are complete); before one day is complete
the ratio is neutral (1.0).

State (all keys expire, all idempotent on ``event_id``):

* ``cw:{run}:ml_outlier:card:{card}`` — sorted set, member
  ``institution\\tdistrict\\tdays_supply\\tevent_id``, score = event time, 7 d + lateness;
  a redelivered event re-adds the same member (no-op) and is reported as not new.
* ``cw:{run}:ml_outlier:p{partition}:phys:{physician}`` and ``…:inst:{institution}`` —
  string ``"d n b k"``: current local day, settlements that day, baseline per day,
  completed days seen; 14 d.

>>> from stream.events import parse_event
>>> ev = parse_event(b'{"event_id":"E1","event_time":"2026-11-24T09:30:00+08:00","card_id":"C1",'
...     b'"institution_id":"P1","institution_type":"pharmacy","district":"310101","visit_type":"pharmacy",'
...     b'"items":[{"code":"XB01ACA002","category":"drug","quantity":2,"amount":192.0,"days_supply":56}],'
...     b'"total_amount":192.0,"fund_paid":115.2}')
>>> w = Window(new=True, n=(3, 9, 9), inst=(3, 9, 9), dist=(2, 4, 4), days_on_hand=84.0,
...            phys_today=-1, phys_base=0.0, phys_days=0, inst_today=6, inst_base=2.0, inst_days=3)
>>> f = features(ev, w, DrugList(["XB01AC"]))
>>> f["resale_share"], f["hour"], f["card_inst_24h"], f["days_supply_ratio"], f["inst_vol_ratio"]
(1.0, 9.5, 9.0, 4.67, 2.33)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import orjson

from detectors.drugs import EMPTY, DrugList, is_placeholder
from stream.events import Settlement

TZ_OFFSET_S = 8 * 3600
DAY_S = 86400
WINDOWS_S = (3600, 86400, 7 * 86400)
VOLUME_TTL_S = 14 * 86400
#: days a baseline remembers once that many days are complete (exponential memory)
BASELINE_DAYS = 7
SUPPLY_HORIZON_D = 30.0

#: feature name -> (中文, English), in the order the models see them
FEATURES: dict[str, tuple[str, str]] = {
    "amount_cny": ("结算金额", "amount"),
    "fund_share": ("统筹支付占比", "fund share"),
    "n_lines": ("明细条数", "billed lines"),
    "resale_share": ("易倒卖药品金额占比", "resale-prone drug share"),
    "hour": ("结算时刻", "hour of day"),
    "card_n_1h": ("卡 1 小时内结算次数", "card settlements in 1 h"),
    "card_inst_1h": ("卡 1 小时内机构数", "card institutions in 1 h"),
    "card_dist_1h": ("卡 1 小时内区县数", "card districts in 1 h"),
    "card_n_24h": ("卡 24 小时内结算次数", "card settlements in 24 h"),
    "card_inst_24h": ("卡 24 小时内机构数", "card institutions in 24 h"),
    "card_dist_24h": ("卡 24 小时内区县数", "card districts in 24 h"),
    "card_n_7d": ("卡 7 天内结算次数", "card settlements in 7 days"),
    "card_inst_7d": ("卡 7 天内机构数", "card institutions in 7 days"),
    "card_dist_7d": ("卡 7 天内区县数", "card districts in 7 days"),
    "days_supply_ratio": ("药品可用天数比", "days-supply ratio"),
    "phys_vol_ratio": ("医师当日量/基线", "physician volume vs baseline"),
    "inst_vol_ratio": ("机构当日量/基线", "institution volume vs baseline"),
}

LUA = r"""
-- Card windows and per-partition physician / institution volumes, one call per batch.
-- ARGV[1] key prefix (cw:{run}:ml_outlier), ARGV[2] JSON [lateness, week_s, card_ttl, vol_ttl, base_days],
-- ARGV[3] JSON [[t, day, card, institution, district, days_supply, event_id, physician or "", partition], ...]
-- (institution and district carry no tab). Keys are built here from the prefix (standalone Redis).
-- Returns one string: a line of 17 numbers per event (see Window.from_reply), lines joined by "\n".
local prefix = ARGV[1]
local cfg = cjson.decode(ARGV[2])
local evs = cjson.decode(ARGV[3])
local lateness, week, card_ttl, vol_ttl, base_days = cfg[1], cfg[2], cfg[3], cfg[4], cfg[5]
local horizon = week + lateness
local match, fmt = string.match, string.format

-- volume state "d n b k": local day, settlements that day, baseline per day, completed days
local function roll(v, day, new)
  local d, n, b, k
  if v then
    local s1, s2, s3, s4 = match(v, '^(%S+) (%S+) (%S+) (%S+)$')
    d = tonumber(s1); n = tonumber(s2); b = tonumber(s3); k = tonumber(s4)
  end
  local fresh = false
  if not d then d = day; n = 0; b = 0; k = 0; fresh = true end
  if day > d then
    local gap = day - d
    if gap > 3 * base_days then gap = 3 * base_days end
    for j = 1, gap do
      local x = 0
      if j == 1 then x = n end
      k = k + 1
      local a = 1 / k
      if a < 1 / base_days then a = 1 / base_days end
      b = b + a * (x - b)
    end
    d = day; n = 0; fresh = true
  end
  local today = -1
  local changed = fresh
  if day == d then
    if new then n = n + 1; changed = true end
    today = n
  end
  local val = false
  if changed then val = fmt('%d %d %.6f %d', d, n, b, k) end
  return today, b, k, val, fresh
end

local function save(key, val, fresh)
  if fresh then
    redis.call('SET', key, val, 'EX', vol_ttl)
  else
    redis.call('SET', key, val, 'KEEPTTL')
  end
end

local out = {}
for i = 1, #evs do
  local e = evs[i]
  local t, day, card, inst, dist, sup, eid, phys, part = e[1], e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9]
  local ck = prefix .. ':card:' .. card
  local new = redis.call('ZADD', ck, t, inst .. '\t' .. dist .. '\t' .. sup .. '\t' .. eid) == 1
  if new then redis.call('EXPIRE', ck, card_ttl) end
  local members = redis.call('ZRANGEBYSCORE', ck, '-inf', t, 'WITHSCORES')
  local c1, c2, c3 = 0, 0, 0
  local li, ld = {}, {}      -- institution / district -> youngest age
  local on_hand = 0
  local stale = false
  for m = 1, #members, 2 do
    local age = t - tonumber(members[m + 1])
    if age > horizon then
      stale = true
    elseif age <= week then
      local ins, dis, s, id = match(members[m], '^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
      c3 = c3 + 1
      if age <= 86400 then c2 = c2 + 1; if age <= 3600 then c1 = c1 + 1 end end
      local x = li[ins]
      if not x or age < x then li[ins] = age end
      x = ld[dis]
      if not x or age < x then ld[dis] = age end
      if id ~= eid then
        local left = tonumber(s) - age / 86400
        if left > 0 then on_hand = on_hand + left end
      end
    end
  end
  if stale then redis.call('ZREMRANGEBYSCORE', ck, '-inf', '(' .. tostring(t - horizon)) end
  local i1, i2, i3, d1, d2, d3 = 0, 0, 0, 0, 0, 0
  for _, age in pairs(li) do
    i3 = i3 + 1
    if age <= 86400 then i2 = i2 + 1; if age <= 3600 then i1 = i1 + 1 end end
  end
  for _, age in pairs(ld) do
    d3 = d3 + 1
    if age <= 86400 then d2 = d2 + 1; if age <= 3600 then d1 = d1 + 1 end end
  end
  local pp = prefix .. ':p' .. part
  local ik = pp .. ':inst:' .. inst
  local pk = nil
  local vals
  if phys ~= '' then
    pk = pp .. ':phys:' .. phys
    vals = redis.call('MGET', ik, pk)
  else
    vals = {redis.call('GET', ik)}
  end
  local it, ib, ikd, iv, ifresh = roll(vals[1], day, new)
  if iv then save(ik, iv, ifresh) end
  local pt, pb, pkd = -1, 0, 0
  if pk then
    local pv, pfresh
    pt, pb, pkd, pv, pfresh = roll(vals[2], day, new)
    if pv then save(pk, pv, pfresh) end
  end
  local nw = 0
  if new then nw = 1 end
  out[i] = fmt('%d %d %d %d %d %d %d %d %d %d %.4f %d %.6f %d %d %.6f %d', nw, c1, c2, c3, i1, i2, i3,
               d1, d2, d3, on_hand, pt, pb, pkd, it, ib, ikd)
end
return table.concat(out, '\n')
"""


class Window(NamedTuple):
    """What :data:`LUA` returns for one settlement (three-tuples are 1 h, 24 h, 7 d)."""

    new: bool                      # first delivery of this event_id (False: redelivered)
    n: tuple[int, int, int]        # the card's settlements in the windows, this one included
    inst: tuple[int, int, int]     # distinct institutions
    dist: tuple[int, int, int]     # distinct districts
    days_on_hand: float            # days of drugs still on hand from earlier purchases (7 d)
    phys_today: int                # physician's settlements today in this partition; -1 unknown / none
    phys_base: float               # their baseline per day (mean of completed days)
    phys_days: int                 # completed days behind the baseline
    inst_today: int
    inst_base: float
    inst_days: int

    @classmethod
    def from_reply(cls, reply: bytes | str) -> "Window":
        """Parse one event's reply: 17 numbers separated by spaces.

        >>> Window.from_reply(b"1 1 2 3 1 2 2 1 1 1 12.5000 -1 0.000000 0 4 2.500000 3").inst
        (1, 2, 2)
        """
        r = reply.split()
        return cls(r[0] == b"1" or r[0] == "1", (int(r[1]), int(r[2]), int(r[3])),
                   (int(r[4]), int(r[5]), int(r[6])), (int(r[7]), int(r[8]), int(r[9])), float(r[10]),
                   int(r[11]), float(r[12]), int(r[13]), int(r[14]), float(r[15]), int(r[16]))


def local_day(ts: float) -> int:
    """Local (+08:00) calendar day number of an event time.

    >>> local_day(1795482785.0) - local_day(1795482785.0 - 86400)
    1
    """
    return int((ts + TZ_OFFSET_S) // DAY_S)


def days_supply(ev: Settlement) -> int:
    """Days of treatment the drug lines of ``ev`` supply (sum of ``days_supply``; lines without it count 0)."""
    return sum(it.days_supply or 0 for it in ev.items if it.category == "drug")


def _ratio(today: int, base: float, days: int) -> float:
    if today < 0 or days <= 0:
        return 1.0
    return round((today + 1) / (base + 1), 2)


def features(ev: Settlement, w: Window, resale: DrugList = EMPTY) -> dict[str, float]:
    """The feature vector of ``ev`` given its windows ``w`` (see the module docstring for each name)."""
    total = ev.total_amount
    resale_amt = 0.0
    if resale is not EMPTY:
        for it in ev.items:
            if it.category == "drug" and resale.matches(it.code, it.name):
                resale_amt += it.amount
    supply = days_supply(ev)
    tod = (ev.ts + TZ_OFFSET_S) % DAY_S
    return {
        "amount_cny": total,
        "fund_share": round(ev.fund_paid / total, 4) if total > 0 else 0.0,
        "n_lines": float(len(ev.items)),
        "resale_share": round(resale_amt / total, 4) if total > 0 else 0.0,
        "hour": round(tod / 3600, 2),
        "card_n_1h": float(w.n[0]), "card_inst_1h": float(w.inst[0]), "card_dist_1h": float(w.dist[0]),
        "card_n_24h": float(w.n[1]), "card_inst_24h": float(w.inst[1]), "card_dist_24h": float(w.dist[1]),
        "card_n_7d": float(w.n[2]), "card_inst_7d": float(w.inst[2]), "card_dist_7d": float(w.dist[2]),
        "days_supply_ratio": round((w.days_on_hand + supply) / SUPPLY_HORIZON_D, 2),
        "phys_vol_ratio": _ratio(w.phys_today, w.phys_base, w.phys_days),
        "inst_vol_ratio": _ratio(w.inst_today, w.inst_base, w.inst_days),
    }


def _untab(s: str) -> str:
    return s.replace("\t", " ") if "\t" in s else s


_placeholders: dict[str, bool] = {}


def _placeholder(v: str) -> bool:
    hit = _placeholders.get(v)
    if hit is None:
        hit = is_placeholder(v)
        if len(_placeholders) < 200_000:
            _placeholders[v] = hit
    return hit


def queue_windows(pipe: Any, sha: str, events: Sequence[Settlement], prefix: str, *, lateness_s: int) -> int:
    """Queue one ``EVALSHA`` of :data:`LUA` for ``events`` (keys under ``prefix`` = ``cw:{run}:ml_outlier``).

    The reply is one string, a line per event in order: :func:`parse_windows`. Returns 1.
    """
    week = WINDOWS_S[2]
    cfg = [lateness_s, week, week + lateness_s, VOLUME_TTL_S, BASELINE_DAYS]
    rows = []
    for ev in events:
        phys = ev.physician_id
        if phys is None or _placeholder(phys):
            phys = ""
        rows.append([ev.ts, local_day(ev.ts), ev.card_id, _untab(ev.institution_id), _untab(ev.district),
                     days_supply(ev), ev.event_id, phys, ev.partition])
    pipe.evalsha(sha, 0, prefix, orjson.dumps(cfg), orjson.dumps(rows))
    return 1


def parse_windows(reply: bytes | str) -> list[Window]:
    """The :class:`Window` of every event of a batch from :data:`LUA`'s reply."""
    if not reply:
        return []
    sep = b"\n" if isinstance(reply, bytes) else "\n"
    return [Window.from_reply(line) for line in reply.split(sep)]
