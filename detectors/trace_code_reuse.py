"""``trace_code_reuse``: a drug package's traceability code settled a second time (回流药).

Every dispensed package carries its own drug traceability code (药品追溯码); a code settled
again means the package came back (bought with one card, sold back to a pharmacy or dealer)
and was sold and settled again: 回流药, the end of the 贩卖医保药品 chain. The rule remembers
every code it sees for ``retention_s`` of event time (two years by default) and fires when a
code is settled by a second settlement (another ``event_id``; the same event delivered again is
the same settlement and never reuse). The subject is the institution of the second settlement
(the one selling the returned package); the alert names the first and the second settlement,
both cards and both institutions, one alert per second settlement (its event id is the
episode, so the id does not depend on delivery order). Whichever of the two arrives first,
the earlier one in event time is the first settlement. Codes that are placeholders ("0000",
"未知"), shorter than ``min_code_len`` or repeated within one settlement are ignored, and a
second settlement at a placeholder institution is never blamed.

State: one small hash field per code, in hash buckets so that Redis stores them as compact
listpacks (ziplists on 6.2) instead of one key per code. A code is hashed (BLAKE2b): 8 bytes
are the field, other bits pick one of ``buckets`` buckets; buckets are per event-time
``period_s`` so whole buckets expire (Redis < 7.4 has no per-field TTL):

* ``cw:{run}:trace_code_reuse:{retention_s}:{period}:{bucket}`` — hash, field = 8-byte code
  hash, value = ``time(base 36) \\x1f event_id \\x1f card \\x1f institution`` of the first
  settlement (when an earlier settlement arrives after a later one of the same period, its record
  goes in front and the later one stays behind it, ``\\x1e``-separated, at most 4 records, so that a
  batch redelivered after a crash still finds both); expires ``retention_s`` + lateness after its last write, so a code lives between
  ``retention_s`` and ``retention_s`` + ``period_s``. A code is looked up in every period
  bucket of the retention that may hold a code settled within ``retention_s`` of it:
  ``retention_s / period_s`` + 1 lookups once the retention is full (one more near a period's
  end), fewer while it fills (a new run or deployment). Half years (the default) cost 5 lookups a
  code and keep codes 12.5 % longer on average than needed; months would cost 25 lookups (each a
  scan of a bucket) for 2 %.
* ``cw:{run}:trace_code_reuse:{retention_s}:periods`` — hash, field = period, value = ``min max``,
  the first and last event time (integer seconds) ever written to that period's buckets; read once
  per batch, it lets a lookup skip a period that holds no code within ``retention_s``; a period
  leaves it once its last code is 2 × ``retention_s`` + lateness older than a batch's latest event,
  and it expires with the latest bucket written.

Measured on Redis 6.2 (libc malloc) with 18-character event ids, 16-character card ids and
11-character institution ids: 69 bytes per stored code when buckets hold ~90 codes, 71 at
~45, 76 at ~20 (177 when they hold one or two), so about 80 bytes per code of retention. A
lookup scans its bucket (~30 ns an entry): size ``buckets`` to about codes per period / 45
and keep ``hash-max-listpack-entries`` >= 128 and ``hash-max-listpack-value`` >= 64 (the
defaults). Shanghai's ~1 M packages a day make ~180 M codes a half year: 4,194,304 buckets
(and ~60 GB for two years of codes).

>>> TraceCodeReuse(retention_s=63072000, period_s=15768000, buckets=1024)
TraceCodeReuse(retention_s=63072000, period_s=15768000, buckets=1024, min_code_len=12, lateness_s=3600)
>>> TraceCodeReuse(period_s=0)
Traceback (most recent call last):
...
ValueError: trace_code_reuse: period_s must be a positive integer, got 0
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import orjson
from msgspec import Raw as _Raw
from msgspec.msgpack import encode as _pack

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors.base import EXPIRE_AT_LUA, Detector, Namespace, check_positive
from detectors.drugs import is_placeholder
from stream.events import Settlement, iso

LUA = EXPIRE_AT_LUA + r"""
-- ARGV[1] key prefix (cw:{run}:trace_code_reuse:{retention_s}), ARGV[2] JSON [retention, period, lateness, ttl],
-- ARGV[3] MessagePack (one flat table), per event: index, t, event_id, value to remember (see the module
-- docstring), n, then per code its bucket's key in the event's own period ({prefix}:{period}:{bucket}, built in
-- Python) and its 8-byte field hash. A code is written to its event time's period and read in every period of the
-- retention that holds a code within the retention of t: {prefix}:periods (field period, value "min max" of the
-- event times written to it) says which. The other periods are read first; in the own period a code that may be
-- remembered (the usual case: never seen) is written with HSETNX (one call), read only when already there.
-- Returns only events with reuse: {index, {code position, role, time, event_id, card, institution}*}
--   role 's': this event is the second settlement of the code; 'f': it is the (earlier) first one
local prefix = ARGV[1] .. ':'
local cfg = cjson.decode(ARGV[2])
local R, P, lateness, ttl = cfg[1], cfg[2], cfg[3], cfg[4]
local x = cmsgpack.unpack(ARGV[3])
local SEP = '\31'
local RS = '\30'
local MAXREC = 4
local find, sub, floor, abs = string.find, string.sub, math.floor, math.abs
local ik = prefix .. 'periods'
local per = {}      -- period -> {min, max} event time written to it
local pkey = {}     -- period -> its key prefix
do
  local h = redis.call('HGETALL', ik)
  for m = 1, #h, 2 do
    local a = find(h[m + 1], ' ', 1, true)
    per[tonumber(h[m])] = {tonumber(sub(h[m + 1], 1, a - 1)), tonumber(sub(h[m + 1], a + 1))}
  end
end
local dirty = {}    -- periods whose range grew
local written, wkeys = {}, {}   -- bucket keys written (expired once, at the end)
local out = {}
local c = 1
local tmax = nil
-- the event (time t, id eid) and a code's stored value v: is the event among its records (stored), and the
-- earliest other record within R of t, if earlier than best
local function scan(v, t, eid, stored, best)
  local s = 1
  local lv = #v
  while s <= lv do  -- records separated by \30 (see "displaced" below)
    local e0 = find(v, RS, s, true) or (lv + 1)
    local p1 = find(v, SEP, s, true)
    local p2 = find(v, SEP, p1 + 1, true)
    local ve = sub(v, p1 + 1, p2 - 1)
    if ve == eid then
      stored = true
    else
      local vt = tonumber(sub(v, s, p1 - 1), 36)
      if abs(t - vt) <= R and (best == nil or vt < best[1] or (vt == best[1] and ve < best[2])) then
        local p3 = find(v, SEP, p2 + 1, true)
        best = {vt, ve, sub(v, p2 + 1, p3 - 1), sub(v, p3 + 1, e0 - 1)}
      end
    end
    s = e0 + 1
  end
  return stored, best
end
local nx = #x
local qs = {}   -- key prefixes of the other periods that may hold a code settled within R of t
while c <= nx do
  local idx, t, eid, value, n = x[c], x[c + 1], x[c + 2], x[c + 3], x[c + 4]
  if not tmax or t > tmax then tmax = t end
  local bs = c + 5
  c = bs + 2 * n
  local tf = floor(t)
  local p = floor(t / P)
  local lo = floor((t - R) / P)
  local hi = floor((t + lateness) / P)
  local hits = nil
  local nq = 0
  local own = false   -- the event's own period is among them
  for q = lo, hi do
    local r = per[q]
    if r and t - r[2] <= R and r[1] - t <= R then
      if q == p then
        own = true
      else
        local pk = pkey[q]
        if not pk then pk = prefix .. q .. ':'; pkey[q] = pk end
        nq = nq + 1
        qs[nq] = pk
      end
    end
  end
  local ownp = nil   -- the length of the own period's key prefix (for the bucket of the other periods)
  for j = 1, n do
    local wk = x[bs + 2 * j - 2]   -- the code's bucket key in the own period
    local f = x[bs + 2 * j - 1]
    local best = nil
    local stored = false
    if nq > 0 then
      if not ownp then ownp = #prefix + #tostring(p) + 2 end
      local b = sub(wk, ownp)
      for k = 1, nq do
        local v = redis.call('HGET', qs[k] .. b, f)
        if v then stored, best = scan(v, t, eid, stored, best) end
      end
    end
    local wv = nil  -- the value already in this event's own period bucket
    local done = false   -- the code was written (HSETNX)
    if own then
      if not stored and (best == nil or tf < best[1] or (tf == best[1] and eid < best[2])) then
        done = redis.call('HSETNX', wk, f, value) == 1
      end
      if not done then
        wv = redis.call('HGET', wk, f)
        if wv then stored, best = scan(wv, t, eid, stored, best) end
      end
    end
    if best == nil or tf < best[1] or (tf == best[1] and eid < best[2]) then
      -- first sight of the code, or this settlement is earlier than the one remembered: remember it
      if not stored then
        if not done then
          local nv = value
          if wv then
            -- displaced: the later settlement's record stays behind this one, so that a redelivery of
            -- this batch (a crash before its alerts were saved) still finds the pair; at most MAXREC records
            nv = value .. RS .. wv
            local k, cut = 1, nil
            local s = 1
            while true do
              local e0 = find(nv, RS, s, true)
              if not e0 then break end
              k = k + 1
              if k > MAXREC then cut = e0; break end
              s = e0 + 1
            end
            if cut then nv = sub(nv, 1, cut - 1) end
          end
          redis.call('HSET', wk, f, nv)
        end
        local r = per[p]
        if not r then
          per[p] = {tf, tf}; dirty[#dirty + 1] = p
          own = true   -- the event's next codes look here too
        elseif tf < r[1] or tf > r[2] then
          if tf < r[1] then r[1] = tf else r[2] = tf end
          dirty[#dirty + 1] = p
        end
        if not written[wk] then written[wk] = true; wkeys[#wkeys + 1] = wk end
      end
      if best ~= nil then
        hits = hits or {}
        hits[#hits + 1] = {j, 'f', tostring(best[1]), best[2], best[3], best[4]}
      end
    else
      hits = hits or {}
      hits[#hits + 1] = {j, 's', tostring(best[1]), best[2], best[3], best[4]}
    end
  end
  if hits then out[#out + 1] = {idx, hits} end
end
if #wkeys > 0 then
  -- one absolute expiry for the batch: PEXPIREAT is propagated as is (EXPIRE is rewritten into it per key)
  local at = expire_at(ttl)
  for k = 1, #wkeys do redis.call('PEXPIREAT', wkeys[k], at) end
  local seen = {}
  for k = 1, #dirty do
    local q = dirty[k]
    if not seen[q] then
      seen[q] = true
      redis.call('HSET', ik, string.format('%d', q), string.format('%d %d', per[q][1], per[q][2]))
    end
  end
  -- a period whose codes are all older than the retention before anything this batch could still be
  -- joined by (its time minus the retention and the lateness) leaves the index
  for q, r in pairs(per) do
    if r[2] + 2 * R + lateness < tmax then redis.call('HDEL', ik, string.format('%d', q)) end
  end
  redis.call('PEXPIREAT', ik, at)
end
return out
"""


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_PAIRS = [a + b for a in _DIGITS for b in _DIGITS]      # 0..1295 in two digits
_HEADS = [p.lstrip("0") for p in _PAIRS]                # the same without leading zeros


def _base36(n: int) -> str:
    """The event time in 6 characters.

    >>> _base36(1795482785), _base36(0), _base36(35), _base36(1679616), _base36(36 ** 6)
    ('tozfdt', '0', 'z', '10000', '1000000')
    """
    if 1679616 <= n < 2176782336:  # 5 or 6 digits: every event time from 1971 to 2038
        a, r = divmod(n, 1679616)
        b, c = divmod(r, 1296)
        return _HEADS[a] + _PAIRS[b] + _PAIRS[c]
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = _DIGITS[d] + out
        if not n:
            return out


def _decode(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class TraceCodeReuse(Detector):
    """Drug traceability codes settled twice (see module docstring)."""

    rule = "trace_code_reuse"
    subject_type = "institution"
    scripts = (LUA,)

    def __init__(self, retention_s: int = 63072000, *, period_s: int = 15768000, buckets: int = 4194304,
                 min_code_len: int = 12, lateness_s: int = 3600, lang: str = "zh", version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        r = self.rule
        for name, v in (("retention_s", retention_s), ("period_s", period_s), ("buckets", buckets),
                        ("min_code_len", min_code_len)):
            check_positive(r, name, v, integer=True)
        if period_s > retention_s:
            raise ValueError(f"{r}: period_s must be at most retention_s ({retention_s}), got {period_s}")
        if retention_s // period_s > 120:
            raise ValueError(f"{r}: retention_s / period_s must be at most 120 (one lookup per period), "
                             f"got {retention_s // period_s}")
        if buckets > 1 << 32:
            raise ValueError(f"{r}: buckets must be at most {1 << 32}, got {buckets}")
        self.retention_s = retention_s
        self.period_s = period_s
        self.buckets = buckets
        self.min_code_len = min_code_len
        self._sha = self.sha(LUA)

    def params(self) -> dict[str, Any]:
        return {"retention_s": self.retention_s, "period_s": self.period_s, "buckets": self.buckets,
                "min_code_len": self.min_code_len, "lateness_s": self.lateness_s}

    def codes(self, ev: Settlement) -> list[tuple[str, str, str | None]]:
        """The event's usable trace codes, first occurrence only: (code, drug code, drug name)."""
        seen: set[str] = set()
        out = []
        for it in ev.items:
            for c in it.trace_codes:
                c = c.strip()
                if len(c) < self.min_code_len or c in seen or is_placeholder(c):
                    continue
                seen.add(c)
                out.append((c, it.code, it.name))
        return out

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        rows: list[Any] = []
        prefix = self.key(ns, self.retention_s)
        P = self.period_s
        buckets = self.buckets
        blake = hashlib.blake2b
        for i, ev in enumerate(events):
            codes = self.codes(ev)
            if not codes:
                continue
            ts = ev.ts
            value = f"{_base36(int(ts // 1))}\x1f{ev.event_id}\x1f{ev.card_id}\x1f{ev.institution_id}"
            rows += (i, ts, ev.event_id, value, len(codes))
            pp = f"{prefix}:{math.floor(ts / P)}:"   # the event's own period, as Lua's floor(t / P)
            for code, *_ in codes:
                h = blake(code.encode(), digest_size=12).digest()
                # the bucket's key; the field (8 bytes, not UTF-8) as a MessagePack str of 8 bytes
                rows += (pp + str(int.from_bytes(h[8:], "big") % buckets), _Raw(b"\xa8" + h[:8]))
        if not rows:
            return 0
        cfg = [self.retention_s, self.period_s, self.lateness_s, self.retention_s + self.lateness_s]
        pipe.evalsha(self._sha, 0, prefix, orjson.dumps(cfg), _pack(rows))
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not replies:
            return []
        # second settlement -> its facts and the first settlements of its reused codes
        cases: dict[str, dict[str, Any]] = {}
        for idx, hits in replies[0]:
            ev = events[int(idx)]
            codes = self.codes(ev)
            me = (float(ev.ts), ev.event_id, ev.card_id, ev.institution_id)
            for h in hits:
                j, role, ot, oe, oc, oi = (_decode(x) for x in h)
                other = (float(ot), oe, oc, oi)
                first, second = (other, me) if role == "s" else (me, other)
                code, drug, name = codes[int(j) - 1]
                c = cases.setdefault(second[1], {"second": second, "firsts": {}, "codes": []})
                c["firsts"].setdefault(first[1], first)
                c["codes"].append((code, drug, name or drug, first[1]))
        out = []
        for case in cases.values():
            if is_placeholder(case["second"][3]):
                continue  # never blame a placeholder institution (a data-quality finding)
            out.append(self._alert(ns, case))
        return out

    def _alert(self, ns: Namespace, case: dict[str, Any]) -> Alert:
        st, se, sc, si = case["second"]
        firsts = sorted(case["firsts"].values())
        ft, fe, fc, fi = firsts[0]
        codes = sorted(set(case["codes"]))
        n = len(codes)
        drug_name = codes[0][2]
        days = (st - ft) / 86400
        elapsed_zh = f"{days:.1f} 天" if days >= 1 else f"{(st - ft) / 3600:.1f} 小时"
        elapsed_en = f"{days:.1f} days" if days >= 1 else f"{(st - ft) / 3600:.1f} h"
        zh = (f"{n} 盒 {drug_name} 的药品追溯码在机构 {si} 由卡 {sc} 再次结算（{iso(st)}），"
              f"首次已于 {iso(ft)} 在机构 {fi} 由卡 {fc} 结算，相隔 {elapsed_zh}，疑似回流药")
        en = (f"{n} package(s) of {drug_name} settled again at institution {si} with card {sc} ({iso(st)}); "
              f"first settled at {fi} with card {fc} on {iso(ft)}, {elapsed_en} earlier: likely resold drugs")
        if len(firsts) > 1:
            zh += f"（共来自 {len(firsts)} 次首次结算）"
            en += f" (from {len(firsts)} first settlements)"
        members = list(dict.fromkeys([f[2] for f in firsts] + [sc]))
        ids = [f[1] for f in firsts] + [se]
        times = [f[0] for f in firsts] + [st]
        return Alert(
            alert_id=alert_id(ns.run_id, self.rule, "institution", si, str(self.retention_s), se),
            rule=self.rule, rule_version=self.version, severity=severity_for(1 + 0.5 * (n - 1)),
            score=float(n), subject_type="institution", subject_id=si, member_ids=members,
            window_start=iso(min(times)), window_end=iso(max(times)), evidence_event_ids=ids, run_id=ns.run_id,
            summary=zh if self.lang == "zh" else en, summary_en=en, detected_at=now_iso(),
            window_s=self.retention_s,
            metrics={"reused_codes": n, "trace_codes": [c[0] for c in codes][:20], "drug_code": codes[0][1],
                     "drug_name": drug_name, "elapsed_s": st - ft,
                     "first_event_id": fe, "first_card": fc, "first_institution": fi, "first_time": iso(ft),
                     "second_event_id": se, "second_card": sc, "second_institution": si, "second_time": iso(st),
                     "first_event_ids": [f[1] for f in firsts], "retention_s": self.retention_s},
        )
