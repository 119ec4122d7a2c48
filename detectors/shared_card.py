"""``shared_card``: signs that more than one person settles with one card (冒用/出借医保卡).

Inspectors look for a card that is in two places at once: (a) *impossible travel*, two
settlements in districts further apart than anyone can travel in the time between them
(district centroids from the configured table, haversine distance, ``max_speed_kmh``
door to door, ``slack_s`` for settlement clocks; pairs closer than ``min_distance_km`` or
in neighbouring districts never count, since centroids of big districts such as 浦东 say
little about where in the district the institution is); (b) outpatient or pharmacy
settlements at *another* institution while the card's inpatient stay is open (住院期间
门诊/购药: from ``admitted_at`` + ``stay_grace_s`` until the discharge event closes the
stay; the inpatient institution's own events are fine); (c) a *child's card* (age below
``child_max_age`` from ``birth_year``, or category ``child`` when the birth year is
missing) buying drugs that are not used in children: ``adult_drugs`` (statins,
antiplatelets, oral anticoagulants — not insulin, which children with type-1 diabetes
need) or any drug settled under an adult-onset diagnosis in ``adult_diagnoses`` (e.g.
E11 type-2 diabetes), at least ``min_days_supply`` days of it. One alert per card and
episode (conflicts within ``episode_s`` of each other); ``metrics.kind`` names the sign(s).

Cards arrive in order (one partition per card), so all state is per card and every
conflict is found again, identically, when an event is redelivered. The card's state is two
fields of its hash ``cw:{run}:c:{card}``, read and written once per batch. Whenever the card
has an event, settlements older than its newest event time minus ``history_s``, and stays
scored below that, are dropped. The processor expires the hash; this rule needs it
``history_s`` + lateness after the card's last event (``card_ttl_s``). Stays are rare and
may matter for ``max_stay_s``, so they have a key of their own rather than keeping every
card hash that long:

* ``shared_card:recent:{history_s}`` — the card's outpatient, emergency and pharmacy
  settlements of the last ``history_s``, a JSON array of ``t, event_id, district, visit,
  institution`` (five values per settlement), ordered by time, then event id (a settlement
  delivered again is stored once). A card's first settlement (no field, no stays: the usual
  case) is written as its entry's text, built in Python exactly as cjson writes it (``HSETNX``,
  no decoding or encoding in Lua); a later settlement after the card's last one is appended to
  the stored text. The format is the one earlier versions wrote, so a worker upgraded
  mid-stream reads their state as is;
* ``cw:{run}:shared_card:stays:{history_s},{max_stay_s}:{card}`` — its inpatient stays (only on
  cards with one; expires ``max_stay_s`` + lateness after its last change), a
  JSON array of ``score, "admission\\tinstitution\\tadmitted\\tdischarged\\tlast bill\\tfirst bill
  id\\tfirst bill time"``, scored by when the stay stops mattering: ``max_stay_s`` after the last
  bill, ``history_s`` after the discharge. An inpatient bill looks back over the recent
  settlements too (those before the first bill);
* ``cw:{run}:shared_card:{history_s}:{card}:ep`` — the open episode: ``start``/``last``, one
  ``e\\t{event_id}`` field per evidence event (its time) and one field per conflict (which sign
  and its numbers); it expires ``episode_s`` + lateness after its last conflict.

>>> sc = SharedCard(districts={"310151": {"lat": 31.623, "lon": 121.565},
...                            "310120": {"lat": 30.918, "lon": 121.518}})
>>> sc
SharedCard(max_speed_kmh=60, min_distance_km=20, slack_s=600, districts=2, ...)
>>> round(sc.distance_km("310151", "310120"))
79
>>> SharedCard(districts={"310101": {"lat": 31.23, "lon": 121.48}}, max_speed_kmh=0)
Traceback (most recent call last):
...
ValueError: shared_card: max_speed_kmh must be a positive number, got 0
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import orjson
from msgspec.msgpack import encode as _pack

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors.base import Detector, Namespace, check_positive
from detectors.drugs import _SEPARATORS, clean_text as _clean, placeholder_institution as _placeholder_inst, unusable_ids as _unusable  # noqa: F401
from detectors.drugs import DrugList

_VISIT = {"outpatient": "o", "emergency": "e", "pharmacy": "p", "inpatient": "i"}
_KIND_ORDER = ("impossible_travel", "inpatient_overlap", "child_adult_drug")
from stream.events import Settlement, iso

LUA = r"""
-- ARGV: nd, district codes * nd, required-seconds matrix (nd*nd, comma separated),
--       horizon, keep, grace, max_stay, episode, ttl_ep, card hash prefix, recent field, stays key prefix,
--       episode key prefix, then the events as one flat MessagePack array, two values per event: card, then
--       either the settlement's entry (its recent values t, event_id, district, visit, institution as cjson
--       encodes them, built in Python: an outpatient, emergency or pharmacy settlement that is no child's
--       adult drug) or the array t, event_id, district, visit (o/e/p/i), institution, admission_id,
--       admitted_at, discharged_at ('' = none), child detail ('' = none), entry ('' = none)
-- A card's recent settlements (a field of its hash) and stays (a key of their own; one MGET for all the
-- batch's cards) are read once per card and batch and written back once, if changed. A card's first
-- settlement (no recent field, no stays: the usual case) is stored as its entry text at once (HSETNX: one
-- call, no decoding, no encoding); a settlement after the card's last one is appended to the stored text;
-- cjson re-encodes only when one goes in earlier, moves or old ones are pruned:
--   recent: [t, event_id, district, visit, institution, ...] (5 per settlement), ordered by
--           (t, event_id\tdistrict\tvisit\tinstitution), as a sorted set with that member would be;
--   stays:  [score, member, ...], member = admission\tinstitution\tadmitted\tdischarged\tlast bill\t
--           first bill id\tfirst bill time, ordered by (score, member); score = when it stops mattering.
-- Both are pruned by event time (below t - keep); the episode hash is {episode key prefix}{card}:ep.
-- returns one {card, episode hash (field, value)*} per event that found a conflict
local SEP = '\t'
local function split(s, sep)
  sep = sep or SEP
  local out = {}
  local p = 1
  while true do
    local q = string.find(s, sep, p, true)
    if not q then out[#out + 1] = string.sub(s, p); return out end
    out[#out + 1] = string.sub(s, p, q - 1)
    p = q + 1
  end
end
local floor = math.floor
local function store(x)   -- a time as JSON: an integer as is, any other number exactly, as text
  if x == floor(x) and x < 1e14 and x > -1e14 then return x end
  return string.format('%.17g', x)
end
local a = 1
local nd = tonumber(ARGV[a]); a = a + 1
local didx = {}
for j = 1, nd do didx[ARGV[a]] = j; a = a + 1 end
local R = {}
for x in string.gmatch(ARGV[a], '[^,]+') do R[#R + 1] = tonumber(x) end
a = a + 1
local horizon = tonumber(ARGV[a]); local keep = tonumber(ARGV[a + 1]); local grace = tonumber(ARGV[a + 2])
local max_stay = tonumber(ARGV[a + 3]); local E = tonumber(ARGV[a + 4]); local ttl_ep = tonumber(ARGV[a + 5])
local cp, FR, FS, epp = ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
local ttl_stay = tonumber(ARGV[a + 10])
a = a + 11

local x = cmsgpack.unpack(ARGV[a])
local sub, abs, tinsert, tremove = string.sub, math.abs, table.insert, table.remove
local cache, cards = {}, {}   -- card -> {recent, stays, recent changed, stays changed}
local stays = {}              -- card -> its stays key's value (false: none), all read at once
do
  local ks, kc = {}, {}
  for b = 1, #x, 2 do
    local card = x[b]
    if stays[card] == nil then stays[card] = false; ks[#ks + 1] = FS .. card; kc[#kc + 1] = card end
  end
  for i = 1, #ks, 1000 do
    local got = redis.call('MGET', unpack(ks, i, math.min(i + 999, #ks)))
    for j = 1, #got do stays[kc[i + j - 1]] = got[j] end
  end
end
local function load(card, t, v)   -- for the card's first event of the batch (time t, visit v)
  local c = cache[card]
  if c then return c end
  local hk = cp .. card
  local g1, g2 = redis.call('HGET', hk, FR), stays[card]
  local rec, st = {}, {}
  local raw = false   -- the recent field's text while it is valid (false: re-encode at write)
  local dirty = false
  if g1 then
    rec = cjson.decode(g1)
    local newest = rec[#rec - 4]
    if type(newest) ~= 'number' then newest = tonumber(newest) end
    if v ~= 'i' and newest < t - keep then
      -- all out of reach (the card hash lives longer for other rules): this event's pruning drops them all, and
      -- no trip is that long (only an inpatient bill's look-back reads them), so drop them now: no conversion,
      -- and the new value is this event's entry text
      rec = {}
      dirty = true
    else
      raw = g1
      for m = 1, #rec, 5 do if type(rec[m]) ~= 'number' then rec[m] = tonumber(rec[m]) end end
    end
  end
  if g2 then
    st = cjson.decode(g2)
    for m = 1, #st, 2 do if type(st[m]) ~= 'number' then st[m] = tonumber(st[m]) end end
  end
  c = {rec, st, dirty, false, hk, raw}
  cache[card] = c
  cards[#cards + 1] = card
  return c
end
local function add_recent(c, t, eid, dc, v, inst, entry)   -- ZADD: a known member only moves to its new time
  local rec = c[1]
  for m = 1, #rec, 5 do
    if rec[m + 1] == eid and rec[m + 2] == dc and rec[m + 3] == v and rec[m + 4] == inst then
      if rec[m] == t then return end
      for _ = 1, 5 do tremove(rec, m) end
      c[6] = false
      break
    end
  end
  local mem = nil
  local pos = #rec + 1   -- a card's events arrive (about) in order: look for the place from the end
  while pos > 1 do
    local pt = rec[pos - 5]
    if pt < t then break end
    if pt == t then
      mem = mem or (eid .. SEP .. dc .. SEP .. v .. SEP .. inst)
      if table.concat(rec, SEP, pos - 4, pos - 1) < mem then break end
    end
    pos = pos - 5
  end
  if pos > #rec then   -- the usual case: the card's latest settlement, its text appended
    local raw = c[6]
    if entry == '' then c[6] = false
    elseif pos == 1 then c[6] = entry
    elseif raw then c[6] = sub(raw, 1, -2) .. ',' .. sub(entry, 2) end
    rec[pos] = t; rec[pos + 1] = eid; rec[pos + 2] = dc; rec[pos + 3] = v; rec[pos + 4] = inst
  else
    tinsert(rec, pos, inst); tinsert(rec, pos, v); tinsert(rec, pos, dc)
    tinsert(rec, pos, eid); tinsert(rec, pos, t)
    c[6] = false
  end
  c[3] = true
end
local function rem_stay(c, mem)
  local st = c[2]
  for m = 1, #st, 2 do
    if st[m + 1] == mem then table.remove(st, m); table.remove(st, m); c[4] = true; return end
  end
end
local function add_stay(c, score, mem)
  rem_stay(c, mem)
  local st = c[2]
  local pos = #st + 1
  while pos > 1 do
    local ps = st[pos - 2]
    if ps < score or (ps == score and st[pos - 1] < mem) then break end
    pos = pos - 2
  end
  table.insert(st, pos, mem); table.insert(st, pos, score)
  c[4] = true
end
local function prune(c, cut)   -- both are in time / score order: drop the prefix below cut
  for w = 1, 2 do
    local lst = c[w]
    if #lst > 0 and lst[1] < cut then
      local step = w == 1 and 5 or 2
      local k = 1
      while k <= #lst and lst[k] < cut do k = k + step end
      local kept = {}
      for m = k, #lst do kept[#kept + 1] = lst[m] end
      c[w] = kept
      c[w + 2] = true
      if w == 1 then c[6] = false end
    end
  end
end

local out = {}
for b = 1, #x, 2 do
  local card, e = x[b], x[b + 1]
  local c = cache[card]
  -- the card's first settlement in reach and no stays: stored as sent; it conflicts with nothing but itself.
  -- Cached as its entry text, made a full entry only if the card comes again in this batch.
  if c == nil and type(e) == 'string' and not stays[card] and redis.call('HSETNX', cp .. card, FR, e) == 1 then
    cache[card] = e
  else
    local t, eid, dc, v, inst, aid, adm, dis, child, entry
    if type(e) == 'string' then
      local d = cjson.decode(e)
      t, eid, dc, v, inst, aid, adm, dis, child, entry = tonumber(d[1]), d[2], d[3], d[4], d[5], '', '', '', '', e
    else
      t, eid, dc, v, inst, aid, adm, dis, child, entry = e[1], e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9], e[10]
    end
    if c == nil then
      c = load(card, t, v)
    elseif type(c) == 'string' then
      local d = cjson.decode(c)
      c = {{tonumber(d[1]), d[2], d[3], d[4], d[5]}, {}, false, false, cp .. card, c}
      cache[card] = c
      cards[#cards + 1] = card
    end
    local found = nil   -- {conflict time, detail field, detail value, eid, t[, eid2, t2]}, ...
    if v ~= 'i' then add_recent(c, t, eid, dc, v, inst, entry) end
    -- the card's recent settlements (this one included) and stays as they are before this event's pruning
    local rec, st = c[1], c[2]
    if v ~= 'i' then
      local di = didx[dc]
      if di then   -- (a) impossible travel against the card's settlements around t
        for m = 1, #rec, 5 do
          local t2, e2, d2, i2 = rec[m], rec[m + 1], rec[m + 2], rec[m + 4]
          local dj = didx[d2]
          if dj and dj ~= di and e2 ~= eid and (inst == '' or i2 ~= inst) and math.abs(t - t2) < horizon then
            local r = R[(di - 1) * nd + dj]
            if r > 0 and math.abs(t - t2) < r then
              local e1, t1, d1, i1, eb, tb, db, ib = eid, t, dc, inst, e2, t2, d2, i2
              if t2 < t or (t2 == t and e2 < eid) then
                e1, t1, d1, i1, eb, tb, db, ib = e2, t2, d2, i2, eid, t, dc, inst
              end
              found = found or {}; found[#found + 1] = {math.max(t, t2), 'T' .. SEP .. e1 .. SEP .. eb,
                d1 .. SEP .. db .. SEP .. tostring(t1) .. SEP .. tostring(tb) .. SEP .. i1 .. SEP .. ib, e1, t1, eb, tb}
            end
          end
        end
      end
      if (v == 'o' or v == 'p') and inst ~= '' then   -- (b) forward: a settlement elsewhere during an open stay
        local lo = t - keep
        for m = 1, #st, 2 do
          if st[m] >= lo then
            local f = split(st[m + 1])
            local sadm = tonumber(f[3]); local sdis = tonumber(f[4]); local ft = tonumber(f[7])
            if f[2] ~= inst and t >= sadm + grace and (not sdis or t < sdis) and t <= tonumber(f[5]) + max_stay then
              found = found or {}; found[#found + 1] = {math.max(t, ft), 'S' .. SEP .. eid,
                f[1] .. SEP .. f[2] .. SEP .. f[3] .. SEP .. f[4] .. SEP .. inst .. SEP .. tostring(t), eid, t, f[6], ft}
            end
          end
        end
      end
    else
      -- an inpatient bill: open, extend or close its stay, then look back over the recent settlements
      local cur, curm = nil, nil
      for m = 1, #st, 2 do
        local f = split(st[m + 1])
        if f[1] == aid then cur = f; curm = st[m + 1] end
      end
      local sadm = tonumber(adm); local sdis = tonumber(dis); local slast = t; local fe = eid; local ft = t
      if cur and not sdis then   -- an open bill after the stay's discharge: a new stay under the same key
        local od = tonumber(cur[4])
        if od and t > od then cur = nil end
      end
      if cur then
        if not sadm then sadm = math.min(tonumber(cur[3]), t) end
        if not sdis then sdis = tonumber(cur[4]) end
        slast = math.max(tonumber(cur[5]), t)
        local ct = tonumber(cur[7])
        if ct < t or (ct == t and cur[6] < eid) then fe = cur[6]; ft = ct end
      end
      if not sadm then sadm = t end
      local mem = table.concat({aid, inst, tostring(sadm), sdis and tostring(sdis) or '', tostring(slast), fe,
        tostring(ft)}, SEP)
      if curm ~= mem then
        if curm then rem_stay(c, curm) end
        -- scored by when it stops mattering: an open stay after max_stay, a closed one soon after discharge
        add_stay(c, sdis and math.max(sdis, slast) + keep or slast + max_stay, mem)
      end
      if inst ~= '' then
        for m = 1, #rec, 5 do
          local t2, e2, v2, i2 = rec[m], rec[m + 1], rec[m + 3], rec[m + 4]
          if (v2 == 'o' or v2 == 'p') and i2 ~= '' and i2 ~= inst and t2 >= sadm + grace
              and (not sdis or t2 < sdis) and t2 <= slast + max_stay then
            found = found or {}; found[#found + 1] = {math.max(t2, ft), 'S' .. SEP .. e2,
              aid .. SEP .. inst .. SEP .. tostring(sadm) .. SEP .. (sdis and tostring(sdis) or '') .. SEP .. i2 ..
              SEP .. tostring(t2), e2, t2, fe, ft}
          end
        end
      end
    end
    prune(c, t - keep)
    if child ~= '' then   -- (c) a child's card buying adult chronic-disease drugs
      found = found or {}; found[#found + 1] = {t, 'C' .. SEP .. eid, child, eid, t}
    end
    if found then
      local ek = epp .. card .. ':ep'
      local ep = redis.call('HMGET', ek, 'start', 'last')
      local start = tonumber(ep[1]); local last = tonumber(ep[2])
      local took = false
      for _, f in ipairs(found) do
        local cf = f[1]
        local take = true
        if start and cf >= start - E and cf <= last + E then
          if cf > last then last = cf end
        elseif (not start) or cf > last + E then
          start = cf; last = cf
          redis.call('DEL', ek)
        else
          take = false   -- belongs to an older episode that is no longer kept
        end
        if take then
          took = true
          redis.call('HSET', ek, f[2], f[3], 'e' .. SEP .. f[4], tostring(f[5]))
          if f[6] then redis.call('HSET', ek, 'e' .. SEP .. f[6], tostring(f[7])) end
        end
      end
      if took then
        redis.call('HSET', ek, 'start', tostring(start), 'last', tostring(last))
        redis.call('EXPIRE', ek, ttl_ep)
        out[#out + 1] = {card, redis.call('HGETALL', ek)}
      end
    end
  end
end
for _, card in ipairs(cards) do   -- write back what changed (an emptied field is removed)
  local c = cache[card]
  if c[3] then  -- recent settlements: a field of the card hash
    local lst = c[1]
    if #lst > 0 then
      local raw = c[6]
      if not raw then
        for m = 1, #lst, 5 do lst[m] = store(lst[m]) end
        raw = cjson.encode(lst)
      end
      redis.call('HSET', c[5], FR, raw)
    else
      redis.call('HDEL', c[5], FR)
    end
  end
  if c[4] then  -- stays: a key of their own (rare), kept as long as an open stay matters
    local lst = c[2]
    if #lst > 0 then
      for m = 1, #lst, 2 do lst[m] = store(lst[m]) end
      redis.call('SET', FS .. card, cjson.encode(lst), 'EX', ttl_stay)
    else
      redis.call('DEL', FS .. card)
    end
  end
end
return out
"""

_SEP = "\t"



def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km.

    >>> round(haversine_km(31.2317, 121.4846, 31.6230, 121.5650), 1)
    44.2
    """
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def _entry(dumps: Any, ts: float, eid: str, dc: str, v: str, inst: str) -> str:
    r"""A settlement's five recent values as the Lua's cjson.encode writes them (times as ``store`` keeps them).

    >>> _entry(orjson.dumps, 1700000000.0, "E/1", "310101", "o", "H\x7f")
    '[1700000000,"E\\/1","310101","o","H\\u007f"]'
    >>> _entry(orjson.dumps, 1700000000.25, "E1", "310101", "p", "")
    '["1700000000.25","E1","310101","p",""]'
    >>> _entry(orjson.dumps, 0.0, "E1", "310101", "p", "")   # cjson writes -0 for -0.0: left to Lua
    ''
    """
    if ts == 0:
        return ""
    t: Any = int(ts)
    if t != ts or not -1e14 < ts < 1e14:
        t = f"{ts:.17g}"
    out = dumps((t, eid, dc, v, inst)).decode()
    if "/" in out or "\x7f" in out:   # cjson also escapes these (orjson does not)
        out = out.replace("/", "\\/").replace("\x7f", "\\u007f")
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _num(x: str) -> float | None:
    return float(x) if x not in ("", None) else None


def _hm(ts: float) -> str:
    return iso(ts)[11:16]


class SharedCard(Detector):
    """Impossible travel, settlements elsewhere during a stay, a child's card buying adult drugs."""

    rule = "shared_card"
    subject_type = "card"
    scripts = (LUA,)
    card_hash = "c"

    def __init__(self, districts: Mapping[str, Mapping[str, Any]], *, max_speed_kmh: float = 60,
                 min_distance_km: float = 20, slack_s: int = 600, history_s: int = 21600,
                 stay_grace_s: int = 7200, max_stay_s: int = 60 * 86400, episode_s: int = 7 * 86400,
                 child_max_age: int = 14, min_days_supply: int = 14,
                 adult_drugs: Mapping[str, Sequence[str]] | None = None,
                 adult_diagnoses: Sequence[str] = ("E11", "I25", "I48", "I70"),
                 lateness_s: int = 3600, lang: str = "zh", version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        r = self.rule
        check_positive(r, "max_speed_kmh", max_speed_kmh)
        if isinstance(min_distance_km, bool) or not isinstance(min_distance_km, (int, float)) or min_distance_km < 0:
            raise ValueError(f"{r}: min_distance_km must be a non-negative number, got {min_distance_km!r}")
        if isinstance(slack_s, bool) or not isinstance(slack_s, int) or slack_s < 0:
            raise ValueError(f"{r}: slack_s must be a non-negative integer, got {slack_s!r}")
        for name, val in (("history_s", history_s), ("max_stay_s", max_stay_s), ("episode_s", episode_s),
                          ("child_max_age", child_max_age), ("min_days_supply", min_days_supply)):
            check_positive(r, name, val, integer=True)
        if isinstance(stay_grace_s, bool) or not isinstance(stay_grace_s, int) or stay_grace_s < 0:
            raise ValueError(f"{r}: stay_grace_s must be a non-negative integer, got {stay_grace_s!r}")
        if child_max_age > 18:
            raise ValueError(f"{r}: child_max_age must be <= 18, got {child_max_age}")
        self.districts = self._check_districts(districts)
        if adult_drugs is None:
            adult_drugs = {"code_prefixes": ["XC10AA", "XB01AC", "XB01AE", "XB01AF"],
                           "name_keywords": ["他汀", "氯吡格雷", "替格瑞洛", "利伐沙班", "阿哌沙班", "达比加群", "艾多沙班"]}
        if not isinstance(adult_drugs, Mapping) or set(adult_drugs) - {"code_prefixes", "name_keywords"}:
            raise ValueError(f"{r}: adult_drugs must be a mapping with code_prefixes and name_keywords, "
                             f"got {adult_drugs!r}")
        try:
            self.adult_drugs = DrugList(adult_drugs.get("code_prefixes") or (), adult_drugs.get("name_keywords") or ())
        except ValueError as exc:
            raise ValueError(f"{r}: adult_drugs: {exc}") from None
        if isinstance(adult_diagnoses, str) or not all(isinstance(x, str) and x for x in adult_diagnoses):
            raise ValueError(f"{r}: adult_diagnoses must be a list of ICD-10 code prefixes, got {adult_diagnoses!r}")
        self.adult_diagnoses = tuple(sorted({x.upper() for x in adult_diagnoses}))
        self.max_speed_kmh = max_speed_kmh
        self.min_distance_km = min_distance_km
        self.slack_s = slack_s
        self.history_s = history_s
        self.stay_grace_s = stay_grace_s
        self.max_stay_s = max_stay_s
        self.episode_s = episode_s
        self.child_max_age = child_max_age
        self.min_days_supply = min_days_supply
        # distances and the time each pair needs (seconds; 0 = never impossible), computed once
        codes = sorted(self.districts)
        self._codes = codes
        self._km: dict[tuple[str, str], float] = {}
        req: list[str] = []
        horizon = 0.0
        for x in codes:
            for y in codes:
                dx, dy = self.districts[x], self.districts[y]
                km = haversine_km(dx["lat"], dx["lon"], dy["lat"], dy["lon"])
                self._km[(x, y)] = km
                need = km / max_speed_kmh * 3600 - slack_s
                if x == y or km < min_distance_km or y in dx["neighbours"] or x in dy["neighbours"] or need <= 0:
                    need = 0.0
                horizon = max(horizon, need)
                req.append(f"{need:.3f}")
        self.horizon_s = int(math.ceil(horizon))
        if self.horizon_s > history_s:
            raise ValueError(f"{r}: history_s must cover the longest trip ({self.horizon_s} s), got {history_s}")
        # recent settlements live in the card hash; stays (rare, up to max_stay_s) in a key of their own,
        # so every card hash need not outlive an open stay
        self.card_ttl_s = history_s + lateness_s
        self.stay_ttl_s = max(max_stay_s, history_s) + lateness_s
        self._fields = (f"{r}:recent:{history_s}",)
        self._head = [len(codes), *codes, ",".join(req) or "0", self.horizon_s, history_s, stay_grace_s, max_stay_s,
                      episode_s, episode_s + lateness_s]
        self._sha = self.sha(LUA)

    def _check_districts(self, districts: Any) -> dict[str, dict[str, Any]]:
        r = self.rule
        if not isinstance(districts, Mapping) or not districts:
            raise ValueError(f"{r}: districts must be a non-empty mapping of district code to {{lat, lon}}, "
                             f"got {districts!r}")
        out: dict[str, dict[str, Any]] = {}
        for code, d in districts.items():
            code = str(code)
            if not isinstance(d, Mapping):
                raise ValueError(f"{r}: districts[{code!r}] must be a mapping with lat and lon, got {d!r}")
            unknown = set(d) - {"name", "lat", "lon", "neighbours"}
            if unknown:
                raise ValueError(f"{r}: districts[{code!r}] has unknown field(s) {sorted(unknown)}")
            for name, lim in (("lat", 90), ("lon", 180)):
                v = d.get(name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -lim <= v <= lim:
                    raise ValueError(f"{r}: districts[{code!r}].{name} must be a number in [-{lim}, {lim}], got {v!r}")
            nb = d.get("neighbours") or []
            if isinstance(nb, str) or not isinstance(nb, (list, tuple)):
                raise ValueError(f"{r}: districts[{code!r}].neighbours must be a list of district codes, got {nb!r}")
            out[code] = {"name": str(d.get("name") or code), "lat": float(d["lat"]), "lon": float(d["lon"]),
                         "neighbours": frozenset(str(x) for x in nb)}
        for code, d in out.items():
            bad = sorted(d["neighbours"] - set(out))
            if bad:
                raise ValueError(f"{r}: districts[{code!r}].neighbours has unknown district(s) {bad}")
        return out

    def params(self) -> dict[str, Any]:
        return {"max_speed_kmh": self.max_speed_kmh, "min_distance_km": self.min_distance_km, "slack_s": self.slack_s,
                "districts": len(self.districts), "history_s": self.history_s, "stay_grace_s": self.stay_grace_s,
                "max_stay_s": self.max_stay_s, "episode_s": self.episode_s, "child_max_age": self.child_max_age,
                "min_days_supply": self.min_days_supply, "adult_drugs": self.adult_drugs,
                "adult_diagnoses": list(self.adult_diagnoses), "lateness_s": self.lateness_s}

    def __repr__(self) -> str:
        p = self.params()
        return (f"SharedCard(max_speed_kmh={p['max_speed_kmh']}, min_distance_km={p['min_distance_km']}, "
                f"slack_s={p['slack_s']}, districts={p['districts']}, ...)")

    def distance_km(self, a: str, b: str) -> float:
        """Centroid distance between two configured districts."""
        return self._km[(a, b)]

    # -- per event -----------------------------------------------------------------------
    def _child_detail(self, ev: Settlement) -> str:
        """``age\\tnames\\tdays\\tdiagnoses`` when a child's card buys drugs no child takes, else ''."""
        if ev.birth_year is not None:
            age = ev.event_time.year - ev.birth_year
            if not 0 <= age < self.child_max_age:
                return ""
        elif ev.insured_category == "child":
            age = -1
        else:
            return ""
        adult_dx = [d for d in ev.diagnoses if self.adult_diagnoses and d.upper().startswith(self.adult_diagnoses)]
        names: list[str] = []
        days = 0
        by_dx = False
        for it in ev.items:
            if it.category != "drug":
                continue
            drug = self.adult_drugs.matches(it.code, it.name)
            if not (drug or adult_dx):
                continue
            if it.days_supply is not None and it.days_supply < self.min_days_supply:
                continue
            by_dx = by_dx or not drug
            names.append(_SEPARATORS.sub(" ", it.name or it.code).replace("|", "/"))
            days += it.days_supply or 0
        if not names:
            return ""
        dx = "|".join(_SEPARATORS.sub(" ", d).replace("|", "/") for d in adult_dx) if by_dx else ""
        return f"{age}{_SEP}{'|'.join(dict.fromkeys(names))}{_SEP}{days}{_SEP}{dx}"

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        rows: list[Any] = []   # two values per event: card, then its entry text or all its values (see the Lua)
        visit = _VISIT
        dumps = orjson.dumps
        for ev in events:
            card = ev.card_id
            if _unusable(card, ev.event_id):
                continue
            v = visit[ev.visit_type]
            inst = ev.institution_id
            inst = "" if _placeholder_inst(inst) else _clean(inst)
            dc = _clean(ev.district)
            child = self._child_detail(ev) if ev.birth_year is not None or ev.insured_category == "child" else ""
            entry = ""
            if v != "i":
                entry = _entry(dumps, ev.ts, ev.event_id, dc, v, inst)
                if entry and not child:
                    rows += (card, entry)
                    continue
            aid: str = ""
            adm: float | str = ""
            dis: float | str = ""
            if v == "i":
                aid = _clean(ev.admission_id or "") or f"@{inst}"
                adm = ev.admitted_at.timestamp() if ev.admitted_at is not None else ""
                dis = ev.discharged_at.timestamp() if ev.discharged_at is not None else ""
            rows += (card, [ev.ts, ev.event_id, dc, v, inst, aid, adm, dis, child, entry])
        if not rows:
            return 0
        pipe.evalsha(self._sha, 0, *self._head, ns.card_prefix(self.card_hash), self._fields[0],
                     self.key(ns, "stays", f"{self.history_s},{self.max_stay_s}", ""),
                     self.key(ns, self.history_s, ""), self.stay_ttl_s, _pack(rows))
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not replies:
            return []
        out: dict[str, Alert] = {}
        for card, flat in replies[0]:   # the card's last reply of the batch holds its whole episode so far
            h = {_s(flat[j]): _s(flat[j + 1]) for j in range(0, len(flat), 2)}
            evidence = sorted((float(v), k[2:]) for k, v in h.items() if k.startswith("e" + _SEP))
            det = {k: v for k, v in h.items() if k[:2] in ("T" + _SEP, "S" + _SEP, "C" + _SEP)}
            a = self._alert(ns, _s(card), float(h["start"]), [e for _, e in evidence], [t for t, _ in evidence], det)
            out[a.alert_id] = a
        return list(out.values())

    # -- the alert -----------------------------------------------------------------------
    def _dname(self, code: str, lang: str) -> str:
        d = self.districts.get(code)
        if d is None:
            return code
        return d["name"] if lang == "zh" else code

    def _alert(self, ns: Namespace, card: str, start: float, ids: list[str], times: list[float],
               det: dict[str, str]) -> Alert:
        travel, stays, child = [], [], []
        for field, val in det.items():
            kind, _, rest = field.partition(_SEP)
            f = val.split(_SEP)
            if kind == "T":
                d1, d2, t1, t2, i1, i2 = f[0], f[1], float(f[2]), float(f[3]), f[4], f[5]
                km = self._km.get((d1, d2), 0.0)
                gap = t2 - t1
                speed = km * 3600 / max(gap + self.slack_s, 1.0)
                travel.append({"km": km, "gap": gap, "speed": speed, "d1": d1, "d2": d2, "t1": t1, "i1": i1, "i2": i2})
            elif kind == "S":
                stays.append({"aid": f[0], "inst": f[1], "adm": float(f[2]), "dis": _num(f[3]), "other": f[4],
                              "t": float(f[5]), "eid": rest})
            elif kind == "C":
                child.append({"age": int(f[0]), "names": f[1].split("|"), "days": int(f[2]),
                              "dx": [x for x in (f[3] if len(f) > 3 else "").split("|") if x]})
        kinds = [k for k, lst in zip(_KIND_ORDER, (travel, stays, child)) if lst]
        metrics: dict[str, Any] = {"kind": "+".join(kinds), "kinds": kinds, "episode_s": self.episode_s}
        ratios: list[float] = []
        zh: list[str] = []
        en: list[str] = []
        if travel:
            b = max(travel, key=lambda x: (x["speed"], -x["t1"]))
            ratio = b["speed"] / self.max_speed_kmh
            ratios.append(ratio)
            need_min = b["km"] / self.max_speed_kmh * 60
            metrics.update(travel_pairs=len(travel), distance_km=round(b["km"], 1), gap_s=int(b["gap"]),
                           implied_speed_kmh=round(b["speed"], 1), max_speed_kmh=self.max_speed_kmh,
                           from_district=b["d1"], to_district=b["d2"])
            zh.append(f"{_hm(b['t1'])} 在{self._dname(b['d1'], 'zh')}结算、{int(b['gap'] // 60)} 分钟后在"
                      f"{self._dname(b['d2'], 'zh')}结算，两地相距约 {b['km']:.0f} 公里（按 {self.max_speed_kmh:g} 公里/小时"
                      f"至少需 {need_min:.0f} 分钟）" + (f"，共 {len(travel)} 对" if len(travel) > 1 else ""))
            en.append(f"settled in {b['d1']} at {_hm(b['t1'])} and in {b['d2']} {int(b['gap'] // 60)} min later, "
                      f"{b['km']:.0f} km apart (at least {need_min:.0f} min at {self.max_speed_kmh:g} km/h)"
                      + (f"; {len(travel)} such pairs" if len(travel) > 1 else ""))
        if stays:
            s0 = min(stays, key=lambda x: x["t"])
            n = len(stays)
            others = sorted({s["other"] for s in stays})
            ratios.append(1 + 0.5 * (n - 1))
            metrics.update(settlements_during_stay=n, admission_id=s0["aid"], inpatient_institution_id=s0["inst"],
                           admitted_at=iso(s0["adm"]), other_institutions=others)
            if s0["dis"] is not None:
                metrics["discharged_at"] = iso(s0["dis"])
            zh.append(f"在 {s0['inst']} 住院期间（{iso(s0['adm'])[:16].replace('T', ' ')} 入院"
                      + (f"，{iso(s0['dis'])[:16].replace('T', ' ')} 出院" if s0["dis"] is not None else "，未出院")
                      + f"）于 {len(others)} 家其他机构门诊/药店结算 {n} 次")
            en.append(f"{n} outpatient/pharmacy settlement(s) at {len(others)} other institution(s) during the "
                      f"inpatient stay at {s0['inst']} (admitted {iso(s0['adm'])[:16]})")
        if child:
            age = max(c["age"] for c in child)
            names = list(dict.fromkeys(nm for c in child for nm in c["names"]))
            days = sum(c["days"] for c in child)
            ratios.append(max(1.0, days / 30))
            dxs = sorted({d for c in child for d in c["dx"]})
            metrics.update(child_age=age if age >= 0 else None, adult_drugs=names, days_supply=days,
                           child_purchases=len(child), child_max_age=self.child_max_age)
            if dxs:
                metrics["adult_diagnoses"] = dxs
            who = f"{age} 岁儿童" if age >= 0 else "少儿"
            zh.append(f"{who}的卡购买成人慢病用药 {'、'.join(names)}" + (f"（诊断 {'、'.join(dxs)}）" if dxs else "")
                      + f" {len(child)} 次共 {days} 天用量")
            en.append(f"a child's card{f' (age {age})' if age >= 0 else ''} bought adult chronic-disease drugs "
                      f"{', '.join(names)}" + (f" (diagnosis {', '.join(dxs)})" if dxs else "")
                      + f" {len(child)} time(s), {days} days' supply")
        score = max(ratios) if ratios else 1.0
        if len(kinds) > 1:
            score = max(score, 1.5)
        zh_s = f"卡 {card} 疑似被他人冒用/出借：" + "；".join(zh)
        en_s = f"Card {card} appears to be used by someone else: " + "; ".join(en)
        return Alert(
            alert_id=alert_id(ns.run_id, self.rule, "card", card, str(self.episode_s), repr(start)),
            rule=self.rule, rule_version=self.version, severity=severity_for(score), score=round(score, 4),
            subject_type="card", subject_id=card, window_start=iso(min(times)), window_end=iso(max(times)),
            evidence_event_ids=ids, run_id=ns.run_id, summary=zh_s if self.lang == "zh" else en_s, summary_en=en_s,
            detected_at=now_iso(), window_s=self.episode_s, metrics=metrics,
        )
