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

State (all idempotent on ``event_id``; one script call per batch reads each card and volume key
once and writes it once):

* field ``ml_outlier`` (:data:`CARD_FIELD`) of the per-card hash ``cw:{run}:c:{card}``
  (``card_hash = "c"``; the processor expires the hash, at least 7 d + lateness after the card's
  last settlement) — a compact cjson array, five values per settlement:
  ``[t, event_id, institution, district, days_supply, …]``, in (event time, event id) order;
  event times are seconds (cjson keeps 14 significant digits, so 0.1 ms). Only settlements
  within 7 d + lateness of the newest are kept (pruned at every write, so a hash kept alive
  by another rule holds no stale entries of this one); a redelivered event id is found in the
  array, not added again, and reported as not new. A settlement after the card's last one (the
  usual case) is written by appending its entry's JSON text (built by :func:`queue_windows`) to
  the stored text; cjson re-encodes only when an entry goes in earlier or old ones are pruned.
  A card's first settlement is one ``HSETNX`` of its entry text (no read, no decode); when the
  field exists, the stored text and the entry are read and decoded together (one cjson call).
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
from msgspec.msgpack import encode as _pack

from detectors.drugs import EMPTY, DrugList, is_placeholder
from stream.events import Settlement

TZ_OFFSET_S = 8 * 3600
DAY_S = 86400
WINDOWS_S = (3600, 86400, 7 * 86400)
VOLUME_TTL_S = 14 * 86400
#: the field of the per-card hash (``card_hash = "c"``) holding a card's recent settlements (no parameter
#: in the name: none changes what an entry means; a longer or shorter horizon just keeps more or fewer)
CARD_FIELD = "ml_outlier"
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
-- Card windows (one field of the per-card hash) and per-partition physician / institution volumes,
-- one call per batch. ARGV[1] JSON [lateness, week_s, vol_ttl, base_days], ARGV[2] the card hash field,
-- ARGV[3] MessagePack [volume key, ...] (the batch's distinct institution / physician keys),
-- ARGV[4] MessagePack (numbers in binary: no strtod), flat (one table, not one per event): [day, card hash key,
-- institution volume key index, physician volume key index (0: none), entry, ...] where entry is the event's card
-- entry as JSON text, [t, event_id, institution, district, days_supply]: a card's first settlement (the common
-- case) is stored as is, never decoded; the others are decoded (cjson) for their values.
-- Every card and volume key is read once and written once per batch. Returns one string: a line of
-- 17 numbers per event (see Window.from_reply).
local cfg = cjson.decode(ARGV[1])
local lateness, week, base_days = cfg[1], cfg[2], cfg[4]
local vol_ttl = string.format('%d', cfg[3])
local field = ARGV[2]
local vkeys = cmsgpack.unpack(ARGV[3])
local evs = cmsgpack.unpack(ARGV[4])
local horizon = week + lateness
local match, fmt, tinsert, concat, sub = string.match, string.format, table.insert, table.concat, string.sub

-- integers as text, each formatted once (counts, days and day numbers recur)
local IS = {}
local function istr(n)
  local s = IS[n]
  if not s then s = fmt('%d', n); IS[n] = s end
  return s
end

-- volume state of every institution / physician of the batch, read with one MGET per 500 keys:
-- {d = local day, n = settlements that day, b = baseline per day (bs: as stored, '%.6f'), k = completed days;
-- f = fresh, c = changed}
local vn = #vkeys
local vols = {}
for j = 1, vn, 500 do
  local last = j + 499
  if last > vn then last = vn end
  local vals = redis.call('MGET', unpack(vkeys, j, last))
  for m = j, last do
    local v, s = vals[m - j + 1], {}
    if v then
      local s1, s2, s3, s4 = match(v, '^(%S+) (%S+) (%S+) (%S+)$')
      s.d = tonumber(s1); s.n = tonumber(s2); s.b = tonumber(s3); s.k = tonumber(s4)
      if s.b then s.bs = s3 end   -- written as fmt('%.6f', b)
    end
    vols[m] = s
  end
end

-- roll a volume state to local day `day` (closing the completed days into the baseline), count the
-- settlement when new; returns today's count (-1 when the state is on a later day), baseline (as
-- formatted for the reply and the stored value, bs), days
local function roll(s, day, new)
  local fresh = false
  if not s.d then s.d = day; s.n = 0; s.b = 0; s.bs = '0.000000'; s.k = 0; fresh = true end
  if day > s.d then
    local b = s.b
    local gap = day - s.d
    if gap > 3 * base_days then gap = 3 * base_days end
    local k = s.k
    for j = 1, gap do
      local x = 0
      if j == 1 then x = s.n end
      k = k + 1
      local a = 1 / k
      if a < 1 / base_days then a = 1 / base_days end
      b = b + a * (x - b)
    end
    s.bs = fmt('%.6f', b); s.b = tonumber(s.bs); s.k = k; s.d = day; s.n = 0; fresh = true   -- as stored
  end
  local today = -1
  local changed = fresh
  if day == s.d then
    if new then s.n = s.n + 1; changed = true end
    today = s.n
  end
  if fresh then s.f = true end
  if changed then s.c = true end
  return today, s.bs, s.k
end
-- the card field: flat array t, event_id, institution, district, days_supply per settlement, sorted by
-- (t, event_id), pruned at write to newest - week - lateness. While a card only gains settlements after its
-- last one, its new value is the stored text with the new entries' text appended (no re-encoding).
-- cards: card -> its settlements, or the entry text of its only one (a first settlement, not decoded)
local cards, corder, cn = {}, {}, 0
-- card -> stored text (loaded cards only); the entry texts appended since, comma-separated, without brackets
-- ('': unchanged; false: an entry went in before the last one, re-encode); card -> true when its value (an entry
-- text in cards) is already written
local raws, apps, done = {}, {}, {}
local FIRST = '1 1 1 1 1 1 1 1 1 1 0.0000 '   -- the window part of a card's first settlement
local out = {}
local o = 0
for i = 1, #evs, 5 do
  local day, card, ivi, pvi, entry = evs[i], evs[i + 1], evs[i + 2], evs[i + 3], evs[i + 4]
  local new = true
  local head = FIRST
  local c = cards[card]
  if not c then
    cn = cn + 1; corder[cn] = card
    apps[card] = ''
    if redis.call('HSETNX', card, field, entry) == 1 then
      -- the card's first settlement in the window (the common case): stored as is, counts itself only
      cards[card] = entry; done[card] = true
    else
      -- the stored settlements and this one's entry (last), decoded in one call
      local raw = redis.call('HGET', card, field)
      if raw and sub(raw, -1) == ']' then
        local ok, v = pcall(cjson.decode, sub(raw, 1, -2) .. ',' .. sub(entry, 2))
        if ok and type(v) == 'table' and #v > 5 then c = v; raws[card] = raw end
      end
      cards[card] = c or entry   -- unreadable state: as a first settlement (written at the end)
    end
  elseif type(c) == 'string' then   -- the card's first settlement came earlier in this batch
    apps[card] = sub(c, 2, -2)
    c = cjson.decode(sub(c, 1, -2) .. ',' .. sub(entry, 2))
    cards[card] = c; done[card] = nil
  else
    local e, n = cjson.decode(entry), #c
    c[n + 1] = e[1]; c[n + 2] = e[2]; c[n + 3] = e[3]; c[n + 4] = e[4]; c[n + 5] = e[5]
  end
  if c then   -- c: the card's settlements, this one's entry last (not yet in its place)
    local n = #c - 5
    local t, eid, inst, dist, supply = c[n + 1], c[n + 2], c[n + 3], c[n + 4], c[n + 5]
    local c1, c2, c3, i1, i2, i3, d1, d2, d3 = 0, 0, 0, 0, 0, 0, 0, 0, 0
    local on_hand = 0
    local pos = nil
    local li, ld = {}, {}      -- institution / district -> youngest age
    for m = 1, n, 5 do
      local te, id = c[m], c[m + 1]
      if id == eid then new = false end
      if not pos and (te > t or (te == t and id > eid)) then pos = m end
      local age = t - te
      if age >= 0 and age <= week then
        c3 = c3 + 1
        if age <= 86400 then c2 = c2 + 1; if age <= 3600 then c1 = c1 + 1 end end
        local ins, dis = c[m + 2], c[m + 3]
        local x = li[ins]
        if not x or age < x then li[ins] = age end
        x = ld[dis]
        if not x or age < x then ld[dis] = age end
        if id ~= eid then
          local left = c[m + 4] - age / 86400
          if left > 0 then on_hand = on_hand + left end
        end
      end
    end
    if new and not pos then   -- after the card's last settlement (the usual case): already in its place
      local a = apps[card]
      if a == '' then apps[card] = sub(entry, 2, -2) elseif a then apps[card] = a .. ',' .. sub(entry, 2, -2) end
    else
      c[n + 5] = nil; c[n + 4] = nil; c[n + 3] = nil; c[n + 2] = nil; c[n + 1] = nil
      if new then
        tinsert(c, pos, supply); tinsert(c, pos, dist); tinsert(c, pos, inst); tinsert(c, pos, eid); tinsert(c, pos, t)
        apps[card] = false
      end
    end
    if new then   -- this settlement itself, age 0
      c1 = c1 + 1; c2 = c2 + 1; c3 = c3 + 1
      li[inst] = 0; ld[dist] = 0
    end
    for _, age in pairs(li) do
      i3 = i3 + 1
      if age <= 86400 then i2 = i2 + 1; if age <= 3600 then i1 = i1 + 1 end end
    end
    for _, age in pairs(ld) do
      d3 = d3 + 1
      if age <= 86400 then d2 = d2 + 1; if age <= 3600 then d1 = d1 + 1 end end
    end
    local oh = '0.0000 '
    if on_hand ~= 0 then oh = fmt('%.4f ', on_hand) end
    head = (new and '1 ' or '0 ') .. (IS[c1] or istr(c1)) .. ' ' .. (IS[c2] or istr(c2)) .. ' ' ..
           (IS[c3] or istr(c3)) .. ' ' .. (IS[i1] or istr(i1)) .. ' ' .. (IS[i2] or istr(i2)) .. ' ' ..
           (IS[i3] or istr(i3)) .. ' ' .. (IS[d1] or istr(d1)) .. ' ' .. (IS[d2] or istr(d2)) .. ' ' ..
           (IS[d3] or istr(d3)) .. ' ' .. oh
  end
  -- the volumes (today's count: the same day's state is just counted, any other is rolled); the reply's
  -- pieces go straight into out (one concat at the end, no string per event)
  local s = vols[ivi]
  local it
  if s.d == day then
    it = s.n
    if new then it = it + 1; s.n = it; s.c = true end
  else
    it = (roll(s, day, new))
  end
  local ib, ikd = s.bs, s.k
  out[o + 1] = head
  if pvi > 0 then
    s = vols[pvi]
    local pt
    if s.d == day then
      pt = s.n
      if new then pt = pt + 1; s.n = pt; s.c = true end
    else
      pt = (roll(s, day, new))
    end
    out[o + 2] = IS[pt] or istr(pt); out[o + 3] = ' '; out[o + 4] = s.bs; out[o + 5] = ' '
    out[o + 6] = IS[s.k] or istr(s.k); out[o + 7] = ' '
  else
    out[o + 2] = '-1 0.000000 0 '; out[o + 3] = ''; out[o + 4] = ''; out[o + 5] = ''; out[o + 6] = ''; out[o + 7] = ''
  end
  out[o + 8] = IS[it] or istr(it); out[o + 9] = ' '; out[o + 10] = ib; out[o + 11] = ' '
  out[o + 12] = IS[ikd] or istr(ikd); out[o + 13] = '\n'
  o = o + 13
end
out[o] = nil   -- no newline after the last line

for j = 1, cn do
  local card = corder[j]
  local a, c = apps[card], cards[card]
  if type(c) == 'string' then   -- the card's only settlement
    if not done[card] then redis.call('HSET', card, field, c) end
  elseif a ~= '' then
    local cut = c[#c - 4] - horizon
    local val
    if c[1] < cut then
      local keep, kn = {}, 0
      for m = 1, #c, 5 do
        if c[m] >= cut then
          for q = 0, 4 do keep[kn + 1 + q] = c[m + q] end
          kn = kn + 5
        end
      end
      val = cjson.encode(keep)
    elseif not a then
      val = cjson.encode(c)
    else
      local raw = raws[card]
      if raw then val = sub(raw, 1, -2) .. ',' .. a .. ']' else val = '[' .. a .. ']' end
    end
    redis.call('HSET', card, field, val)
  end
end
for j = 1, vn do
  local s = vols[j]
  if s.c then
    local val = istr(s.d) .. ' ' .. istr(s.n) .. ' ' .. s.bs .. ' ' .. istr(s.k)
    if s.f then
      redis.call('SET', vkeys[j], val, 'EX', vol_ttl)
    else
      redis.call('SET', vkeys[j], val, 'KEEPTTL')
    end
  end
end
return concat(out)
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
        return cls.from_tokens(reply.split())

    @classmethod
    def from_tokens(cls, r: Sequence[bytes | str], o: int = 0) -> "Window":
        """The window of the event whose 17 numbers start at ``r[o]`` (a batch's reply, split once)."""
        return cls(r[o] == b"1" or r[o] == "1", (int(r[o + 1]), int(r[o + 2]), int(r[o + 3])),
                   (int(r[o + 4]), int(r[o + 5]), int(r[o + 6])), (int(r[o + 7]), int(r[o + 8]), int(r[o + 9])),
                   float(r[o + 10]), int(r[o + 11]), float(r[o + 12]), int(r[o + 13]), int(r[o + 14]),
                   float(r[o + 15]), int(r[o + 16]))


#: numbers per event in :data:`LUA`'s reply, and the position of each card-window feature's count
#: among them (the models bin these straight from the reply's tokens)
REPLY_WIDTH = 17
COUNT_TOKENS: dict[str, int] = {"card_n_1h": 1, "card_n_24h": 2, "card_n_7d": 3, "card_inst_1h": 4,
                                "card_inst_24h": 5, "card_inst_7d": 6, "card_dist_1h": 7, "card_dist_24h": 8,
                                "card_dist_7d": 9}


def local_day(ts: float) -> int:
    """Local (+08:00) calendar day number of an event time.

    >>> local_day(1795482785.0) - local_day(1795482785.0 - 86400)
    1
    """
    return int((ts + TZ_OFFSET_S) // DAY_S)


def days_supply(ev: Settlement) -> int:
    """Days of treatment the drug lines of ``ev`` supply (sum of ``days_supply``; lines without it count 0)."""
    return sum(it.days_supply or 0 for it in ev.items if it.category == "drug")


def resale_amount(ev: Settlement, resale: DrugList) -> float:
    """Amount of ``ev`` spent on the drugs of ``resale`` (CNY)."""
    amt = 0.0
    if resale is not EMPTY:
        for it in ev.items:
            if it.category == "drug" and resale.matches(it.code, it.name):
                amt += it.amount
    return amt


def _ratio(today: int, base: float, days: int) -> float:
    if today < 0 or days <= 0:
        return 1.0
    return round((today + 1) / (base + 1), 2)


def features(ev: Settlement, w: Window, resale: DrugList = EMPTY) -> dict[str, float]:
    """The feature vector of ``ev`` given its windows ``w`` (see the module docstring for each name)."""
    total = ev.total_amount
    resale_amt = resale_amount(ev, resale)
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


_placeholders: dict[str, bool] = {}


def _placeholder(v: str) -> bool:
    hit = _placeholders.get(v)
    if hit is None:
        hit = is_placeholder(v)
        if len(_placeholders) < 200_000:
            _placeholders[v] = hit
    return hit


def queue_windows(pipe: Any, sha: str, events: Sequence[Settlement], prefix: str, *, lateness_s: int,
                  card_prefix: str | None = None, resale: DrugList = EMPTY,
                  extras: list[tuple[int, float]] | None = None) -> int:
    """Queue one ``EVALSHA`` of :data:`LUA` for ``events``: volume keys under ``prefix`` (``cw:{run}:ml_outlier``),
    card state in field :data:`CARD_FIELD` of the hashes under ``card_prefix`` (the processor's
    ``cw:{run}:c:``; standalone, ``{prefix}:c:``).

    The reply is one string, a line per event in order: :func:`parse_windows`. When ``extras`` is a
    list, each event's ``(days_supply, resale_amount)`` is appended to it (for :func:`features` without
    a second pass over the lines). Returns 1.
    """
    cfg = [lateness_s, WINDOWS_S[2], VOLUME_TTL_S, BASELINE_DAYS]
    cp = f"{prefix}:c:" if card_prefix is None else card_prefix
    rows: list[Any] = []
    add = rows.extend
    vkeys: list[str] = []
    # partition -> its key prefix and the 1-based index in vkeys of each institution's / physician's volume key
    parts: dict[int, tuple[str, dict[str, int], dict[str, int]]] = {}
    placeholders = _placeholders
    dumps = orjson.dumps
    with_resale, matches = extras is not None and resale is not EMPTY, resale.matches
    part: int | None = None
    for ev in events:
        if ev.partition != part:   # a batch comes partition by partition: its indexes stay in locals
            part = ev.partition
            px = parts.get(part)
            if px is None:
                px = parts[part] = (f"{prefix}:p{part}:", {}, {})
            pp, inst_ix, phys_ix = px
        inst = ev.institution_id
        ivi = inst_ix.get(inst)
        if ivi is None:
            vkeys.append(pp + "inst:" + inst)
            ivi = inst_ix[inst] = len(vkeys)
        phys = ev.physician_id
        if phys is None:
            pvi = 0
        else:
            pvi = phys_ix.get(phys)
            if pvi is None:   # a placeholder physician has no volume key: 0
                ph = placeholders.get(phys)
                if ph is None:
                    ph = _placeholder(phys)
                if ph:
                    pvi = 0
                else:
                    vkeys.append(pp + "phys:" + phys)
                    pvi = len(vkeys)
                phys_ix[phys] = pvi
        supply = 0
        ramt = 0.0   # resale_amount(ev, resale), in the same pass over the lines
        for it in ev.items:
            if it.category == "drug":
                supply += it.days_supply or 0
                if with_resale and matches(it.code, it.name):
                    ramt += it.amount
        if extras is not None:
            extras.append((supply, ramt))
        ts = ev.ts
        t = int(ts)
        if t != ts:  # the card field keeps 14 significant digits (cjson): send what it will hold
            t = float(f"{ts:.14g}")
        add((int((ts + TZ_OFFSET_S) // DAY_S), cp + ev.card_id, ivi, pvi,
             dumps((t, ev.event_id, inst, ev.district, supply)).decode()))
    pipe.evalsha(sha, 0, dumps(cfg), CARD_FIELD, _pack(vkeys), _pack(rows))
    return 1


def reply_tokens(reply: bytes | str) -> list[bytes]:
    """A batch's reply split into its numbers, as bytes (:data:`REPLY_WIDTH` per event, in order).

    >>> reply_tokens("1 1 1 1 1 1 1 1 1 1 0.0000 -1 0.000000 0 1 0.000000 0")[:2]
    [b'1', b'1']
    """
    if not reply:
        return []
    return (reply.encode() if isinstance(reply, str) else reply).split()


def parse_windows(reply: bytes | str) -> list[Window]:
    """The :class:`Window` of every event of a batch from :data:`LUA`'s reply."""
    r = reply_tokens(reply)
    return [Window.from_tokens(r, o) for o in range(0, len(r), REPLY_WIDTH)]
