"""``card_ring``: card collectors — many cards buying one resale-prone drug at one place at once.

A dealer (药贩子) who has collected or rented insurance cards takes them to one counter and
settles the same resale-prone drug on each (贩卖医保药品 / 收集医保卡集中购药), often on
several days with much the same stack of cards. The rule counts the distinct cards that
settle one drug code (from ``resale_prone``) at one institution, in ``visit_types``
(retail pharmacy purchases, where no physician sees the patient: a morning rush of
chronic refills at a community centre — 长处方, 家庭医生 — easily puts a dozen statin
patients in an hour, and collected cards pushed through one physician are
``prescriber_volume``'s pattern; ward bills are batch-posted), within ``window_s``: a burst of at least ``min_cards`` cards that is also at
least ``min_lift`` times the institution's usual rate for that drug (mean per ``window_s``
over the preceding ``baseline_s``, which ends ``window_s + lateness_s`` before the burst)
qualifies; its purchases are the ring's, except a lone customer's: a ring purchase has
another card's purchase within ``member_gap_s`` (the stack of cards is swiped in one
sitting, so the buyer who came in alone 40 minutes earlier is not listed). A family of 2–4 cards is far below
``min_cards``; a busy pharmacy's ordinary stream of statin buyers is below ``min_lift``
times its own rate. When a later burst at the same place and drug reuses at least
``recur_share`` of the cards seen on earlier days, the day is a recurrence and the severity
rises; bursts within ``recur_s`` of each other extend one alert.

The ring id is ``RING-`` + a hash of (institution, drug code): the counter and the drug are
what stays fixed while the stack of cards changes from trip to trip, so the id survives
a recurrence with partly different members, needs no matching of member sets, and does
not depend on which cards happened to arrive first from which partition. The members are
every card with a purchase in some qualifying burst — a monotone, event-time-only
condition, so any arrival order within ``lateness_s`` ends with the same members.

State per (institution, drug) (Redis, all keys expire):

* ``cw:{run}:card_ring:{window_s}:{institution}:{drug}`` — sorted set, member
  ``card\\tevent_id``, score = event time, kept ``history_s`` behind each new purchase (at least
  ``baseline_s + window_s + lateness_s``; longer, so that a partition that falls further behind
  than ``lateness_s`` — a replay of sparse data — still meets the rest of its burst);
* ``…:c`` — purchases in a qualifying window, ``…:m`` — those with a neighbour within
  ``member_gap_s`` (the ring's), ``…:ep`` — ``first`` and ``anchor`` (earliest ring purchase
  of the episode), ``last``, ``peak`` (most cards in one window), drug ``name``.

>>> from detectors.drugs import DrugList
>>> CardRing(resale_prone=DrugList(["XC10AA"]))
CardRing(window_s=3600, min_cards=8, min_lift=8, baseline_s=86400, recur_s=2592000, recur_share=0.5, member_gap_s=900, history_s=604800, visit_types=['pharmacy'], lateness_s=3600)
>>> ring_id("P001", "XC10AAA003")
'RING-2a2d461993c41084'
>>> CardRing(min_cards=1)
Traceback (most recent call last):
...
ValueError: card_ring: min_cards must be >= 3, got 1
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Iterator, Sequence

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors.base import Detector, Namespace, check_positive
from detectors.drugs import EMPTY, DrugList, is_placeholder
from stream.events import Settlement, iso

LUA = r"""
-- ARGV: window, min_cards, baseline, gap, min_lift, keep, ttl_z, recur, ttl_ring, member_gap,
--       then per entry: t, card, event_id, drug name
-- KEYS per entry: purchases zset, ring members zset, candidates zset, episode hash
local SEP = '\t'
local W = tonumber(ARGV[1]); local minc = tonumber(ARGV[2]); local C = tonumber(ARGV[3])
local gap = tonumber(ARGV[4]); local lift = tonumber(ARGV[5]); local keep = tonumber(ARGV[6])
local ttl_z = tonumber(ARGV[7]); local recur = tonumber(ARGV[8]); local ttl_r = tonumber(ARGV[9])
local G = tonumber(ARGV[10])
local blen = C - gap
local out = {}
local k = 1
local i = 0
local a = 11
while a <= #ARGV do
  i = i + 1
  local t = tonumber(ARGV[a]); local card = ARGV[a + 1]; local eid = ARGV[a + 2]; local name = ARGV[a + 3]
  a = a + 4
  local zk, mk, ck, ek = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  k = k + 4
  redis.call('ZADD', zk, t, card .. SEP .. eid)
  -- pruned relative to this purchase, not the newest: a partition that lags still meets its cluster-mates
  redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. tostring(t - keep))
  redis.call('EXPIRE', zk, ttl_z)
  local res = 0
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
    local check = {}
    local take = false
    if lo then
      local ep = redis.call('HMGET', ek, 'anchor', 'last', 'peak')
      local anchor = tonumber(ep[1]); local last = tonumber(ep[2]); local oldpeak = tonumber(ep[3]) or 0
      local qmin, qmax = ts[lo], ts[hi]
      take = true
      if anchor and qmin <= last + recur and qmax >= anchor - recur then
        if qmax > last then last = qmax end
        if qmin < anchor then anchor = qmin end
      elseif (not anchor) or qmin > last + recur then
        redis.call('DEL', mk, ck)
        anchor = qmin; last = qmax; oldpeak = 0
        redis.call('HSET', ek, 'first', tostring(anchor))
      else
        take = false   -- belongs to an older episode that is no longer kept
      end
      if take then
        -- candidates: purchases in a qualifying window
        for q = lo, hi do
          redis.call('ZADD', ck, ts[q], evs[2 * q - 1])
          check[q] = true
        end
        if peak < oldpeak then peak = oldpeak end
        redis.call('HSET', ek, 'anchor', tostring(anchor), 'last', tostring(last), 'peak', peak)
        if name ~= '' then redis.call('HSETNX', ek, 'name', name) end
        redis.call('EXPIRE', ck, ttl_r)
        redis.call('EXPIRE', ek, ttl_r)
      end
    end
    if take or nc > 0 then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', ck, tostring(t - G), tostring(t + G))) do
        local j = idx[m]
        if j then check[j] = true end
      end
    end
    -- members: candidates with another card's purchase of the drug there within member_gap
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
      if ok then added = added + redis.call('ZADD', mk, ts[j], evs[2 * j - 1]) end
    end
    if added > 0 then redis.call('EXPIRE', mk, ttl_r) end
    if (take or added > 0) and redis.call('ZCARD', mk) > 0 then
      local info = redis.call('HMGET', ek, 'first', 'name', 'peak')
      if info[1] then
        res = {info[1], redis.call('ZRANGE', mk, 0, -1, 'WITHSCORES'), info[2] or '', info[3] or '0'}
      end
    end
  end
  out[i] = res
end
return out
"""

_SEP = "\t"


def ring_id(institution_id: str, drug_code: str) -> str:
    """Stable id of the ring operating at one institution with one drug."""
    return "RING-" + hashlib.sha256(f"{institution_id}\x1f{drug_code}".encode()).hexdigest()[:16]


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
            raise ValueError(f"{r}: baseline_s must exceed window_s + lateness_s ({window_s + lateness_s}), got {baseline_s}")
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
                      recur_s, recur_s + window_s + lateness_s, member_gap_s]
        self._sha = self.sha(LUA)

    def params(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "min_cards": self.min_cards, "min_lift": self.min_lift,
                "baseline_s": self.baseline_s, "recur_s": self.recur_s, "recur_share": self.recur_share,
                "member_gap_s": self.member_gap_s, "history_s": self.history_s,
                "visit_types": list(self.visit_types), "lateness_s": self.lateness_s}

    def _entries(self, events: Sequence[Settlement]) -> Iterator[tuple[Settlement, str, str]]:
        """(event, drug code, drug name) for every resale-prone drug an eligible event settles."""
        for ev in events:
            if ev.visit_type not in self.visit_types:
                continue
            if is_placeholder(ev.card_id) or is_placeholder(ev.institution_id):
                continue
            if _SEP in ev.card_id or _SEP in ev.event_id:
                continue
            seen: set[str] = set()
            for it in ev.items:
                if it.category == "drug" and it.code not in seen and self.resale_prone.matches(it.code, it.name):
                    seen.add(it.code)
                    yield ev, it.code, (it.name or "").replace(_SEP, " ")

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        argv: list[Any] = list(self._head)
        keys: list[str] = []
        for ev, code, name in self._entries(events):
            base = self.key(ns, self.window_s, ev.institution_id, code)
            keys += [base, base + ":m", base + ":c", base + ":ep"]
            argv += [repr(ev.ts), ev.card_id, ev.event_id, name]
        if not keys:
            return 0
        pipe.evalsha(self._sha, len(keys), *keys, *argv)
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not replies:
            return []
        # the ring's last reply in the batch holds all its purchases so far: build one alert from it
        last: dict[tuple[str, str, str], tuple[str, Any]] = {}
        for (ev, code, name), res in zip(self._entries(events), replies[0]):
            if res:   # one per ring and episode
                last[(ev.institution_id, code, _s(res[0]))] = (name, res)
        out: dict[str, Alert] = {}
        for (inst, code, _), (name, (first, flat, stored_name, peak)) in last.items():
            members = []
            for j in range(0, len(flat), 2):
                card, _, eid = _s(flat[j]).partition(_SEP)
                members.append((float(flat[j + 1]), card, eid))
            a = self._alert(ns, inst, code, _s(stored_name) or name or code, float(_s(first)), int(_s(peak)),
                            members)
            out[a.alert_id] = a
        return list(out.values())

    def _alert(self, ns: Namespace, inst: str, code: str, name: str, first: float, peak: int,
               members: list[tuple[float, str, str]]) -> Alert:
        members.sort()
        rid = ring_id(inst, code)
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
            alert_id=alert_id(ns.run_id, self.rule, "ring", rid, str(self.window_s), iso(first)[:10]),
            rule=self.rule, rule_version=self.version, severity=severity_for(score), score=round(score, 4),
            subject_type="ring", subject_id=rid, member_ids=cards,
            window_start=iso(members[0][0]), window_end=iso(members[-1][0]),
            evidence_event_ids=[eid for _, _, eid in members], run_id=ns.run_id,
            summary=zh if self.lang == "zh" else en, summary_en=en, detected_at=now_iso(), window_s=self.window_s,
            metrics={"institution_id": inst, "drug_code": code, "drug_name": name, "cards": len(cards),
                     "peak_cards": peak, "min_cards": self.min_cards, "window_s": self.window_s, "days": days,
                     "recurrent_days": recurrent, "max_repeat_share": round(best_share, 3),
                     "purchases": len(members)},
        )
