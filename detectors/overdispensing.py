"""``overdispensing``: one card dispensed far more days of a drug than the days that passed (超量配药).

Inspectors hunt cards that collect the same drug (same code, or the same active ingredient
by the first ``ingredient_prefix_len`` characters of the national drug code, 通用名 level)
again and again, at one or many designated institutions, long before the previous supply
could have been used up: 重复配药 / 超量开药, typically to resell resale-prone drugs. For
each take-home drug line (``days_supply`` > 0; inpatient bills are skipped, those drugs are
administered on the ward) the rule looks back over ``window_s`` of event time at the card's
fills of that ingredient and fires on a repeated pattern, never on one prescription: (a) at
least ``min_fills`` fills, the supply dispensed before the latest one more than
``max_supply_ratio`` times the days elapsed since the first fill of the window (at least one
day) *and* at least ``min_excess_days`` days of it not yet usable; or (b) at least
``min_early_refills`` early refills in the window, a refill being early when less than
``early_refill_share`` of the previous fill's supply had elapsed and at least
``early_refill_min_left_days`` of it were left (short courses such as antipyretics never
count). One approved long prescription (长处方, 60-90 days in one fill) never fires on its
own, nor does one duplicate prescription (the same drug again at a same-day referral: that
is prescription review's 重复开药); two overlapping monthly refills a few days early leave far
less than ``min_excess_days`` unused. The default ratio, 4, is above what a legitimate patient
can reach in a month (one 12-week 长处方 plus one 4-week refill from a second prescriber: 112
days over 28 or more); slower but steady stockpiling (2-4x) is what the early-refill count
catches. Alerts on resale-prone drugs (``resale_prone_drugs`` in ``configs/rules.yaml``)
are raised ``resale_prone_severity_step`` severity levels: a lower threshold for them would
flag ordinary chronic patients whose packages round a month up to 56 days. One alert per
card and episode (later fills extend it).

State per card (Redis):

* field ``overdispensing:{window_s},{ingredient_prefix_len}`` of the card's hash ``cw:{run}:c:{card}`` —
  the card's fills of take-home drugs over the last ``window_s`` + lateness of event time, all
  ingredients together, in one flat JSON array: per event ``t, event_id, institution, n,`` then
  ``n`` pairs ``ingredient, days``, in (event time, ``event_id``) order, pruned relative to the
  newest fill whenever a fill is added (a redelivered ``event_id`` is never added again). A card's
  first fill in reach (no field yet, the usual case) is written as its entry's JSON text, built in
  Python (``HSETNX``: one call, no decoding or encoding); a fill after the card's last one is written
  by appending its entry's text to the stored text; cjson re-encodes only when a fill goes in earlier
  or old ones are pruned. (The format is the one earlier versions wrote, so a worker upgraded
  mid-stream reads their state as is.) The
  processor expires the hash; this rule needs it ``window_s`` + lateness after the card's last
  event (``card_ttl_s``);
* ``cw:{run}:overdispensing:{window_s}:{card}:ep`` — the open episode (``start``, ``last``);
  ``…:ev`` — its evidence (both expire after ``window_s`` + lateness).

>>> Overdispensing(window_s=2592000, max_supply_ratio=4.0, min_excess_days=30)  # doctest: +ELLIPSIS
Overdispensing(window_s=2592000, ingredient_prefix_len=10, max_supply_ratio=4.0, min_excess_days=30, ...)
>>> Overdispensing(window_s=0)
Traceback (most recent call last):
...
ValueError: overdispensing: window_s must be a positive integer, got 0
"""

from __future__ import annotations

from typing import Any, Sequence

import orjson
from msgspec.msgpack import encode as _pack

from alerts.model import SEVERITIES, Alert, alert_id, now_iso, severity_for
from detectors.base import EPISODE_LUA, Detector, Memo, Namespace, check_positive
from detectors.card_hopping import window_label
from detectors.drugs import EMPTY, DrugList, ingredient_key, is_placeholder
from stream.events import Settlement, iso

LUA = EPISODE_LUA + r"""
-- ARGV[1] episode key prefix (cw:{run}:overdispensing:{window_s}), ARGV[2] card hash prefix (cw:{run}:c:),
-- ARGV[3] this rule's field of the card hash, ARGV[4] JSON [W, lateness, ttl, max_ratio, min_excess_days,
-- early_share, min_early, min_left_days, min_fills], ARGV[5] MessagePack, flat (one table to decode, not one
-- per event): [index, more, card hash key, entry, ...] per event with take-home drug lines, where entry is the
-- event's fill as stored, in JSON text built in Python: [t, event_id, institution, number of lines, ingredient,
-- days, ...], and more is 1 when the card has other events in this batch (0: its only one, the usual case).
-- The field holds the card's fills of the last W + lateness, flat too: [t, event_id, institution, number of
-- lines, ingredient, days, ..., t, ...], in (t, event_id) order, one entry per event (a redelivered event_id
-- is not added again). A card without it (its first settlement in reach, the usual case) gets the entry text as
-- is (HSETNX: one call, no decoding, no encoding; one fill is never a pattern); otherwise the stored text with
-- the entry's text appended is decoded (one decoding for both) and, when the event is new, sorts after the
-- stored fills and nothing is pruned, that text is the new value (no re-encoding). A card with several events
-- in the batch is read once and written once.
-- Episode keys: {prefix}:{card}:ep / :ev. Returns only the events that fired:
-- {index, episode start, evidence (id, time)*, fired lines}
local prefix, cp, field = ARGV[1], ARGV[2], ARGV[3]
local cfg = cjson.decode(ARGV[4])
local W, lateness, ttl, maxr, min_excess = cfg[1], cfg[2], cfg[3], cfg[4], cfg[5]
local share, min_early, min_left, min_fills = cfg[6], cfg[7], cfg[8], cfg[9]
local evs = cmsgpack.unpack(ARGV[5])
local floor = math.floor
local decode = cjson.decode
local sub = string.sub
local out = {}
-- stored text with an entry's text appended
local function append(raw, entry) return sub(raw, 1, -2) .. ',' .. sub(entry, 2) end
-- fills from their text (a fractional time is stored exactly, as text) and where the last one starts
local function load(text)
  local F = decode(text)
  local p, s, n = 1, 1, #F
  while p <= n do
    if type(F[p]) ~= 'number' then F[p] = tonumber(F[p]) end
    s = p
    p = p + 4 + 2 * F[p + 3]
  end
  return F, s
end
-- F: a card's fills with the event's entry last, from s. Drops the entry when its event_id is known, else
-- moves it to its place in (t, event_id) order and drops the fills no event within lateness of the newest one
-- can look back to (an event too late to count is not kept). Returns the fills and 0 (known), 1 (kept last,
-- nothing pruned: the stored text with the entry appended is the new value) or 2 (re-encode).
local function add(F, s)
  local nF = #F
  local t, eid = F[s], F[s + 1]
  local pos, newest = nil, t
  local p = 1
  while p < s do
    local pt, pe = F[p], F[p + 1]
    if pe == eid then
      for q = nF, s, -1 do F[q] = nil end
      return F, 0
    end
    if not pos and (pt > t or (pt == t and pe > eid)) then pos = p end
    if pt > newest then newest = pt end
    p = p + 4 + 2 * F[p + 3]
  end
  local cut = newest - W - lateness
  if not pos and F[1] >= cut then return F, 1 end
  local G = {}
  local function entry() for q = s, nF do G[#G + 1] = F[q] end end
  local keep = t >= cut
  p = 1
  while p < s do
    local nxt = p + 4 + 2 * F[p + 3]
    if p == pos and keep then entry() end
    if F[p] >= cut then
      for q = p, nxt - 1 do G[#G + 1] = F[q] end
    end
    p = nxt
  end
  if keep and not pos then entry() end
  return G, 2
end
-- event idx (time t, id eid, ingredients ings) of the card of key, over the card's fills F: fire and record
local function check(idx, key, F, t, eid, ings)
  if not (#F > 0 and #F > 4 + 2 * F[4]) then return end   -- one fill: no pattern
  local nl = #ings
  -- fills of each of this event's ingredients in [t - W, t], up to and including this event, by (time, event id)
  local want = {}
  for j = 1, nl do want[ings[j]] = {} end
  local lo = t - W
  local p = 1
  while p <= #F do
    local ft = F[p]
    if ft > t then break end
    local n = F[p + 3]
    if ft >= lo then
      for q = p + 4, p + 2 + 2 * n, 2 do
        local lst = want[F[q]]
        if lst then lst[#lst + 1] = {ft, F[p + 1], F[q + 1], F[p + 2]} end
      end
      if F[p + 1] == eid then break end
    end
    p = p + 4 + 2 * n
  end
  local fired = {}
  local evid = {}
  for j = 1, nl do
    local lst = want[ings[j]]
    local n = #lst
    if n >= 2 then
      local prior = 0
      local early = 0
      local insts = {}
      local ninst = 0
      for m = 1, n do
        if m < n then prior = prior + lst[m][3] end
        if m > 1 then
          local gap = (lst[m][1] - lst[m - 1][1]) / 86400
          if gap < share * lst[m - 1][3] and lst[m - 1][3] - gap >= min_left then early = early + 1 end
        end
        if not insts[lst[m][4]] then insts[lst[m][4]] = true; ninst = ninst + 1 end
      end
      local elapsed = (t - lst[1][1]) / 86400
      local covered = elapsed
      if covered < 1 then covered = 1 end
      local excess = prior - elapsed
      local by_supply = (n >= min_fills) and (prior > maxr * covered) and (excess >= min_excess)
      local by_early = early >= min_early
      if by_supply or by_early then
        fired[#fired + 1] = {j, n, prior, tostring(t - lst[1][1]), lst[n][3], early, ninst,
                             by_supply and 1 or 0, by_early and 1 or 0}
        for m = 1, n do evid[#evid + 1] = lst[m][1]; evid[#evid + 1] = lst[m][2] end
      end
    end
  end
  if #fired > 0 then
    local id = sub(key, #cp + 1)
    local ek, vk = prefix .. ':' .. id .. ':ep', prefix .. ':' .. id .. ':ev'
    local start = episode(ek, vk, t, W)
    redis.call('ZADD', vk, unpack(evid))
    redis.call('EXPIRE', ek, ttl)
    redis.call('EXPIRE', vk, ttl)
    out[#out + 1] = {idx, tostring(start), redis.call('ZRANGE', vk, 0, -1, 'WITHSCORES'), fired}
  end
end
-- the event's time, id and ingredients: its entry, from s in F
local function event(F, s)
  local ings = {}
  for j = 1, F[s + 3] do ings[j] = F[s + 2 + 2 * j] end
  return F[s], F[s + 1], ings
end
-- cards with several events in the batch: key -> fills; -> the field's current text (false: re-encode);
-- the ones to write, in order
local state, raws, dirty, nd = {}, {}, {}, 0
for r = 1, #evs, 4 do
  local idx, more, key, entry = evs[r], evs[r + 1], evs[r + 2], evs[r + 3]
  local F = more == 1 and state[key]
  if F then   -- a later event of a card read in this batch
    local E, _ = load(entry)
    local s = #F + 1
    for q = 1, #E do F[s + q - 1] = E[q] end
    local t, eid, ings = event(F, s)
    local how
    F, how = add(F, s)
    state[key] = F
    if how > 0 then
      local raw = raws[key]
      raws[key] = how == 1 and raw and append(raw, entry)
      if not dirty[key] then dirty[key] = true; nd = nd + 1; dirty[nd] = key end
    end
    check(idx, key, F, t, eid, ings)
  elseif redis.call('HSETNX', key, field, entry) == 1 then
    -- the card's first fill in reach: stored as sent; one fill is no pattern
    if more == 1 then state[key] = load(entry); raws[key] = entry end
  else
    local raw = redis.call('HGET', key, field)
    local text = entry
    if #raw > 2 then text = append(raw, entry) end   -- (an empty array never stays stored)
    local F, s = load(text)
    local t, eid, ings = event(F, s)
    local how
    F, how = add(F, s)
    check(idx, key, F, t, eid, ings)
    if more == 1 then
      state[key] = F
      if how == 0 then raws[key] = raw elseif how == 1 then raws[key] = text else raws[key] = false end
      if how > 0 then dirty[key] = true; nd = nd + 1; dirty[nd] = key end
    elseif how == 1 then
      redis.call('HSET', key, field, text)
    elseif how == 2 then
      state[key] = F; raws[key] = false; nd = nd + 1; dirty[nd] = key
    end
  end
end
for k = 1, nd do
  local key = dirty[k]
  local raw = raws[key]
  if raw then
    redis.call('HSET', key, field, raw)
  else
    local F = state[key]
    local p = 1
    while p <= #F do
      local x = F[p]
      if x ~= floor(x) or x >= 1e14 or x <= -1e14 then F[p] = string.format('%.17g', x) end
      p = p + 4 + 2 * F[p + 3]
    end
    if #F > 0 then redis.call('HSET', key, field, cjson.encode(F))
    else redis.call('HDEL', key, field) end
  end
end
return out
"""


def _fmt_days(d: float) -> str:
    """Days with one decimal below 10, whole days above: ``2.5`` / ``31``."""
    return f"{d:.1f}".rstrip("0").rstrip(".") if d < 10 else f"{d:.0f}"


class Overdispensing(Detector):
    """Days of supply dispensed vs days elapsed, per card and active ingredient (see module docstring)."""

    rule = "overdispensing"
    subject_type = "card"
    scripts = (LUA,)
    card_hash = "c"

    def __init__(self, window_s: int = 2592000, *, ingredient_prefix_len: int = 10, max_supply_ratio: float = 4.0,
                 min_excess_days: float = 30, min_fills: int = 3, early_refill_share: float = 0.5,
                 early_refill_min_left_days: float = 7, min_early_refills: int = 2,
                 resale_prone_severity_step: int = 1,
                 resale_prone: DrugList = EMPTY, lateness_s: int = 3600, lang: str = "zh",
                 version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        r = self.rule
        check_positive(r, "window_s", window_s, integer=True)
        if isinstance(ingredient_prefix_len, bool) or not isinstance(ingredient_prefix_len, int) \
                or ingredient_prefix_len < 0:
            raise ValueError(f"{r}: ingredient_prefix_len must be a non-negative integer (0 = whole code), "
                             f"got {ingredient_prefix_len!r}")
        check_positive(r, "max_supply_ratio", max_supply_ratio)
        if max_supply_ratio < 1:
            raise ValueError(f"{r}: max_supply_ratio must be >= 1 (supply beyond the days elapsed), "
                             f"got {max_supply_ratio!r}")
        check_positive(r, "min_excess_days", min_excess_days)
        check_positive(r, "min_fills", min_fills, integer=True)
        if min_fills < 2:
            raise ValueError(f"{r}: min_fills must be >= 2 (a first fill and a refill), got {min_fills}")
        check_positive(r, "early_refill_share", early_refill_share)
        if early_refill_share >= 1:
            raise ValueError(f"{r}: early_refill_share must be below 1, got {early_refill_share!r}")
        if isinstance(early_refill_min_left_days, bool) or not isinstance(early_refill_min_left_days, (int, float)) \
                or early_refill_min_left_days < 0:
            raise ValueError(f"{r}: early_refill_min_left_days must be a non-negative number, "
                             f"got {early_refill_min_left_days!r}")
        check_positive(r, "min_early_refills", min_early_refills, integer=True)
        if isinstance(resale_prone_severity_step, bool) or not isinstance(resale_prone_severity_step, int) \
                or not 0 <= resale_prone_severity_step <= 3:
            raise ValueError(f"{r}: resale_prone_severity_step must be an integer from 0 to 3, "
                             f"got {resale_prone_severity_step!r}")
        if not isinstance(resale_prone, DrugList):
            raise ValueError(f"{r}: resale_prone must be a DrugList, got {type(resale_prone).__name__}")
        self.window_s = window_s
        self.ingredient_prefix_len = ingredient_prefix_len
        self._ingredients = Memo(self._ingredient)   # drug code -> ingredient key ("" for a placeholder code)
        self.max_supply_ratio = float(max_supply_ratio)
        self.min_excess_days = min_excess_days
        self.early_refill_share = float(early_refill_share)
        self.min_early_refills = min_early_refills
        self.early_refill_min_left_days = early_refill_min_left_days
        self.min_fills = min_fills
        self.resale_prone_severity_step = resale_prone_severity_step
        self.resale_prone = resale_prone
        self.card_ttl_s = window_s + lateness_s
        self._field = f"{self.rule}:{window_s},{ingredient_prefix_len}"
        self._sha = self.sha(LUA)

    def params(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "ingredient_prefix_len": self.ingredient_prefix_len,
                "max_supply_ratio": self.max_supply_ratio, "min_excess_days": self.min_excess_days,
                "min_fills": self.min_fills, "early_refill_share": self.early_refill_share,
                "early_refill_min_left_days": self.early_refill_min_left_days,
                "min_early_refills": self.min_early_refills,
                "resale_prone_severity_step": self.resale_prone_severity_step, "lateness_s": self.lateness_s}

    # -- lines --------------------------------------------------------------------------
    def _lines(self, ev: Settlement) -> list[tuple[str, int, str, str, bool]]:
        """Take-home drug lines of one event, summed per ingredient: (ingredient, days, code, name, resale)."""
        if ev.visit_type == "inpatient" or is_placeholder(ev.card_id):
            return []
        agg: dict[str, list[Any]] = {}
        ingredients = self._ingredients
        for it in ev.items:
            if it.category != "drug" or not it.days_supply:
                continue
            ing = ingredients[it.code]
            if not ing:   # a placeholder code
                continue
            resale = self.resale_prone.matches(it.code, it.name)
            cur = agg.get(ing)
            if cur is None:
                agg[ing] = [it.days_supply, resale, it.code, it.name or it.code]
            else:
                cur[0] += it.days_supply
                cur[1] = cur[1] or resale
        return [(ing, d, code, name, rs) for ing, (d, rs, code, name) in agg.items()]

    def _ingredient(self, code: str) -> str:
        """The ingredient key of a drug code, '' for a placeholder code (memoised in ``_ingredients``: drug codes recur)."""
        return "" if is_placeholder(code) else ingredient_key(code.strip().upper(), self.ingredient_prefix_len)

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        # flat: index, more (the card has other events in the batch), card key, entry text, per event with lines
        rows: list[Any] = []
        cp = ns.card_prefix(self.card_hash)
        dumps = orjson.dumps
        seen: dict[str, int] = {}   # card key -> position of its first row's "more"
        for i, ev in enumerate(events):
            lines = self._lines(ev)
            if lines:
                ts = ev.ts
                t: Any = int(ts)
                if t != ts or not -1e14 < ts < 1e14:  # stored exactly, as text (cjson keeps 14 digits)
                    t = f"{ts:.17g}"
                entry = [t, ev.event_id, ev.institution_id, len(lines)]
                for x in lines:
                    entry += (x[0], x[1])
                key = cp + ev.card_id
                first = seen.get(key)
                if first is None:
                    seen[key] = len(rows) + 1
                    rows += (i, 0, key, dumps(entry).decode())
                else:
                    rows[first] = 1
                    rows += (i, 1, key, dumps(entry).decode())
        if not rows:
            return 0
        cfg = [self.window_s, self.lateness_s, self.window_s + self.lateness_s, self.max_supply_ratio,
               self.min_excess_days, self.early_refill_share, self.min_early_refills,
               self.early_refill_min_left_days, self.min_fills]
        pipe.evalsha(self._sha, 0, self.key(ns, self.window_s), cp, self._field, orjson.dumps(cfg), _pack(rows))
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not replies:
            return []
        out: dict[str, Alert] = {}
        for idx, start, flat, fired in replies[0]:
            ev = events[int(idx)]
            lines = self._lines(ev)
            ids = [x.decode() if isinstance(x, bytes) else x for x in flat[0::2]]
            times = [float(x) for x in flat[1::2]]
            best = None
            for f in fired:
                j, n, prior, elapsed_s, last_days, early, ninst, by_supply, by_early = (
                    int(f[0]), int(f[1]), int(f[2]), float(f[3]), int(f[4]), int(f[5]), int(f[6]), int(f[7]), int(f[8]))
                ing, _, code, name, resale = lines[j - 1]
                maxr = self.max_supply_ratio
                elapsed = elapsed_s / 86400
                ratio = prior / max(elapsed, 1.0)
                excess = prior - elapsed
                score = 0.0
                if by_supply:
                    score = min(ratio / maxr, excess / self.min_excess_days)
                if by_early:
                    score = max(score, early / self.min_early_refills)
                cand = dict(ingredient=ing, code=code, name=name, resale_prone=resale, fills=n, prior_days=prior,
                            supply_days=prior + last_days, elapsed_days=round(elapsed, 2), supply_ratio=round(ratio, 2),
                            excess_days=round(excess, 1), early_refills=early, institutions=ninst,
                            criteria=[c for c, on in (("supply_ratio", by_supply), ("early_refill", by_early)) if on],
                            max_supply_ratio=maxr, score=round(score, 4))
                if best is None or cand["score"] > best["score"]:
                    best = cand
            a = self._alert(ns, ev.card_id, float(start), best, ids, times)
            out[a.alert_id] = a
        return list(out.values())

    def _alert(self, ns: Namespace, card: str, start: float, m: dict[str, Any], ids: list[str],
               times: list[float]) -> Alert:
        ws = self.window_s
        sev = severity_for(m["score"])
        if m["resale_prone"] and self.resale_prone_severity_step:
            sev = SEVERITIES[min(len(SEVERITIES) - 1, SEVERITIES.index(sev) + self.resale_prone_severity_step)]
        el = _fmt_days(m["elapsed_days"])
        zh = (f"卡 {card} 在 {window_label(ws, 'zh')}内于 {m['institutions']} 家机构 {m['fills']} 次配药 {m['name']} "
              f"共 {m['supply_days']} 天用量（首次配药后已过 {el} 天，本次前已配 {m['prior_days']} 天用量），"
              f"超量 {m['supply_ratio']:.1f} 倍")
        en = (f"Card {card} was dispensed {m['name']} {m['fills']} times at {m['institutions']} institution(s) within "
              f"{window_label(ws, 'en')}: {m['supply_days']} days of supply ({m['prior_days']} before the latest fill) "
              f"in {el} days elapsed, {m['supply_ratio']:.1f}x")
        if m["early_refills"]:
            zh += f"，其中 {m['early_refills']} 次在上次用量用完 {self.early_refill_share:.0%} 前提前配药"
            en += f"; {m['early_refills']} refill(s) before {self.early_refill_share:.0%} of the previous supply elapsed"
        if m["resale_prone"]:
            zh += "（易倒卖药品）"
            en += " (resale-prone drug)"
        metrics = {**m, "window_s": ws, "min_excess_days": self.min_excess_days, "min_fills": self.min_fills,
                   "early_refill_share": self.early_refill_share, "min_early_refills": self.min_early_refills}
        return Alert(
            alert_id=alert_id(ns.run_id, self.rule, "card", card, str(ws), repr(start)),
            rule=self.rule, rule_version=self.version, severity=sev, score=m["score"],
            subject_type="card", subject_id=card, member_ids=[card], window_start=iso(min(times)),
            window_end=iso(max(times)), evidence_event_ids=ids, run_id=ns.run_id,
            summary=zh if self.lang == "zh" else en, summary_en=en, detected_at=now_iso(), window_s=ws,
            metrics=metrics,
        )
