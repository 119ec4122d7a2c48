"""``prescriber_volume``: a physician whose day jumps far above their own baseline and their peers.

Inspectors hunt physicians who lend their prescribing rights to drug dealers or run a
prescription mill for a day or two: suddenly many more settlements than usual (开药量异常),
worth much more, with a much larger share of resale-prone drugs (回流药). For each physician
and local calendar day (+08:00) the rule measures three things over the day's non-inpatient
settlements attributed to the physician: **settlements**, **amount** (``total_amount``) and
**resale-prone share** (settlements with a drug of ``resale_prone_drugs``). A measure *jumps*
when it is far above the physician's OWN baseline — the robust median over the active days
(days with any settlement, inpatient bills included) of the trailing ``baseline_days``, or of
the same weekday if that is higher (clinic days, dialysis sessions), with at least
``min_baseline_days`` active days of history: settlements >= ``own_factor`` x the median and
>= median + ``poisson_z`` x sqrt(median) (a significant jump for counts); amount >=
``own_factor`` x the median; share >= the baseline share + ``min_increase`` — AND above the
``peer_quantile`` of their PEERS' physician-days over the trailing ``peer_days`` (same
institution type, level and department; the department alone when that group has fewer than
``min_peers`` other physicians; never judged without peers). Every measure also has an
absolute floor. The rule fires when at least ``min_measures`` measures jump, including every
measure in ``require`` (by default the volume jump corroborated by value or share: a single
noisy measure at small volumes is not enough). A steadily busy level-3 physician has a high
baseline and does not fire; placeholder physician ids (未知, 0000 …) are never subjects.

Because one physician's settlements come from many partitions (cards), the verdict is made
on complete days: every baseline and peer figure comes from days before ``D`` only; a day is
evaluated once an event past ``D``'s end + lateness has been seen (a sweep of pending
physician-days, at most ``sweep_per_batch`` per batch); and a day still in progress is
evaluated against the same bound, once per batch that touched it and only once the previous
day is complete (``D``'s start + lateness), so it fires as soon as it is over the bound and
can never disagree with the complete-day verdict (same alert: episode = physician + day).
States are read once per batch and written back once, and the physician-days a batch swept
are remembered under its newest event, so a redelivered batch returns the same alerts and
leaves Redis as it was. One alert per physician and day; later evidence extends it.

State (Redis, all keys expire; per physician-day and batch one read of its counts and of each hour of
evidence the batch's events fall in, one write of them, no JSON):

* ``cw:{run}:prescriber_volume:day:{physician}:{YYYY-MM-DD}`` — the day, a hash: ``s`` =
  ``{S}{t},{n},{a},{r}<TAB>{institution}`` (``S`` is ``-``, ``s`` once swept; ``t``/``n``/``a``/``r``
  count all settlements, non-inpatient settlements, their amount in fen and the resale-prone ones;
  the institution is the day's first) and ``e{hour}`` (0 … 23, of the event time since the day's
  start) = that hour's evidence, ``|{id} {seconds since the day's start}`` per settlement (no
  ``.0``), the id as it is when plain (``[0-9A-Za-z_.:-]``), else ``~`` + its UTF-8 in hex, so a
  search for ``|{id} `` finds that id only: a redelivered event (same time, same hour) is a no-op.
  A busy physician's day (hundreds of settlements) costs each settlement no more than its hour's
  evidence; a batch puts its new evidence in front; it is sent back only for a day that fires.
  It expires 2 days + lateness after the day's end (wall clock), set when the day is first written
  (and when a late settlement reopens a swept day), not by every batch;
* ``…:{baseline_days x 86400}:{physician}`` — history hash: local day number -> ``t,n,a,r``
  and the physician's group (``g``, ``c``) and oldest kept day (``lo``); it expires
  ``baseline_days`` + 2 days + lateness after the first settlement of the physician's last active day;
* ``…:peer:{group}:{day number}:{bucket}`` — physician -> ``n,a,r`` of that day, for the peer
  statistics, each group-day spread over :data:`PEER_BUCKETS` hashes by a CRC-32 of the physician
  id (a settlement rewrites its physician's value: a shorter hash is a shorter search in Redis);
* ``…:pending`` (physician-days to evaluate, score = day end + lateness), ``…:wmp`` (newest
  event time per input partition), ``…:swept:{newest event of a batch}`` (what that batch swept).

>>> PrescriberVolume(baseline_days=28, min_baseline_days=3)  # doctest: +ELLIPSIS
PrescriberVolume(baseline_days=28, min_baseline_days=3, peer_days=7, min_peers=5, peer_quantile=0.9, ...)
>>> PrescriberVolume(baseline_days=0)
Traceback (most recent call last):
...
ValueError: prescriber_volume: baseline_days must be a positive integer, got 0
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Sequence

import orjson
from msgspec.msgpack import encode as _pack

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors._peers import TZ_OFFSET_S, day_label, day_start
from detectors.base import EXPIRE_AT_LUA, Detector, Namespace, check_positive
from detectors.drugs import EMPTY, DrugList, is_placeholder
from stream.events import Settlement, iso

LUA = EXPIRE_AT_LUA + r"""
-- ARGV[1] key prefix P (cw:{run}:prescriber_volume), ARGV[2] JSON [W, min_base, Wp, min_peers, q, n_min, n_factor,
-- n_z, a_min (fen), a_factor, s_min_r, s_inc, require mask (1 settlements, 2 amount, 4 share), min_measures,
-- lateness, sweep_max, ttl history, ttl wm, in-progress verdicts 0|1, peer buckets], ARGV[3] JSON {partition:
-- newest event time}, ARGV[4] trigger (the batch's newest event), ARGV[5] MessagePack [days, contexts, events], flat:
-- days [D, 'D', label, day start]*, contexts [physician, day index, group, coarse group, institution, peer
-- bucket]* and events [time - day start, '|' .. event token .. ' ', context index, amount fen x 8 + flags]*
-- (indexes from 0; flags 1 inpatient, 2 resale-prone, 4 after the previous day's end + lateness).
-- Keys are built here: P:day:{physician}:{label} (the day, a hash: 's' = S .. 't,n,a,r' .. TAB .. institution, S
-- '-' or 's' once swept; 'e' .. hour = that hour's evidence, ('|' .. token .. ' ' .. time - day start)*, where a
-- redelivered event's '|token ' is found), P:{W x 86400}:{physician} (history), P:peer:{group}:{D}:{bucket},
-- P:pending, P:wmp, P:swept:…. Each day's counts and each hour of evidence the batch needs are read once per
-- batch (HGET), updated in memory and written back once (HSET: new evidence in front of the old). Verdicts:
-- every physician-day the batch touched after its
-- previous day was complete (day start + lateness), judged once as of the end of the batch, then the sweep of
-- complete days (end + lateness <= newest event time). The physician-days a batch swept are remembered under
-- its trigger, so a redelivered batch returns the same verdicts.
-- Returns {physician, label, institution, group, level, values, baseline, peers, fired, evidence, D}*.
local P = ARGV[1]
local cfg = cjson.decode(ARGV[2])
local W, MINB, WP, MINP, Q = cfg[1], cfg[2], cfg[3], cfg[4], cfg[5]
local N_MIN, N_F, N_Z, A_MIN, A_F, S_MIN, S_INC = cfg[6], cfg[7], cfg[8], cfg[9], cfg[10], cfg[11], cfg[12]
local REQ, MINM, LATE, SWEEP, TTL_H, TTL_WM = cfg[13], cfg[14], cfg[15], cfg[16], tostring(cfg[17]), cfg[18]
local INPROG, NB = cfg[19] == 1, cfg[20]
local PMAX, TRIGGER = cjson.decode(ARGV[3]), ARGV[4]
local batch = cmsgpack.unpack(ARGV[5])
local DY, CX, EV = batch[1], batch[2], batch[3]
local pending, wmk = P .. ':pending', P .. ':wmp'
local HIST = P .. ':' .. (W * 86400) .. ':'
local DAYP, PEERP = P .. ':day:', P .. ':peer:'
-- (numbers go to Redis as strings formatted with '%d': Redis would format each with '%.17g', slower)
local find, sub, byte, fmt, floor = string.find, string.sub, string.byte, string.format, math.floor
local BYTE_S, BYTE_E = byte('s'), byte('e')

local function bit(mask, b) return floor(mask / b) % 2 == 1 end

local function median(xs)
  local m = #xs
  if m == 0 then return nil end
  table.sort(xs)
  if m % 2 == 1 then return xs[(m + 1) / 2] end
  return (xs[m / 2] + xs[m / 2 + 1]) / 2
end

local function quantile(xs, q)
  local m = #xs
  if m == 0 then return nil end
  table.sort(xs)
  local r = math.ceil(q * m - 1e-9)
  if r < 1 then r = 1 end
  return xs[r]
end

local function count_ok(ok)
  local c = 0
  for b = 1, 3 do if ok[b] then c = c + 1 end end
  if c < MINM then return false end
  if bit(REQ, 1) and not ok[1] then return false end
  if bit(REQ, 2) and not ok[2] then return false end
  if bit(REQ, 4) and not ok[3] then return false end
  return true
end

-- a day's state (field 's' of its hash) -> {t, n, a, r, sw, inst, s} plus the batch's working sets: seen tokens,
-- evidence chunks read (hour -> text | false), new evidence per hour and the hours it went to
local function day_of(s)
  local p1 = find(s, '\t', 1, true)
  local c1 = find(s, ',', 2, true)
  local c2 = find(s, ',', c1 + 1, true)
  local c3 = find(s, ',', c2 + 1, true)
  return {t = tonumber(sub(s, 2, c1 - 1)), n = tonumber(sub(s, c1 + 1, c2 - 1)),
          a = tonumber(sub(s, c2 + 1, c3 - 1)), r = tonumber(sub(s, c3 + 1, p1 - 1)),
          sw = byte(s, 1) == BYTE_S, inst = sub(s, p1 + 1), s = s, seen = {}, ch = {}, nw = {}, hours = {}}
end

-- a day's counts (field 's'), nil when there is no day yet. A day an earlier version stored as one string
-- ('S' .. 't,n,a,r' .. TAB .. evidence .. TAB .. institution) is converted to the hash first, its TTL kept.
local function day_state(dk)
  local st = redis.pcall('HGET', dk, 's')
  if type(st) ~= 'table' or not st.err then return st end
  local doc = redis.call('GET', dk)
  local p1 = find(doc, '\t', 1, true)
  local p2 = find(doc, '\t', p1 + 1, true)
  st = sub(doc, 1, p1 - 1) .. '\t' .. sub(doc, p2 + 1)
  local ch, hours = {}, {}
  for e in string.gmatch(sub(doc, p1 + 1, p2 - 1), '|[^|]*') do
    local sp = find(e, ' ', 2, true)
    local hour = floor(tonumber(sub(e, sp + 1)) / 3600)
    if not ch[hour] then ch[hour] = {}; hours[#hours + 1] = hour end
    ch[hour][#ch[hour] + 1] = e
  end
  local ttl = redis.call('PTTL', dk)
  local dset = {'s', st}
  for _, hour in ipairs(hours) do
    dset[#dset + 1] = 'e' .. hour
    dset[#dset + 1] = table.concat(ch[hour])
  end
  redis.call('DEL', dk)
  redis.call('HSET', dk, unpack(dset))
  if ttl > 0 then redis.call('PEXPIRE', dk, ttl) end
  return st
end

-- a day's whole evidence: its hour chunks (fields 'e0' .. 'e23')
local function evidence(dk)
  local f = redis.call('HGETALL', dk)
  local parts = {}
  for i = 1, #f, 2 do
    if byte(f[i], 1) == BYTE_E then parts[#parts + 1] = f[i + 1] end
  end
  return table.concat(parts)
end

-- own baseline from the history ('t,n,a,r' per day) of days D-W .. D-1: {lam_n, lam_a, share, active days}
local function baseline(hk, D)
  local f = {}
  for i = 1, W do f[i] = D - i end
  local v = redis.call('HMGET', hk, unpack(f))
  local ns, as, wn, wa = {}, {}, {}, {}
  local sn, sr = 0, 0
  for i = 1, W do
    local x = v[i]
    if x then
      local p1 = find(x, ',', 1, true)
      local p2 = find(x, ',', p1 + 1, true)
      local p3 = find(x, ',', p2 + 1, true)
      local n, am, r = tonumber(sub(x, p1 + 1, p2 - 1)), tonumber(sub(x, p2 + 1, p3 - 1)), tonumber(sub(x, p3 + 1))
      ns[#ns + 1] = n; as[#as + 1] = am
      sn = sn + n; sr = sr + r
      if i % 7 == 0 then wn[#wn + 1] = n; wa[#wa + 1] = am end
    end
  end
  local days = #ns
  if days < MINB then return nil end
  local ln, la = median(ns), median(as)
  local wln, wla = median(wn), median(wa)
  if wln and wln > ln then ln = wln end
  if wla and wla > la then la = wla end
  local share = 0
  if sn > 0 then share = sr / sn end
  return {ln, la, share, days}
end

-- peers' physician-days over D-WP .. D-1 in the group (else the coarse group): {level, peers, qn, qa, qs}
local function peers(phys, D, g, c)
  local groups = {g, c}
  for lvl = 1, 2 do
    local ns, as, ss, who = {}, {}, {}, {}
    local np = 0
    for i = 1, WP do
      local kp = PEERP .. groups[lvl] .. ':' .. (D - i) .. ':'
      for bk = 0, NB - 1 do
        local f = redis.call('HGETALL', kp .. bk)
        for j = 1, #f, 2 do
          if f[j] ~= phys then
            if not who[f[j]] then who[f[j]] = true; np = np + 1 end
            local x = f[j + 1]
            local p1 = find(x, ',', 1, true)
            local p2 = find(x, ',', p1 + 1, true)
            local n = tonumber(sub(x, 1, p1 - 1))
            ns[#ns + 1] = n
            as[#as + 1] = tonumber(sub(x, p1 + 1, p2 - 1))
            if n > 0 then ss[#ss + 1] = tonumber(sub(x, p2 + 1)) / n end
          end
        end
      end
    end
    if np >= MINP then
      return {lvl, np, quantile(ns, Q), quantile(as, Q), quantile(ss, Q) or 0}
    end
  end
  return nil
end

-- verdict on (phys, D) from its day m (nil when it does not fire)
local function judge(phys, D, label, m, hk, g, c)
  local n, am, r = m.n, m.a, m.r
  local cand = {n >= N_MIN, am >= A_MIN, r >= S_MIN}
  if not count_ok(cand) then return nil end
  local b = baseline(hk, D)
  if not b then return nil end
  local ln, la, sb = b[1], b[2], b[3]
  local lnf = ln
  if lnf < 1 then lnf = 1 end
  local share = 0
  if n > 0 then share = r / n end
  local own = {cand[1] and n >= N_F * lnf and n >= lnf + N_Z * math.sqrt(lnf),
               cand[2] and am >= A_F * la,
               cand[3] and share >= sb + S_INC}
  if not count_ok(own) then return nil end
  local p = peers(phys, D, g, c)
  if not p then return nil end
  local ok = {own[1] and n > p[3], own[2] and am > p[4], own[3] and share > p[5]}
  if not count_ok(ok) then return nil end
  local fired = 0
  if ok[1] then fired = fired + 1 end
  if ok[2] then fired = fired + 2 end
  if ok[3] then fired = fired + 4 end
  return {phys, label, m.inst or '', g, p[1], {n, am, r}, {tostring(ln), tostring(la), tostring(sb), b[4]},
          {p[2], tostring(p[3]), tostring(p[4]), tostring(p[5])}, fired, evidence(DAYP .. phys .. ':' .. label), D}
end

local days, hists, dirty, dorder, first, touched, torder = {}, {}, {}, {}, {}, {}, {}
local cdk, chk = {}, {}
for r = 1, #EV, 4 do
  local t, tok, ci, pk = EV[r], EV[r + 1], EV[r + 2], EV[r + 3]
  local c0 = ci * 6
  local phys, d0 = CX[c0 + 1], CX[c0 + 2] * 4
  local D, Ds, label, dstart = DY[d0 + 1], DY[d0 + 2], DY[d0 + 3], DY[d0 + 4]
  local dk, hk = cdk[ci], chk[ci]
  if not dk then
    dk, hk = DAYP .. phys .. ':' .. label, HIST .. phys
    cdk[ci], chk[ci] = dk, hk
  end
  local h = hists[hk]
  if not h then
    local st = redis.call('HMGET', hk, 'g', 'c', 'lo')
    h = {g = st[1], c = st[2], lo = tonumber(st[3])}
    if h.g and not h.c then h.g = false end
    hists[hk] = h
  end
  local m = days[dk]
  if not m then
    local st = day_state(dk)
    if st then m = day_of(st) else m = {t = 0, n = 0, a = 0, r = 0, seen = {}, ch = {}, nw = {}, hours = {}} end
    days[dk] = m
  end
  local flags = pk % 8
  local kind_o = flags % 2 == 0
  local fresh = not m.seen[tok]
  -- a redelivered event is in its own hour's chunk (same event time): the search never grows with the day
  local hour = floor(tonumber(t) / 3600)
  if fresh and m.s then
    local c = m.ch[hour]
    if c == nil then
      c = redis.call('HGET', dk, 'e' .. hour) or false
      m.ch[hour] = c
    end
    fresh = not (c and find(c, tok, 1, true))
  end
  if fresh then
    m.seen[tok] = true
    local nw = m.nw[hour]
    if not nw then
      nw = {}
      m.nw[hour] = nw
      m.hours[#m.hours + 1] = hour
    end
    nw[#nw + 1] = tok
    nw[#nw + 1] = t
    local eg, ec = CX[c0 + 3], CX[c0 + 4]
    if not h.g or (find(h.g, '?', 1, true) and not find(eg, '?', 1, true)) then
      if h.g and h.g ~= eg then
        local bk = ':' .. Ds .. ':' .. CX[c0 + 6]
        redis.call('HDEL', PEERP .. h.g .. bk, phys)
        redis.call('HDEL', PEERP .. h.c .. bk, phys)
      end
      h.g, h.c = eg, ec
      h.set, h.moved = {'g', eg, 'c', ec}, true
    end
    m.t = m.t + 1
    if kind_o then
      m.n = m.n + 1
      m.a = m.a + (pk - flags) / 8
      if flags % 4 >= 2 then m.r = m.r + 1 end
    end
    if m.t == 1 then
      m.inst = CX[c0 + 5]
      first[dk] = true
    end
    if not dirty[dk] then
      dirty[dk] = {phys, D, Ds, label, hk, floor(86400 - tonumber(t)), dstart + 86400, CX[c0 + 6]}
      dorder[#dorder + 1] = dk
    end
  end
  if kind_o and flags >= 4 and not touched[dk] then
    touched[dk] = {phys, D, label, hk}
    torder[#torder + 1] = dk
  end
end

-- write back: day, history, peers, pending
-- (expiries are absolute PEXPIREAT times, cheaper than EXPIRE, which Redis rewrites into one per key: the TTLs
-- count from the TIME before the write-back + 250 ms, so a key never expires earlier than with an EXPIRE at its
-- write unless the write-back takes longer than that, and TTL still reads at most the TTL set. A day's key and
-- its physician's history get theirs when the day is first written or swept, not on every batch: the day's
-- expiry is its end in wall time + lateness + 2 days either way, and the history's TTL has a day to spare)
local NOW_MS = 0
if #dorder > 0 then NOW_MS = now_ms() + 250 end
local AT_H = fmt('%d', NOW_MS + tonumber(TTL_H) * 1000)
for _, dk in ipairs(dorder) do
  local m, x = days[dk], dirty[dk]
  local phys, D, Ds, label, hk, rest, dend, bk = x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8]
  local h = hists[hk]
  local tnar = fmt('%d,%d,%d,%d', m.t, m.n, m.a, m.r)
  local hset = {Ds, tnar}
  if h.set then
    for i = 1, 4 do hset[i + 2] = h.set[i] end
    h.set = nil
  end
  local pk1, pk2 = PEERP .. h.g .. ':' .. Ds .. ':' .. bk, PEERP .. h.c .. ':' .. Ds .. ':' .. bk
  local val = sub(tnar, find(tnar, ',', 1, true) + 1)
  redis.call('HSET', pk1, phys, val)
  redis.call('HSET', pk2, phys, val)
  -- (a physician who moved group this batch may be the first of their bucket in the new group's keys)
  if first[dk] or m.sw or h.moved then
    local pat = fmt('%d', NOW_MS + (rest + (WP + 1) * 86400 + LATE) * 1000)
    redis.call('PEXPIREAT', pk1, pat)
    redis.call('PEXPIREAT', pk2, pat)
  end
  local fresh = first[dk] or m.sw
  if fresh then
    if not h.lo then
      h.lo = D
      hset[#hset + 1] = 'lo'; hset[#hset + 1] = Ds
    elseif h.lo < D - W - 2 then
      local f = {}
      for d = h.lo, math.min(D - W - 2, h.lo + 60) do f[#f + 1] = d end
      redis.call('HDEL', hk, unpack(f))
      h.lo = math.min(D - W - 1, h.lo + 61)
      hset[#hset + 1] = 'lo'; hset[#hset + 1] = h.lo
    end
    m.sw = nil
    redis.call('ZADD', pending, fmt('%d', dend + LATE), Ds .. '\t' .. label .. '\t' .. phys)
  end
  redis.call('HSET', hk, unpack(hset))
  if fresh and not h.wrote then
    h.wrote = true
    redis.call('PEXPIREAT', hk, AT_H)
  end
  local st = '-' .. tnar .. '\t' .. m.inst
  local dset = {'s', st}
  for _, hour in ipairs(m.hours) do
    local c = table.concat(m.nw[hour]) .. (m.ch[hour] or '')
    dset[#dset + 1] = 'e' .. hour
    dset[#dset + 1] = c
    m.ch[hour] = c
  end
  redis.call('HSET', dk, unpack(dset))
  if fresh then redis.call('PEXPIREAT', dk, fmt('%d', NOW_MS + (rest + LATE + 2 * 86400) * 1000)) end
  m.s, m.nw, m.hours = st, {}, {}
end

-- verdicts on the days in progress the batch touched (judge_in_progress: faster, but which events of
-- the day have arrived depends on how partitions interleave; off, a day is judged once complete)
local out = {}
for _, dk in ipairs(INPROG and torder or {}) do
  local x = touched[dk]
  local h = hists[x[4]]
  if h.g then
    local res = judge(x[1], x[2], x[3], days[dk], x[4], h.g, h.c)
    if res then out[#out + 1] = res end
  end
end

-- complete days: physician-days whose end + lateness has been passed
local function complete(mem, mark)
  local i1 = find(mem, '\t', 1, true)
  local i2 = find(mem, '\t', i1 + 1, true)
  local D, label, phys = tonumber(sub(mem, 1, i1 - 1)), sub(mem, i1 + 1, i2 - 1), sub(mem, i2 + 1)
  local dk, hk = DAYP .. phys .. ':' .. label, HIST .. phys
  local st = day_state(dk)
  local v = redis.call('HMGET', hk, 'g', 'c')
  if st and v[1] and v[2] then
    local m = day_of(st)
    local res = judge(phys, D, label, m, hk, v[1], v[2])
    if res then out[#out + 1] = res end
    if mark and not m.sw then redis.call('HSET', dk, 's', 's' .. sub(st, 2)) end
  end
end

local sk = P .. ':swept:' .. TRIGGER
local before = redis.call('GET', sk)
if before then
  for _, mem in ipairs(cjson.decode(before)) do complete(mem, false) end
end
-- the watermark is the slowest input partition's newest event time, so a day is complete only once
-- every partition is past it, whatever the interleaving of partitions (a replay may drain one
-- partition days ahead of another). A partition that stops receiving holds it back: at city scale
-- every partition receives settlements all day.
for p, t in pairs(PMAX) do
  local cur = tonumber(redis.call('HGET', wmk, p) or '0')
  if t > cur then redis.call('HSET', wmk, p, t) end
end
local top = 0
local pv = redis.call('HVALS', wmk)
for _, v in ipairs(pv) do v = tonumber(v); if v > top then top = v end end
local wm = top
for _, v in ipairs(pv) do v = tonumber(v); if v < wm then wm = v end end
redis.call('EXPIRE', wmk, TTL_WM)
local due = redis.call('ZRANGEBYSCORE', pending, '-inf', wm, 'LIMIT', 0, SWEEP)
if #due > 0 then
  local swept = {}
  if before then swept = cjson.decode(before) end
  for _, mem in ipairs(due) do
    complete(mem, true)
    redis.call('ZREM', pending, mem)
    swept[#swept + 1] = mem
  end
  redis.call('SET', sk, cjson.encode(swept), 'EX', TTL_WM)
end
if redis.call('EXISTS', pending) == 1 then redis.call('EXPIRE', pending, TTL_WM) end
return out
"""

#: each (peer group, day) is kept in this many hashes, a physician's by a hash of their id: a settlement
#: rewrites its physician's peer value, and a smaller hash is a shorter search in Redis
PEER_BUCKETS = 8
#: event ids stored as they are in a day's evidence; any other is stored as '~' + its UTF-8 in hex
_PLAIN_ID = re.compile(r"[0-9A-Za-z_.:\-]+")

_MEASURES = ("settlements", "amount_cny", "resale_share")
_MEASURE_ZH = {"settlements": "结算量", "amount_cny": "金额", "resale_share": "回流风险药品占比"}
_MEASURE_EN = {"settlements": "volume", "amount_cny": "value", "resale_share": "resale-prone share"}
_LEVEL_ZH = {"L1": "一级", "L2": "二级", "L3": "三级"}
_TYPE_ZH = {"hospital": "医院", "community": "社区卫生服务中心", "pharmacy": "药店"}
_DEFAULTS: dict[str, dict[str, float]] = {
    "settlements": {"min_per_day": 5, "own_factor": 3.0, "poisson_z": 3.0},
    "amount_cny": {"min_per_day": 1000, "own_factor": 3.0},
    "resale_share": {"min_resale_settlements": 3, "min_increase": 0.3},
}


def _dec(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _token(event_id: str) -> str:
    """An event id as a day's evidence stores it (no ``|``, space or tab in it, so a search finds only it).

    >>> _token("E20261101000000001"), _token("E 1|2")
    ('E20261101000000001', '~4520317c32')
    """
    return event_id if _PLAIN_ID.fullmatch(event_id) else "~" + event_id.encode().hex()


def _event_id(token: str) -> str:
    """Inverse of :func:`_token`.

    >>> _event_id("~4520317c32"), _event_id("E1")
    ('E 1|2', 'E1')
    """
    return bytes.fromhex(token[1:]).decode() if token[:1] == "~" else token


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def group_label(group: str, lang: str) -> str:
    """Human name of a peer group.

    >>> group_label("hospital|L3|心血管内科", "zh"), group_label("community|L1|全科", "en")
    ('三级医院 心血管内科', 'community 全科')
    """
    itype, _, rest = group.partition("|")
    level, _, dept = rest.partition("|")
    dept = "" if dept == "?" else dept
    if itype == "*":
        return f"department {dept}" if lang == "en" else f"{dept}（各级机构）"
    if itype != "hospital":       # community centres are all level 1; pharmacies have none
        level = ""
    if lang == "en":
        return f"{itype} {level if level != 'L?' else ''} {dept}".replace("  ", " ").strip()
    return f"{_LEVEL_ZH.get(level, '')}{_TYPE_ZH.get(itype, itype)} {dept}".strip()


class PrescriberVolume(Detector):
    """Physician-day volume, value and resale-prone share against own baseline and peers."""

    rule = "prescriber_volume"
    subject_type = "physician"
    scripts = (LUA,)

    def __init__(self, *, baseline_days: int = 28, min_baseline_days: int = 3, peer_days: int = 7,
                 min_peers: int = 5, peer_quantile: float = 0.9, measures: dict[str, Any] | None = None,
                 require: Sequence[str] = ("settlements",), min_measures: int = 2, sweep_per_batch: int = 500,
                 judge_in_progress: bool = False,
                 max_evidence: int = 200, resale_prone: DrugList = EMPTY, lateness_s: int = 3600, lang: str = "zh",
                 version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        owner = self.rule
        for name, v in (("baseline_days", baseline_days), ("min_baseline_days", min_baseline_days),
                        ("peer_days", peer_days), ("min_peers", min_peers), ("min_measures", min_measures),
                        ("sweep_per_batch", sweep_per_batch), ("max_evidence", max_evidence)):
            check_positive(owner, name, v, integer=True)
        if min_baseline_days > baseline_days:
            raise ValueError(f"{owner}: min_baseline_days must be <= baseline_days ({baseline_days}), "
                             f"got {min_baseline_days}")
        if baseline_days > 366 or peer_days > 366:
            raise ValueError(f"{owner}: baseline_days and peer_days must be <= 366, got {baseline_days}, {peer_days}")
        if not _num(peer_quantile) or not 0.5 <= peer_quantile < 1:
            raise ValueError(f"{owner}: peer_quantile must be a number in [0.5, 1), got {peer_quantile!r}")
        if min_measures > 3:
            raise ValueError(f"{owner}: min_measures must be <= 3, got {min_measures}")
        if isinstance(require, str) or not isinstance(require, (list, tuple)) or \
                not all(r in _MEASURES for r in require):
            raise ValueError(f"{owner}: require must be a list of measures from {list(_MEASURES)}, got {require!r}")
        if measures is None:
            measures = {}
        if not isinstance(measures, dict):
            raise ValueError(f"{owner}: measures must be a mapping, got {measures!r}")
        unknown = set(measures) - set(_MEASURES)
        if unknown:
            raise ValueError(f"{owner}: measures has unknown measure(s) {sorted(unknown)}")
        ms: dict[str, dict[str, float]] = {}
        for m in _MEASURES:
            given = measures.get(m) or {}
            if not isinstance(given, dict):
                raise ValueError(f"{owner}: measures.{m} must be a mapping, got {given!r}")
            bad = set(given) - set(_DEFAULTS[m])
            if bad:
                raise ValueError(f"{owner}: measures.{m} has unknown field(s) {sorted(bad)}")
            cfg = {**_DEFAULTS[m], **given}
            for f, v in cfg.items():
                check_positive(owner, f"measures.{m}.{f}", v, integer=(f == "min_resale_settlements"))
            if "own_factor" in cfg and cfg["own_factor"] < 1:
                raise ValueError(f"{owner}: measures.{m}.own_factor must be >= 1, got {cfg['own_factor']!r}")
            if m == "resale_share" and cfg["min_increase"] >= 1:
                raise ValueError(f"{owner}: measures.resale_share.min_increase must be < 1, got {cfg['min_increase']!r}")
            ms[m] = cfg
        if not isinstance(resale_prone, DrugList):
            raise ValueError(f"{owner}: resale_prone must be a DrugList, got {resale_prone!r}")
        self.baseline_days = baseline_days
        self.min_baseline_days = min_baseline_days
        self.peer_days = peer_days
        self.min_peers = min_peers
        self.peer_quantile = float(peer_quantile)
        self.measures = ms
        self.require = tuple(dict.fromkeys(require))
        self.min_measures = min_measures
        self.sweep_per_batch = sweep_per_batch
        if not isinstance(judge_in_progress, bool):
            raise ValueError(f"prescriber_volume: judge_in_progress must be true or false, got {judge_in_progress!r}")
        self.judge_in_progress = judge_in_progress
        self.max_evidence = max_evidence
        self.resale_prone = resale_prone
        self._sha = self.sha(LUA)
        req = sum(b for m, b in zip(_MEASURES, (1, 2, 4)) if m in self.require)
        s, am, sh = ms["settlements"], ms["amount_cny"], ms["resale_share"]
        self._cfg = orjson.dumps([baseline_days, min_baseline_days, peer_days, min_peers, self.peer_quantile,
                                  float(s["min_per_day"]), float(s["own_factor"]), float(s["poisson_z"]),
                                  int(round(am["min_per_day"] * 100)), float(am["own_factor"]),
                                  int(sh["min_resale_settlements"]), float(sh["min_increase"]), req, min_measures,
                                  lateness_s, sweep_per_batch, (baseline_days + 2) * 86400 + lateness_s,
                                  2 * 86400 + lateness_s, 1 if judge_in_progress else 0, PEER_BUCKETS])

    def params(self) -> dict[str, Any]:
        return {"baseline_days": self.baseline_days, "min_baseline_days": self.min_baseline_days,
                "peer_days": self.peer_days, "min_peers": self.min_peers, "peer_quantile": self.peer_quantile,
                "measures": self.measures, "require": list(self.require), "min_measures": self.min_measures,
                "sweep_per_batch": self.sweep_per_batch, "judge_in_progress": self.judge_in_progress,
                "lateness_s": self.lateness_s}

    # -- Redis ---------------------------------------------------------------------------
    def _resale(self, ev: Settlement) -> int:
        m = self.resale_prone.matches
        return int(any(it.category == "drug" and m(it.code, it.name) for it in ev.items))

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        if not events:
            return 0
        late = self.lateness_s
        days: list[Any] = []           # flat [D, 'D', label, day start]*
        day_ix: dict[int, tuple[int, int]] = {}
        ctx: list[Any] = []            # flat [physician, day index, group, coarse group, institution, bucket]*
        ctx_ix: dict[tuple, int] = {}
        # flat [seconds since day start (no '.0'), '|' + token + ' ', context index, fen x 8 + flags]*
        rows: list[Any] = []
        plain = _PLAIN_ID.fullmatch
        for ev in events:
            phys = ev.physician_id
            if is_placeholder(phys):
                continue
            ts = ev.ts
            d = int((ts + TZ_OFFSET_S) // 86400)
            di_ds = day_ix.get(d)
            if di_ds is None:
                di_ds = day_ix[d] = (len(day_ix), day_start(d))
                days += (d, str(d), day_label(d), di_ds[1])
            di, ds = di_ds
            ck = (phys, di, ev.institution_type, ev.institution_level, ev.department, ev.institution_id)
            ci = ctx_ix.get(ck)
            if ci is None:
                ci = ctx_ix[ck] = len(ctx_ix)
                dept = ev.department or "?"
                ctx += (phys, di, f"{ev.institution_type}|L{ev.institution_level or '?'}|{dept}", f"*|*|{dept}",
                        ev.institution_id, str(zlib.crc32(phys.encode()) % PEER_BUCKETS))
            if ev.visit_type == "inpatient":
                packed = 1
            else:
                packed = int(round(ev.total_amount * 100)) * 8 + 2 * self._resale(ev)
            if ts >= ds + late:
                packed += 4
            rel = ts - ds
            eid = ev.event_id
            rows += (str(int(rel)) if rel.is_integer() else repr(rel),
                     f"|{eid} " if plain(eid) else f"|{_token(eid)} ", ci, packed)
        newest = max(events, key=lambda e: (e.ts, e.event_id))
        pmax: dict[str, float] = {}
        for ev in events:
            k = str(ev.partition)
            if ev.ts > pmax.get(k, 0.0):
                pmax[k] = ev.ts
        pipe.evalsha(self._sha, 0, self.key(ns), self._cfg, orjson.dumps(pmax), f"{newest.ts!r}|{newest.event_id}",
                     _pack([days, ctx, rows]))
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not replies:
            return []
        out: dict[str, Alert] = {}
        for res in replies[0]:
            a = self._alert(ns, res)
            out[a.alert_id] = a
        return list(out.values())

    # -- alerts --------------------------------------------------------------------------
    def _alert(self, ns: Namespace, res: list[Any]) -> Alert:
        phys, label, inst, group = (_dec(x) for x in res[:4])
        level = int(res[4])
        n, fen, r = (int(x) for x in res[5])
        ln, la_fen, sb, bdays = float(_dec(res[6][0])), float(_dec(res[6][1])), float(_dec(res[6][2])), int(res[6][3])
        npeers, qn, qa_fen, qs = int(res[7][0]), float(_dec(res[7][1])), float(_dec(res[7][2])), float(_dec(res[7][3]))
        fired = int(res[8])
        ds = day_start(int(res[10]))
        ids, times = [], []
        for entry in _dec(res[9]).split("|")[1:]:
            token, _, rel = entry.partition(" ")
            ids.append(_event_id(token))
            times.append(ds + float(rel))
        order = sorted(range(len(ids)), key=lambda j: (times[j], ids[j]))[-self.max_evidence:]
        ids, times = [ids[j] for j in order], [times[j] for j in order]
        share = r / n if n else 0.0
        names = [m for m, b in zip(_MEASURES, (1, 2, 4)) if fired & b]
        ms = self.measures
        lnf = max(ln, 1.0)
        bounds = {"settlements": max(ms["settlements"]["min_per_day"], ms["settlements"]["own_factor"] * lnf,
                                     lnf + ms["settlements"]["poisson_z"] * lnf ** 0.5, qn),
                  "amount_cny": max(ms["amount_cny"]["min_per_day"], ms["amount_cny"]["own_factor"] * la_fen / 100,
                                    qa_fen / 100),
                  "resale_share": max(sb + ms["resale_share"]["min_increase"], qs)}
        values = {"settlements": n, "amount_cny": fen / 100, "resale_share": share}
        ratio = max([values[m] / bounds[m] for m in names if bounds[m] > 0] + [1.0])
        qp = round(self.peer_quantile * 100)
        peer_zh = group_label(group, "zh") if level == 1 else group_label("*|*|" + group.rsplit("|", 1)[-1], "zh")
        peer_en = group_label(group, "en") if level == 1 else group_label("*|*|" + group.rsplit("|", 1)[-1], "en")
        zh = (f"医师 {phys}（{inst} {group_label(group, 'zh')}）{label} 结算 {n} 笔，"
              f"为本人近 {self.baseline_days} 天日中位数 {ln:g} 笔的 {n / max(ln, 1.0):.1f} 倍"
              f"（同类医师 {peer_zh} {npeers} 人日结算第 {qp} 百分位 {qn:g} 笔）；"
              f"金额 ¥{fen / 100:,.0f}（本人中位数 ¥{la_fen / 100:,.0f}，同类第 {qp} 百分位 ¥{qa_fen / 100:,.0f}）；"
              f"回流风险药品处方占 {share:.0%}（本人基线 {sb:.0%}）；触发：" + "、".join(_MEASURE_ZH[m] for m in names))
        en = (f"Physician {phys} ({inst} {group_label(group, 'en')}) settled {n} on {label}, "
              f"{n / max(ln, 1.0):.1f}x their {self.baseline_days}-day daily median of {ln:g} "
              f"(peers {peer_en}, {npeers} physicians: p{qp} {qn:g}); amount ¥{fen / 100:,.0f} "
              f"(own median ¥{la_fen / 100:,.0f}, peers p{qp} ¥{qa_fen / 100:,.0f}); resale-prone share {share:.0%} "
              f"(baseline {sb:.0%}); jumped: " + ", ".join(_MEASURE_EN[m] for m in names))
        d0 = min(times) if times else 0.0
        return Alert(
            alert_id=alert_id(ns.run_id, self.rule, "physician", phys, "86400", label),
            rule=self.rule, rule_version=self.version, severity=severity_for(ratio), score=round(ratio, 4),
            subject_type="physician", subject_id=phys, window_start=iso(d0), window_end=iso(max(times, default=d0)),
            evidence_event_ids=ids, run_id=ns.run_id, summary=zh if self.lang == "zh" else en, summary_en=en,
            detected_at=now_iso(), window_s=86400,
            metrics={"day": label, "institution_id": inst, "peer_group": group if level == 1 else "*|*|" +
                     group.rsplit("|", 1)[-1], "fired": names, "settlements": n, "amount_cny": fen / 100,
                     "resale_prone_settlements": r, "resale_share": round(share, 4),
                     "baseline_median_settlements": ln, "baseline_median_amount_cny": la_fen / 100,
                     "baseline_resale_share": round(sb, 4), "baseline_active_days": bdays, "peers": npeers,
                     f"peer_p{qp}_settlements": qn, f"peer_p{qp}_amount_cny": qa_fen / 100,
                     f"peer_p{qp}_resale_share": round(qs, 4)},
        )
