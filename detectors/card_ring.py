"""``card_ring``: card collectors — many cards buying one resale-prone drug at one counter at once.

A dealer (药贩子) who has collected or rented insurance cards takes the stack to one counter
and settles the same resale-prone drug on each (贩卖医保药品 / 收集医保卡集中购药), often on
several days with much the same cards. The rule counts the distinct cards that settle one
drug code (from ``resale_prone``) at one institution within ``window_s``, in ``visit_types``:
retail pharmacy sales, where no physician sees the patient (a community centre's morning
rush of chronic refills — 长处方, 家庭医生 — easily puts a dozen statin patients in an hour;
collected cards pushed through one physician are ``prescriber_volume``'s pattern; ward
bills are batch-posted). A burst of at least ``min_cards`` cards that is also at least
``min_lift`` times the place's usual rate for that drug (mean per ``window_s`` over the
preceding ``baseline_s``, ending ``window_s + lateness_s`` before the burst) qualifies; its
purchases are the ring's except a lone customer's: a ring purchase has another card's
purchase within ``member_gap_s`` (the stack is swiped in one sitting; whoever came in alone
40 minutes earlier is not listed). A family of 2–4 cards is far below ``min_cards``; a busy
pharmacy's steady stream of statin buyers stays below ``min_lift`` times its own rate.

Rings are groups, not places: each day's burst joins the group that most of its cards
already belong to (at least ``LINK_CARDS`` = 2 of them; the group active within
``recur_s``) — same ring, same alert, the new cards added — or else starts a new group. A
day on which at least ``recur_share`` of the burst's cards were in the ring before is a
recurrence and raises the severity. The ring id is
``RING-`` + hash(institution, drug, day the group first qualified): it stays fixed while
the stack of cards changes a little from trip to trip, and a different stack at the same
counter is a different ring. Which purchases qualify is a monotone, event-time-only
condition (more purchases only add windows), a day's group is decided once, and the
members are read from the state after every change, so any arrival order within
``lateness_s`` ends with the same rings and members.

State per (institution, drug) (Redis, all keys expire):

* ``cw:{run}:card_ring:{window_s}:{institution}:{drug}`` — sorted set, member
  ``card\\tevent_id``, score = event time, kept ``history_s`` behind each new purchase (at least
  ``baseline_s + window_s + lateness_s``; longer, so that a partition that falls further behind
  than ``lateness_s`` — a replay of sparse data — still meets the rest of its burst);
* ``…:c`` — purchases in a qualifying window; ``…:m`` — those with a neighbour within
  ``member_gap_s`` (the rings' purchases);
* ``…:g`` — hash: ``d:{day}`` → group, ``c:{card}`` → the card's first group, ``f:``/``l:{group}``
  first/last day, ``p:{group}`` most cards in one window, ``name`` of the drug.

>>> from detectors.drugs import DrugList
>>> CardRing(resale_prone=DrugList(["XC10AA"]))
CardRing(window_s=3600, min_cards=8, min_lift=8, baseline_s=86400, recur_s=2592000, recur_share=0.5, member_gap_s=900, history_s=604800, visit_types=['pharmacy'], lateness_s=3600)
>>> CardRing(min_cards=1)
Traceback (most recent call last):
...
ValueError: card_ring: min_cards must be >= 3, got 1
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Sequence

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors.base import Detector, Namespace, check_positive
from detectors.drugs import placeholder_institution as _placeholder_inst, unusable_ids as _unusable, clean_text as _clean
from detectors.drugs import EMPTY, DrugList
from stream.events import Settlement, iso

LUA = r"""
-- ARGV: window, min_cards, baseline, gap, min_lift, keep, ttl_z, recur, ttl_ring, member_gap,
--       link cards, utc offset, then one string per entry, fields separated by \31:
--       t, card, event_id, drug name, institution, drug code
-- KEYS per entry: purchases zset, ring purchases zset, candidates zset, groups hash
-- returns one {institution, drug code, name, {{group, purchases (card\tevent_id, t)*, peak}*}}
-- per entry that changed a ring
local SEP = '\t'
local W = tonumber(ARGV[1]); local minc = tonumber(ARGV[2]); local C = tonumber(ARGV[3])
local gap = tonumber(ARGV[4]); local lift = tonumber(ARGV[5]); local keep = tonumber(ARGV[6])
local ttl_z = tonumber(ARGV[7]); local recur = tonumber(ARGV[8]); local ttl_r = tonumber(ARGV[9])
local G = tonumber(ARGV[10]); local link = tonumber(ARGV[11]); local TZ = tonumber(ARGV[12])
local blen = C - gap
local function day_of(x) return math.floor((x + TZ) / 86400) end
local function fields(s)
  local out = {}
  local p = 1
  while true do
    local q = string.find(s, '\31', p, true)
    if not q then out[#out + 1] = string.sub(s, p); return out end
    out[#out + 1] = string.sub(s, p, q - 1)
    p = q + 1
  end
end
local out = {}
local k = 1
local a = 13
local nargv = #ARGV
while a <= nargv do
  local x = fields(ARGV[a])
  a = a + 1
  local t = tonumber(x[1]); local card = x[2]; local eid = x[3]; local name = x[4]
  local zk, mk, ck, gk = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  k = k + 4
  redis.call('ZADD', zk, t, card .. SEP .. eid)
  -- pruned relative to this purchase, not the newest: a partition that lags still meets its cluster-mates
  redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. tostring(t - keep))
  redis.call('EXPIRE', zk, ttl_z)
  local pre = redis.call('ZCOUNT', zk, tostring(t - W), tostring(t + W)) >= minc
  -- ring candidates near t: this purchase may be the neighbour one of them was missing
  local nc = redis.call('ZCOUNT', ck, tostring(t - G), tostring(t + G))
  if pre or nc > 0 then
    local evs = redis.call('ZRANGEBYSCORE', zk, tostring(t - W - G), tostring(t + W + G), 'WITHSCORES')
    local n = #evs / 2
    local cs, ts, idx = {}, {}, {}
    local j0 = n + 1
    for j = 1, n do
      local s = evs[2 * j - 1]
      cs[j] = string.sub(s, 1, string.find(s, SEP, 1, true) - 1)
      ts[j] = tonumber(evs[2 * j])
      idx[s] = j
      if j0 > n and ts[j] >= t - W then j0 = j end
    end
    local lo, hi, peak = nil, nil, 0
    if pre then
      -- every window [s, s + W] that contains t starts at a purchase s in [t - W, t]
      local cnt = {}
      local distinct = 0
      local e = j0
      for j = j0, n do
        local s = ts[j]
        if s > t then break end
        while e <= n and ts[e] <= s + W do
          local c = cs[e]
          local x = cnt[c] or 0
          if x == 0 then distinct = distinct + 1 end
          cnt[c] = x + 1
          e = e + 1
        end
        if distinct >= minc then
          local need = minc
          if lift > 0 then
            local nb = redis.call('ZCOUNT', zk, tostring(s - C), '(' .. tostring(s - gap))
            if lift * nb * W / blen > need then need = lift * nb * W / blen end
          end
          if distinct >= need then
            if not lo then lo = j end
            hi = e - 1
            if distinct > peak then peak = distinct end
          end
        end
        local c = cs[j]
        cnt[c] = cnt[c] - 1
        if cnt[c] == 0 then distinct = distinct - 1 end
      end
    end
    -- the ring (group) a day's burst belongs to: decided once per day, when the day first
    -- qualifies: the group most of its cards already belong to, if at least `link` of them do
    -- and it was active within recur; else a new group named after the day
    local gday = {}
    local function group_of_day(d)
      if gday[d] then return gday[d] end
      local gid = redis.call('HGET', gk, 'd:' .. d)
      if not gid then
        local t0 = d * 86400 - TZ
        local cards = {}
        for _, m in ipairs(redis.call('ZRANGEBYSCORE', ck, tostring(t0), '(' .. tostring(t0 + 86400))) do
          cards[string.sub(m, 1, string.find(m, SEP, 1, true) - 1)] = true
        end
        local votes = {}
        for c in pairs(cards) do
          local g = redis.call('HGET', gk, 'c:' .. c)
          if g then
            local span = redis.call('HMGET', gk, 'f:' .. g, 'l:' .. g)
            local f, l = tonumber(span[1]), tonumber(span[2])
            if f and (d - l) * 86400 <= recur and (f - d) * 86400 <= recur then votes[g] = (votes[g] or 0) + 1 end
          end
        end
        local best, bn = nil, 0
        for g, v in pairs(votes) do
          if v > bn or (v == bn and g < best) then best, bn = g, v end
        end
        if best and bn >= link then gid = best else gid = tostring(d) end
        redis.call('HSET', gk, 'd:' .. d, gid)
        local span = redis.call('HMGET', gk, 'f:' .. gid, 'l:' .. gid)
        if not span[1] or d < tonumber(span[1]) then redis.call('HSET', gk, 'f:' .. gid, d) end
        if not span[2] or d > tonumber(span[2]) then redis.call('HSET', gk, 'l:' .. gid, d) end
      end
      gday[d] = gid
      return gid
    end
    local check = {}
    local touched = {}
    if lo then
      -- candidates: purchases in a qualifying window
      for q = lo, hi do
        redis.call('ZADD', ck, ts[q], evs[2 * q - 1])
        check[q] = true
      end
      redis.call('ZREMRANGEBYSCORE', ck, '-inf', '(' .. tostring(t - recur - W))
      redis.call('EXPIRE', ck, ttl_r)
      for q = lo, hi do group_of_day(day_of(ts[q])) end
      local gid = group_of_day(day_of(t))
      local p = tonumber(redis.call('HGET', gk, 'p:' .. gid)) or 0
      if peak > p then redis.call('HSET', gk, 'p:' .. gid, peak) end
      if name ~= '' then redis.call('HSETNX', gk, 'name', name) end
      redis.call('EXPIRE', gk, ttl_r)
      touched[gid] = true
    end
    if lo or nc > 0 then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', ck, tostring(t - G), tostring(t + G))) do
        local j = idx[m]
        if j then check[j] = true end
      end
    end
    -- ring purchases: candidates with another card's purchase of the drug there within member_gap
    -- (the stack of cards is swiped in one sitting; a lone customer within the hour is not one)
    local added = 0
    for j in pairs(check) do
      local ok = false
      local l = j - 1
      while not ok and l >= 1 and ts[j] - ts[l] <= G do
        if cs[l] ~= cs[j] then ok = true end
        l = l - 1
      end
      l = j + 1
      while not ok and l <= n and ts[l] - ts[j] <= G do
        if cs[l] ~= cs[j] then ok = true end
        l = l + 1
      end
      if ok and redis.call('ZADD', mk, ts[j], evs[2 * j - 1]) == 1 then
        local gid = group_of_day(day_of(ts[j]))
        redis.call('HSETNX', gk, 'c:' .. cs[j], gid)
        touched[gid] = true
        added = added + 1
      end
    end
    if added > 0 then
      redis.call('ZREMRANGEBYSCORE', mk, '-inf', '(' .. tostring(t - recur - W))
      redis.call('EXPIRE', mk, ttl_r)
      redis.call('EXPIRE', gk, ttl_r)
    end
    if next(touched) then
      -- one snapshot per ring touched: all its purchases so far
      local all = redis.call('ZRANGE', mk, 0, -1, 'WITHSCORES')
      local snaps = {}
      for gid in pairs(touched) do
        local flat = {}
        for q = 1, #all, 2 do
          if group_of_day(day_of(tonumber(all[q + 1]))) == gid then
            flat[#flat + 1] = all[q]; flat[#flat + 1] = all[q + 1]
          end
        end
        if #flat > 0 then
          snaps[#snaps + 1] = {gid, flat, redis.call('HGET', gk, 'p:' .. gid) or '0'}
        end
      end
      if #snaps > 0 then out[#out + 1] = {x[5], x[6], redis.call('HGET', gk, 'name') or '', snaps} end
    end
  end
end
return out
"""

_SEP = "\t"
#: day boundaries (which day a burst is on) in China Standard Time, UTC+8 all year
TZ_S = 8 * 3600
#: cards of an earlier ring (same counter, same drug, within recur_s) that make a burst that ring's:
#: a dealer's cards do not turn up in someone else's stack. Two, not a share of the day's cards:
#: the decision is taken when the burst first qualifies, with only part of its cards arrived.
LINK_CARDS = 2


def ring_id(institution_id: str, drug_code: str, first_day: int) -> str:
    """Stable id of one group: the counter, the drug and the day the group first qualified.

    >>> ring_id("P001", "XC10AAA003", 20759)
    'RING-51dfd341f5a5dcc9'
    """
    return "RING-" + hashlib.sha256(f"{institution_id}\x1f{drug_code}\x1f{first_day}".encode()).hexdigest()[:16]


def day_label(day: int) -> str:
    """ISO date of a day number (days since 1970-01-01 in UTC+8).

    >>> day_label(20759)
    '2026-11-02'
    """
    return iso(day * 86400 - TZ_S)[:10]



def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _hours(window_s: int, lang: str) -> str:
    if window_s % 3600 == 0:
        h = window_s // 3600
        return f"{h} 小时" if lang == "zh" else f"{h} h"
    m = max(1, round(window_s / 60))
    return f"{m} 分钟" if lang == "zh" else f"{m} min"


class CardRing(Detector):
    """Distinct cards buying one resale-prone drug at one institution in a short burst (see module docstring)."""

    rule = "card_ring"
    subject_type = "ring"
    scripts = (LUA,)

    def __init__(self, *, window_s: int = 3600, min_cards: int = 8, min_lift: float = 8, baseline_s: int = 86400,
                 recur_s: int = 30 * 86400, recur_share: float = 0.5, member_gap_s: int = 900,
                 history_s: int = 7 * 86400,
                 visit_types: Sequence[str] = ("pharmacy",), resale_prone: DrugList = EMPTY,
                 lateness_s: int = 3600, lang: str = "zh", version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        r = self.rule
        for name, val in (("window_s", window_s), ("min_cards", min_cards), ("baseline_s", baseline_s),
                          ("recur_s", recur_s), ("member_gap_s", member_gap_s), ("history_s", history_s)):
            check_positive(r, name, val, integer=True)
        if min_cards < 3:
            raise ValueError(f"{r}: min_cards must be >= 3, got {min_cards}")
        if isinstance(min_lift, bool) or not isinstance(min_lift, (int, float)) or min_lift < 0:
            raise ValueError(f"{r}: min_lift must be a non-negative number, got {min_lift!r}")
        if isinstance(recur_share, bool) or not isinstance(recur_share, (int, float)) or not 0 < recur_share <= 1:
            raise ValueError(f"{r}: recur_share must be a number in (0, 1], got {recur_share!r}")
        if baseline_s <= window_s + lateness_s:
            raise ValueError(f"{r}: baseline_s must exceed window_s + lateness_s ({window_s + lateness_s}), "
                             f"got {baseline_s}")
        if history_s < baseline_s + window_s + lateness_s:
            raise ValueError(f"{r}: history_s must cover baseline_s + window_s + lateness_s "
                             f"({baseline_s + window_s + lateness_s}), got {history_s}")
        if member_gap_s > window_s:
            raise ValueError(f"{r}: member_gap_s must be <= window_s ({window_s}), got {member_gap_s}")
        if recur_s < window_s:
            raise ValueError(f"{r}: recur_s must be >= window_s ({window_s}), got {recur_s}")
        allowed = ("outpatient", "emergency", "pharmacy", "inpatient")
        if isinstance(visit_types, str) or not visit_types or any(v not in allowed for v in visit_types):
            raise ValueError(f"{r}: visit_types must be a non-empty list of {list(allowed)}, got {visit_types!r}")
        if not isinstance(resale_prone, DrugList):
            raise ValueError(f"{r}: resale_prone must be a DrugList, got {type(resale_prone).__name__}")
        self.window_s = window_s
        self.min_cards = min_cards
        self.min_lift = min_lift
        self.baseline_s = baseline_s
        self.recur_s = recur_s
        self.recur_share = recur_share
        self.history_s = history_s
        self.member_gap_s = member_gap_s
        self.visit_types = tuple(sorted(set(visit_types)))
        self.resale_prone = resale_prone
        self._head = [window_s, min_cards, baseline_s, window_s + lateness_s, min_lift, history_s, history_s,
                      recur_s, recur_s + window_s + lateness_s, member_gap_s, LINK_CARDS, TZ_S]
        self._sha = self.sha(LUA)

    def params(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "min_cards": self.min_cards, "min_lift": self.min_lift,
                "baseline_s": self.baseline_s, "recur_s": self.recur_s, "recur_share": self.recur_share,
                "member_gap_s": self.member_gap_s, "history_s": self.history_s,
                "visit_types": list(self.visit_types), "lateness_s": self.lateness_s}

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        argv: list[Any] = list(self._head)
        keys: list[str] = []
        visit_types, resale = self.visit_types, self.resale_prone
        for ev in events:
            if ev.visit_type not in visit_types:
                continue
            codes = {it.code: it.name for it in ev.items if it.category == "drug" and resale.matches(it.code, it.name)}
            if not codes:
                continue
            card, inst = ev.card_id, ev.institution_id
            if _unusable(card, ev.event_id) or "\t" in inst or "\x1f" in inst or _placeholder_inst(inst):
                continue
            for code, name in codes.items():
                if "\t" in code or "\x1f" in code:
                    continue
                base = self.key(ns, self.window_s, inst, code)
                keys += [base, base + ":m", base + ":c", base + ":g"]
                argv.append(f"{ev.ts!r}\x1f{card}\x1f{ev.event_id}\x1f{_clean(name or '')}\x1f{inst}\x1f{code}")
        if not keys:
            return 0
        pipe.evalsha(self._sha, len(keys), *keys, *argv)
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not replies:
            return []
        # a ring's last snapshot in the batch holds all its purchases so far: one alert from it
        last: dict[tuple[str, str, int], tuple[str, Any, Any]] = {}
        for inst, code, name, snaps in replies[0]:
            inst, code, name = _s(inst), _s(code), _s(name)
            for gid, flat, peak in snaps:
                last[(inst, code, int(_s(gid)))] = (name or code, flat, peak)
        out: dict[str, Alert] = {}
        for (inst, code, gid), (name, flat, peak) in last.items():
            members = []
            for j in range(0, len(flat), 2):
                card, _, eid = _s(flat[j]).partition(_SEP)
                members.append((float(flat[j + 1]), card, eid))
            a = self._alert(ns, inst, code, name, gid, int(float(_s(peak))), members)
            out[a.alert_id] = a
        return list(out.values())

    def _alert(self, ns: Namespace, inst: str, code: str, name: str, gid: int, peak: int,
               members: list[tuple[float, str, str]]) -> Alert:
        members.sort()
        rid = ring_id(inst, code, gid)
        cards = sorted({c for _, c, _ in members})
        by_day: dict[str, set[str]] = defaultdict(set)
        for t, c, _ in members:
            by_day[iso(t)[:10]].add(c)
        seen: set[str] = set()
        recurrent, best_share = 0, 0.0
        for day in sorted(by_day):
            cs = by_day[day]
            if seen:
                share = len(cs & seen) / len(cs)
                best_share = max(best_share, share)
                recurrent += share >= self.recur_share
            seen |= cs
        score = peak / self.min_cards * (1 + 0.5 * recurrent)
        days = len(by_day)
        lbl_zh, lbl_en = _hours(self.window_s, "zh"), _hours(self.window_s, "en")
        zh = (f"{inst} 在 {lbl_zh}内有 {peak} 张不同医保卡购买 {name}（阈值 {self.min_cards} 张）"
              + (f"，{days} 天内共 {len(cards)} 张卡" if days > 1 else "")
              + (f"，其中 {recurrent} 天同一批卡重复出现（重合 {best_share:.0%}）" if recurrent else "")
              + "，疑似收集医保卡集中购药")
        en = (f"{peak} distinct cards bought {code} ({name}) at {inst} within {lbl_en} (threshold {self.min_cards})"
              + (f"; {len(cards)} cards over {days} days" if days > 1 else "")
              + (f"; the same cards came back on {recurrent} day(s) (overlap {best_share:.0%})" if recurrent else "")
              + "; suspected card collecting")
        return Alert(
            alert_id=alert_id(ns.run_id, self.rule, "ring", rid, str(self.window_s), gid),
            rule=self.rule, rule_version=self.version, severity=severity_for(score), score=round(score, 4),
            subject_type="ring", subject_id=rid, member_ids=cards,
            window_start=iso(members[0][0]), window_end=iso(members[-1][0]),
            evidence_event_ids=[eid for _, _, eid in members], run_id=ns.run_id,
            summary=zh if self.lang == "zh" else en, summary_en=en, detected_at=now_iso(), window_s=self.window_s,
            metrics={"institution_id": inst, "drug_code": code, "drug_name": name, "first_day": day_label(gid),
                     "cards": len(cards), "peak_cards": peak, "min_cards": self.min_cards, "window_s": self.window_s, "days": days,
                     "recurrent_days": recurrent, "max_repeat_share": round(best_share, 3),
                     "purchases": len(members)},
        )
