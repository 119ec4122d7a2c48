"""``duplicate_billing``: one bill settled twice (重复结算 / 重复收费) by the institution.

Inspectors hunt designated institutions that settle the same bill again a few minutes later
under a new settlement id: the same card, the same institution (and department) and the same
billed lines (费用明细). The rule keeps, per card, a canonical fingerprint of each settlement
(institution, department, the sorted ``(code, quantity, amount)`` lines and the total) and
fires when one fingerprint is settled again within ``window_s`` (600 s by default) of event
time under a *different* ``event_id``; the same ``event_id`` delivered again is the same
settlement, never a duplicate. The institution is the subject (it submits the bills); the
cards are its ``member_ids``. One alert per institution and local calendar day of the
original bill (the day is the episode, so its id does not depend on the order in which
partitions deliver different cards); later duplicates that day extend it. The department is
part of the fingerprint because registering at two departments in one visit (挂多个科室)
legitimately bills identical registration lines. Placeholder card or institution ids ("未知",
"0000") are data quality, never blamed: those settlements are skipped.

State (Redis, all keys expire):

* field ``duplicate_billing:{window_s}`` of the card's recent-activity hash ``cw:{run}:c:{card}``
  — the card's recent settlements as a cjson flat array ``[fingerprint, t, event_id, ...]`` in
  canonical order, newest first (event time, then event id and fingerprint byte by byte),
  deduplicated on (fingerprint, ``event_id``) so a redelivered settlement is stored once and
  never counts as its own duplicate, pruned by event time to ``newest - window_s - lateness_s``
  each time it is touched (a fractional event time is kept exact, as ``%.17g`` text); a card's first bill
  (no field: the usual case) is written as its entry's JSON text, built in Python as cjson writes it
  (``HSETNX``: no decoding or encoding in Lua), and a new newest bill by putting its text before the
  stored text. (The format is the one earlier versions wrote: a worker upgraded mid-stream reads their
  state as is.) The card
  hash's TTL is set by the processor (``card_ttl_s`` = ``window_s`` + lateness); when it lives
  longer for other rules, a field whose newest bill is out of reach is dropped without decoding;
* only when a bill is duplicated: ``cw:{run}:duplicate_billing:{window_s}:inst:{institution}:{day}:ev``
  — the day's evidence; ``…:bills`` — one field per duplicated bill (``card\\tfingerprint\\tfirst
  event id``) with the number of settlements and the amount (one day + ``window_s`` + lateness).

>>> d = DuplicateBilling(window_s=600)
>>> d
DuplicateBilling(window_s=600, lateness_s=3600)
>>> d.field, d.card_hash, d.card_ttl_s
('duplicate_billing:600', 'c', 4200)
>>> DuplicateBilling(window_s=-600)
Traceback (most recent call last):
...
ValueError: duplicate_billing: window_s must be a positive integer, got -600
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Sequence

import orjson
from msgspec.msgpack import encode as _pack

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors.base import TIMES_LUA, Detector, Namespace, check_positive
from detectors.drugs import is_placeholder
from stream.events import Settlement, iso

TZ_S = 8 * 3600  # episodes are local (UTC+08:00) calendar days, as the events are stamped
_placeholder_institution = lru_cache(maxsize=65536)(is_placeholder)  # institutions are few, cards are not

LUA = TIMES_LUA + r"""
-- ARGV[1] key prefix (cw:{run}:duplicate_billing:{window_s}) of the institution day keys, ARGV[2] card hash prefix
-- (cw:{run}:c:), ARGV[3] JSON [field, W, lateness, day_ttl, tz_s],
-- ARGV[4] MessagePack, flat: [card hash key, entry, index\ttotal\tinstitution, ...] where entry is the event's
-- [fingerprint, t, event_id] as stored, in JSON text (decoded only when the card is not new). The card's field is a
-- flat array fingerprint, t, event_id, ... newest first (by t, event_id, fingerprint), read once per card and batch
-- and written once if it changed: a card without it (its first bill in reach, the usual case) gets the entry text as
-- is (HSETNX: one call, no decoding, no encoding, no state unless the card comes again in the batch); while bills
-- only come before the newest stored one in that order and none is dropped, as the new entries' text followed by
-- the stored text.
-- {prefix}:inst:{institution}:{day}:ev and …:bills hold the day's evidence and bills.
-- Returns only the events that found a duplicate: {index, day, evidence (id, time)*, bills (field, value)*, n, gap}
local prefix, cp = ARGV[1], ARGV[2]
local cfg = cjson.decode(ARGV[3])
local field, W, lateness, day_ttl, tz = cfg[1], cfg[2], cfg[3], cfg[4], cfg[5]
local evs = cmsgpack.unpack(ARGV[4])
local sub, tinsert = string.sub, table.insert
local function before(ta, ea, fa, tb, eb, fb)
  if ta ~= tb then return ta < tb end
  if ea ~= eb then return bytes_lt(ea, eb) end
  return bytes_lt(fa, fb)
end
-- the card's recent bills; {} when even the newest (first) one is out of reach of an event at t: a card hash
-- outlives this rule's state (other rules keep it longer), and then this costs no decoding.
-- Fractional event times are kept exact (TIMES_LUA).
local function load(raw, t)
  if not raw then return {} end
  local newest = tonumber(string.match(raw, '^%["%x+","?([^,"]+)'))
  if newest and newest < t - W - lateness then return {} end
  return times_load(cjson.decode(raw), 2, 3)
end
local function save(st) return times_save(st, 2, 3) end
-- card -> bills; stored text (when still valid) and the entry texts to put before it ('': unchanged; false: re-encode)
-- (a card whose first bill was stored as sent: that bill's entry text until the card comes again)
local state, cards, raws, pre = {}, {}, {}, {}
local out = {}
for i = 1, #evs, 3 do
  local card, entry = evs[i], evs[i + 1]
  local st = state[card]
  if st == nil and redis.call('HSETNX', card, field, entry) == 1 then
    state[card] = entry   -- the card's first bill, stored as sent: one bill duplicates nothing
  else
    local d = cjson.decode(entry)
    local fp, t, eid = d[1], tonumber(d[2]), d[3]
    if st == nil then
      local raw = redis.call('HGET', card, field)
      st = load(raw, t)
      state[card] = st
      cards[#cards + 1] = card
      if #st > 0 and sub(raw, 1, 1) == '[' then raws[card] = raw end
      pre[card] = ''
    elseif type(st) == 'string' then   -- the card's first bill of the batch, stored as sent: its state now
      raws[card] = st
      d = cjson.decode(st)
      st = {d[1], tonumber(d[2]), d[3]}
      state[card] = st
      cards[#cards + 1] = card
      pre[card] = ''
    end
    local len = #st
    local known = false
    for k = 1, len, 3 do
      if st[k + 2] == eid and st[k] == fp then known = true; break end
    end
    if not known then
      local p = 1
      while p <= len and before(t, eid, fp, st[p + 1], st[p + 2], st[p]) do p = p + 3 end
      if len == 0 then
        st[1] = fp; st[2] = t; st[3] = eid
      else
        tinsert(st, p, eid); tinsert(st, p, t); tinsert(st, p, fp)
      end
      len = len + 3
      local a = pre[card]
      if p ~= 1 then pre[card] = false
      elseif a == '' then pre[card] = sub(entry, 2, -2)
      elseif a then pre[card] = sub(entry, 2, -2) .. ',' .. a end
    end
    local m
    if len > 3 then
      -- the fingerprint's settlements within W either side: {event_id, t, ...} oldest first (by t, event_id)
      m = {}
      for k = len - 2, 1, -3 do
        if st[k] == fp then
          local x = st[k + 1]
          if x >= t - W and x <= t + W then m[#m + 1] = st[k + 2]; m[#m + 1] = x end
        end
      end
      local cut = st[2] - W - lateness
      while st[len - 1] < cut do  -- drop what no window can reach any more (the oldest entries come last)
        st[len] = nil; st[len - 1] = nil; st[len - 2] = nil
        len = len - 3
        pre[card] = false
      end
    end
    if m and #m >= 4 then
      local idx, total, inst = string.match(evs[i + 2], '^(%d+)\t([^\t]*)\t(.*)$')
      local first_t = m[2]
      local day = math.floor((first_t + tz) / 86400)
      local id = sub(card, #cp + 1)
      local ek = prefix .. ':inst:' .. inst .. ':' .. day .. ':ev'
      local bk = prefix .. ':inst:' .. inst .. ':' .. day .. ':bills'
      local zargs = {}
      for j = 1, #m, 2 do zargs[#zargs + 1] = m[j + 1]; zargs[#zargs + 1] = m[j] end
      redis.call('ZADD', ek, unpack(zargs))
      redis.call('HSET', bk, id .. '\t' .. fp .. '\t' .. m[1], tostring(#m / 2) .. '\t' .. total)
      redis.call('EXPIRE', ek, day_ttl)
      redis.call('EXPIRE', bk, day_ttl)
      local gap = m[#m] - first_t
      out[#out + 1] = {tonumber(idx), day, redis.call('ZRANGE', ek, 0, -1, 'WITHSCORES'), redis.call('HGETALL', bk),
                       #m / 2, tostring(gap)}
    end
  end
end
for c = 1, #cards do
  local card = cards[c]
  local a = pre[card]
  if a == false then redis.call('HSET', card, field, save(state[card]))
  elseif a ~= '' then
    local raw = raws[card]
    if raw then redis.call('HSET', card, field, '[' .. a .. ',' .. sub(raw, 2))
    else redis.call('HSET', card, field, '[' .. a .. ']') end
  end
end
return out
"""


def fingerprint(ev: Settlement) -> str:
    """Canonical fingerprint of a bill: institution, department, sorted (code, quantity, amount) lines, total.

    >>> from stream.events import parse_event
    >>> raw = (b'{"event_id":"E%d","event_time":"2026-11-24T09:13:05+08:00","card_id":"C1","institution_id":"H1",'
    ...        b'"institution_type":"hospital","district":"310104","visit_type":"outpatient","department":"D1",'
    ...        b'"items":[%s],"total_amount":44.0,"fund_paid":30.8}')
    >>> a = b'{"code":"R0001","category":"registration","quantity":1,"amount":20.0}'
    >>> b = b'{"code":"J0001","category":"exam","quantity":1,"amount":24}'
    >>> fingerprint(parse_event(raw % (1, a + b"," + b))) == fingerprint(parse_event(raw % (2, b + b"," + a)))
    True
    """
    # The text hashed is the JSON of (institution, department, sorted lines, total): orjson writes it (floats
    # included) faster than repr, and one digest of ~150 bytes costs less than looking up a memo of the text.
    items = ev.items
    if len(items) == 1:
        it = items[0]
        lines: Any = ((it.code, it.quantity, it.amount),)
    else:
        lines = sorted([(it.code, it.quantity, it.amount) for it in items])
    return _blake(_dumps((ev.institution_id, ev.department, lines, ev.total_amount)), digest_size=8).hexdigest()


_blake = hashlib.blake2b
_dumps = orjson.dumps


class DuplicateBilling(Detector):
    """The same bill settled twice within minutes under different event ids (see module docstring)."""

    rule = "duplicate_billing"
    subject_type = "institution"
    scripts = (LUA,)
    card_hash = "c"

    def __init__(self, window_s: int = 600, *, lateness_s: int = 3600, lang: str = "zh", version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        check_positive(self.rule, "window_s", window_s, integer=True)
        if window_s > 86400:
            raise ValueError(f"{self.rule}: window_s must be at most 86400 (one day), got {window_s}")
        self.window_s = window_s
        self._sha = self.sha(LUA)
        #: this rule's field of the card hash: the card's recent bills (see module docstring)
        self.field = f"{self.rule}:{window_s}"
        self.card_ttl_s = window_s + lateness_s
        self._cfg = orjson.dumps([self.field, window_s, lateness_s, 86400 + window_s + lateness_s, TZ_S])

    def params(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "lateness_s": self.lateness_s}

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        cp = ns.card_prefix(self.card_hash)
        rows: list[Any] = []   # flat: card key, entry, index\ttotal\tinstitution
        dumps = orjson.dumps
        for i, ev in enumerate(events):
            # a bill with lines, of an institution and a card that are not placeholders
            if ev.items and not _placeholder_institution(ev.institution_id) and not is_placeholder(ev.card_id):
                ts, eid, fp = ev.ts, ev.event_id, fingerprint(ev)
                t: Any = int(ts)
                if t != ts or not -1e14 < ts < 1e14:  # stored exactly, as text (TIMES_LUA)
                    t = f"{ts:.17g}"
                entry = dumps((fp, t, eid)).decode()
                if "/" in entry or "\x7f" in entry:   # as cjson writes them (orjson does not escape these)
                    entry = entry.replace("/", "\\/").replace("\x7f", "\\u007f")
                rows += (cp + ev.card_id, entry, f"{i}\t{ev.total_amount:.2f}\t{ev.institution_id}")
        if not rows:
            return 0
        pipe.evalsha(self._sha, 0, self.key(ns, self.window_s), cp, self._cfg, _pack(rows))
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not replies:
            return []
        out: dict[str, Alert] = {}
        for idx, day, flat, bills, n, gap in replies[0]:
            ev = events[int(idx)]
            dec = [x.decode() if isinstance(x, bytes) else x for x in flat]
            ids, times = dec[0::2], [float(x) for x in dec[1::2]]
            cards: set[str] = set()
            n_bills = extra = 0
            extra_amount = 0.0
            bl = [x.decode() if isinstance(x, bytes) else x for x in bills]
            for field, value in zip(bl[0::2], bl[1::2]):
                cards.add(field.split("\t", 1)[0])
                cnt, amount = value.split("\t")
                n_bills += 1
                extra += int(cnt) - 1
                extra_amount += (int(cnt) - 1) * float(amount)
            a = self._alert(ns, ev, int(day), ids, times, sorted(cards), n_bills, extra, round(extra_amount, 2),
                            int(n), float(gap))
            out[a.alert_id] = a
        return list(out.values())

    def _alert(self, ns: Namespace, ev: Settlement, day: int, ids: list[str], times: list[float], cards: list[str],
               n_bills: int, extra: int, extra_amount: float, copies: int, gap_s: float) -> Alert:
        inst, ws = ev.institution_id, self.window_s
        date = iso(day * 86400 - TZ_S)[:10]
        ratio = 1 + 0.5 * (extra - 1)   # 1 extra settlement: medium, 2: high, 3 or more: critical
        mins = f"{ws // 60} 分钟" if ws % 60 == 0 else f"{ws} 秒"
        mins_en = f"{ws // 60} min" if ws % 60 == 0 else f"{ws} s"
        card_zh = "、".join(cards[:3]) + (f" 等 {len(cards)} 张卡" if len(cards) > 3 else "")
        zh = (f"机构 {inst} 于 {date} 将 {n_bills} 张费用明细相同的结算单在 {mins}内重复结算 {extra} 次"
              f"（卡 {card_zh}），多结算 {extra_amount:.2f} 元")
        en = (f"Institution {inst} settled {n_bills} identical bill(s) again within {mins_en} on {date}: "
              f"{extra} extra settlement(s) (card(s) {', '.join(cards[:3])}{' …' if len(cards) > 3 else ''}), "
              f"{extra_amount:.2f} CNY billed twice")
        return Alert(
            alert_id=alert_id(ns.run_id, self.rule, "institution", inst, str(ws), str(day)),
            rule=self.rule, rule_version=self.version, severity=severity_for(ratio), score=round(ratio, 4),
            subject_type="institution", subject_id=inst, member_ids=cards, window_start=iso(min(times)),
            window_end=iso(max(times)), evidence_event_ids=ids, run_id=ns.run_id,
            summary=zh if self.lang == "zh" else en, summary_en=en, detected_at=now_iso(), window_s=ws,
            metrics={"duplicated_bills": n_bills, "extra_settlements": extra, "extra_amount": extra_amount,
                     "cards": cards, "day": date, "card": ev.card_id, "event_id": ev.event_id,
                     "copies": copies, "gap_s": gap_s, "total_amount": ev.total_amount, "lines": len(ev.items),
                     "window_s": ws},
        )
