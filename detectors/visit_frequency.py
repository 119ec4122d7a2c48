"""``visit_frequency``: 就诊次数异常, the first of Shanghai's "two anomalies" (两个异常).

Inspectors review insured persons who see doctors far more often than anyone plausibly
needs: people collecting drugs to resell, cards lent out (出借医保卡), or institutions running
empty registrations (空挂号) on a card. The default sub-rules are the published outpatient
thresholds, each in calendar terms (local +08:00): >= 15 outpatient (门诊) visits or >= 20
outpatient+emergency (门急诊) visits in a calendar month; more than 4 visits a day on >= 3
days of a month; more than 3 institutions a day on >= 3 days of a month; >= 100 visits in a
calendar year. A *visit* is an outpatient or emergency settlement at a hospital or community
health centre; pharmacy purchases (购药, not 就诊) never count (``card_hopping`` and
``overdispensing`` watch those). Hospitals settle a visit's registration, tests and drugs
separately, so of one card's settlements at the same institution and department on the same
day, one with a registration line (挂号) is a visit of its own unless it is the same bill
again (same amount and lines: settled twice), and one without is part of that day's visit
there for the same primary diagnosis (a visit of its own if there is none). Visits whose primary diagnosis is a 门诊大病 (``special_dx_prefixes``: dialysis, cancer
treatment, transplant, severe mental illness …) are approved treatment and do not count
towards the absolute thresholds; they count in the peer comparison, where the card is judged
against its peers (same insured category, age band and diagnosis chapter, or all patients of
the same 门诊大病, see :mod:`detectors._peers`): it fires when the month's visits reach
``max(min_visits, factor x the peers' quantile)`` and the group has ``min_peer_size`` other
members, so a dialysis patient going three times a week is compared with dialysis patients.
One alert per card and calendar month (and one per card and year for yearly sub-rules);
later visits extend it (the evidence of a yearly alert is the current month's visits).

Each card's state is read once per batch and written back once, and each card-month the
batch touched is judged once, as of its last event in the batch, so a redelivered batch
returns the same alerts and writes nothing. A card's only settlement of a batch is sent with the state it
would leave on a card that has none, built in Python byte for byte as the script's cmsgpack writes it: for a
card's first visit (the common case) the script writes it with one ``HSETNX`` (no read, no decode or encode)
and judges it only when the configuration lets a first visit fire; a card that has a state takes the
script's path.

State (see :mod:`detectors._peers` for the calendar layout and how long buckets are kept):

* field ``visit_frequency:m,y`` of the card hash ``cw:{run}:h:{card}`` — years ``[end, o,
  em]`` and months ``[end, o, em, pv, evidence, visit keys, days, h, groups]``: ``o``/``em``
  outpatient/emergency visits counted for the thresholds, ``pv`` the peer value (visits with
  门诊大病 ones), evidence the month's ``[event_id, time, ...]`` (a redelivered event is a
  no-op), visit keys the sorted 48-bit digests (:func:`visit_key`) of the bills and diagnoses
  seen per day and place and of the institutions visited per day, days ``[day, visits,
  institutions, ...]`` (the qualifying days of a day sub-rule are counted from them), ``h`` the
  peer value and group after each day;
* ``cw:{run}:visit_frequency:peer:{YYYY-MM}:{group}:{day}`` — daily deltas of the peer
  histograms (hashes, expiring at the end of the month + lateness).

>>> VisitFrequency(sub_rules=[{"name": "outpatient_month", "window": "month", "min_visits": 15}],
...                peers={"min_visits": 8})
VisitFrequency(sub_rules=['outpatient_month'], special_dx_prefixes=[], peers=PeerSpec(floor=8, quantile=0.99, factor=2.0, min_peer_size=30))
>>> d = VisitFrequency(sub_rules=[{"name": "visits_year", "window": "year", "min_visits": 100}])
>>> d.card_hash, d.FIELD, d.card_ttl_s == 366 * 86400 + d.lateness_s
('h', 'visit_frequency:m,y', True)
>>> VisitFrequency(sub_rules=[{"name": "m", "window": "week", "min_visits": 15}])
Traceback (most recent call last):
...
ValueError: visit_frequency: sub_rules[0].window must be 'month' or 'year', got 'week'
"""

from __future__ import annotations

from binascii import b2a_base64
from hashlib import blake2b
from typing import Any, Sequence

import orjson
from msgspec.msgpack import encode as _pack

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors._peers import (LUA_LIB, REDELIVERY_S, CalBatch, Calendar, PeerSpec, cal_replies, cal_rows,
                              check_prefixes, dx_key, fresh_time, group_label, is_special, mp_str, peer_bound)
from detectors.base import Detector, Memo, Namespace, check_positive
from stream.events import Settlement, iso

LUA = LUA_LIB + r"""
-- ARGV[1] key prefix (cw:{run}:visit_frequency), ARGV[2] card hash prefix (cw:{run}:h:), ARGV[3] JSON {field,
-- lateness, keep (how long past its end, in the card's event time, a month or year is kept: lateness +
-- redelivery margin), subs: [[window m|y, mask (1 outpatient, 2 emergency), min]], days: [[kind v|i,
-- per_day_min, min_days]], peers: (see pk_config)}; the batch as MessagePack flat arrays: ARGV[4] months
-- [YYYY-MM, month end, year end, ...], ARGV[5] peer groups [base, diagnosis key, ...], ARGV[6] rows [idx, t,
-- event_id, card, day of month, month (index in months), o|e, special, bill key digest ('' without a
-- registration line), diagnosis key digest, institution key digest ('' when not needed), group (index in
-- groups), reference day of month, first state (false, or the card's state as cal_store would write it from
-- nothing: sent when the row is the batch's only event of the card), may fire (false when the row, as the
-- card's first event, cannot fire), order of the first state's visit keys (0 for fewer than two, else the
-- digits of their row offsets - 7 in the order they are written: checked against Lua's string order), ...].
-- The card's state is the field of its hash {card hash prefix}{card} (see the module docstring); peer
-- histograms are {prefix}:peer:…. Each card's state is read once per batch, updated in memory and written
-- back once; each card-month the batch touched is then judged once, as of its last event in the batch (so a
-- redelivered batch writes nothing and returns the same verdicts). Returns {idx, counts, peer|0, evidence}
-- per card-month over a threshold.
local P, cp, prefix, cfg, pc, months, groups, rows = cal_args()
local F, late, keep = cfg.field, cfg.lateness, cfg.keep
local subs, days = cfg.subs, cfg.days
local K, J = #subs, #days
local peers_on = pc.enabled
-- month {me, o, em, pv, evidence, visit keys, days {dom, visits, institutions, ...}, h, groups}; every field
-- it may get is in its constructor (see cal_event)
local function mdec(x)
  local gs = x[9]
  local n = #gs
  return {me = x[1], o = x[2], em = x[3], pv = x[4], ev = x[5], vk = x[6], d = x[7], h = x[8], gs = gs,
          gb = gs[n - 1] or false, gd = gs[n] or false, vnew = false, g = false, pb = false, set = false,
          li = false, lr = false, S = false, mo = false}
end
local function menc(m)
  if m.vnew then table.sort(m.vk) end
  return {m.me, m.o, m.em, m.pv, m.ev, m.vk or EMPTY, m.d or EMPTY, m.h or EMPTY, m.gs or EMPTY}
end
local function mnew(me)
  return {me = me, o = 0, em = 0, pv = 0, ev = false, vk = false, d = false, h = false, gs = false, gb = false,
          gd = false, vnew = false, g = false, pb = false, set = false, li = false, lr = false, S = false, mo = false}
end
-- add a visit key (kept sorted when written)
local function vk_add(m, k)
  local vk = m.vk
  if not vk then
    m.vk = {k}
    m.vnew = true
  elseif not cal_in(vk, k) then
    cal_put(vk, k)
    m.vnew = true
  end
end
-- are the first state's visit keys in Lua's order (that of table.sort in menc)? (see the rows above)
local function vk_ordered(r, code)
  if code == 0 then return true end
  local c = code % 10
  code = (code - c) / 10
  local b = code % 10
  local a = (code - b) / 10
  if not (rows[r + 7 + b] < rows[r + 7 + c]) then return false end
  return a == 0 or rows[r + 7 + a] < rows[r + 7 + b]
end
local B = cal_batch(cp, F, keep, mdec, mnew)
for r = 1, #rows, 16 do
  local fresh = rows[r + 13]
  if fresh and vk_ordered(r, rows[r + 15]) and cal_fresh(B, rows[r + 3], fresh) then   -- the card's first event
    local mo = months[rows[r + 5]]
    if peers_on then
      local gi = 2 * rows[r + 11]
      cal_fresh_peer(prefix, pc, mo, groups[gi - 1], groups[gi], rows[r + 4], rows[r + 1], 1)
    end
    if rows[r + 14] then cal_fresh_judge(B, fresh, mo, rows[r], rows[r + 12]) end
  else
    local S, m = cal_event(B, rows[r + 3], months[rows[r + 5]], rows[r], rows[r + 12], rows[r + 2], rows[r + 1])
    if m then   -- else: late (its month no longer kept) or counted before
      -- a settlement with a registration (挂号) is a visit unless the same bill was settled there that day
      -- before; one without (tests or drugs paid separately) is part of that day's visit there for the
      -- same diagnosis, if there is one
      local kb, kp = rows[r + 8], rows[r + 9]
      local newvisit
      if kb ~= '' then
        newvisit = not cal_in(m.vk, kb)
        if newvisit then vk_add(m, kb); vk_add(m, kp) end
      else
        newvisit = not cal_in(m.vk, kp)
        if newvisit then vk_add(m, kp) end
      end
      if newvisit then
        local pv = m.pv + 1
        m.pv = pv
        local dom = rows[r + 4]
        if not rows[r + 7] then
          local y = cal_year(S, m.mo.ye, 2)
          if rows[r + 6] == 'o' then m.o = m.o + 1; y[2] = y[2] + 1 else m.em = m.em + 1; y[3] = y[3] + 1 end
          if J > 0 then
            local d = m.d
            local i
            if not d then
              d = {dom, 0, 0}
              m.d = d
              i = 1
            else
              i = cal_tri(d, dom)
            end
            d[i + 1] = d[i + 1] + 1
            local ki = rows[r + 10]
            if not cal_in(m.vk, ki) then
              vk_add(m, ki)
              d[i + 2] = d[i + 2] + 1
            end
          end
        end
        if peers_on then
          local gi = 2 * rows[r + 11]
          cal_peer_move(prefix, pc, m, dom, rows[r + 1], groups[gi - 1], groups[gi], pv - 1, pv, pv)
        end
      end
    end
  end
end
local order = B.order
for _, S in pairs(B.dirty) do cal_store(S, F, keep, menc) end
pk_flush(pc, late)
local out = {}
local none = {0, 0, 0}
local counts = {}
for _, m in ipairs(order) do
  local y = cal_find_year(m.S, m.mo.ye) or none
  counts[1], counts[2], counts[3], counts[4], counts[5] = m.o, m.em, y[2], y[3], m.pv
  -- qualifying days per day sub-rule: days with at least per_day visits (v) or institutions (i)
  local d = m.d or EMPTY
  for j = 1, J do
    local n, off, per = 0, (days[j][1] == 'v') and 1 or 2, days[j][2]
    for i = 1, #d, 3 do
      if d[i + off] >= per then n = n + 1 end
    end
    counts[5 + j] = n
  end
  local fired = false
  for j = 1, K do
    local s = subs[j]
    local off = (s[1] == 'm') and 0 or 2
    local n = 0
    if s[2] ~= 2 then n = n + counts[off + 1] end
    if s[2] ~= 1 then n = n + counts[off + 2] end
    if n >= s[3] then fired = true end
  end
  for j = 1, J do
    if counts[5 + j] >= days[j][3] then fired = true end
  end
  local peer = 0
  if peers_on and m.gb and m.pv >= pc.floor then
    local p = pk_peers(prefix, m.mo.ym, m.lr, pc, cal_own(m, m.lr, 1), m.gb, m.gd)
    if p then
      peer = {p[1], p[2], p[3], m.gb, m.gd}
      if pk_fires(pc, m.pv, p) then fired = true end
    end
  end
  if fired then
    local c = {}
    for i = 1, 5 + J do c[i] = counts[i] end
    out[#out + 1] = {m.li, c, peer, pk_evidence(m.ev)}
  end
end
return out
"""

VISIT_TYPES = ("outpatient", "emergency")
_TYPES_ZH = {("outpatient",): "门诊", ("emergency",): "急诊", ("emergency", "outpatient"): "门急诊"}
_TYPES_EN = {("outpatient",): "outpatient", ("emergency",): "emergency",
             ("emergency", "outpatient"): "outpatient and emergency"}


def _bill_key(ev: Settlement) -> str:
    """What makes two settlements of one card, institution, department and day the same visit.

    A bill with a registration line is a visit of its own, unless it is the same bill again
    (same amount and lines: settled twice); a bill without one is part of that day's visit there
    for the same primary diagnosis.
    """
    for it in ev.items:
        if it.category == "registration":   # the first registration line
            return f"{ev.total_amount:.2f}|{len(ev.items)}|{it.code}"
    return ""


def visit_key(key: str) -> str:
    """48-bit digest (8 characters) of a visit key, as the month state keeps it: a month holds a few
    dozen keys, so two distinct keys of one card-month collide with odds of about 1e-11.

    >>> visit_key("3:H310104001|全科|54.00|2|R0001")
    'iQ7uszed'
    """
    return b2a_base64(blake2b(key.encode("utf-8", "surrogatepass"), digest_size=6).digest(),
                      newline=False).translate(_URLSAFE).decode()


#: standard base64 to its URL-safe alphabet (``base64.urlsafe_b64encode`` without its call overhead)
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


class VisitFrequency(Detector):
    """Visits per card per calendar month/year, daily patterns and peers (see module docstring)."""

    rule = "visit_frequency"
    subject_type = "card"
    scripts = (LUA,)
    card_hash = "h"
    #: the field of the card hash holding the card's month and year states
    FIELD = "visit_frequency:m,y"

    def __init__(self, sub_rules: Sequence[dict[str, Any]], *, special_dx_prefixes: Sequence[str] = (),
                 peers: dict[str, Any] | None = None, max_evidence: int = 200, lateness_s: int = 3600,
                 lang: str = "zh", version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        owner = self.rule
        if not isinstance(sub_rules, (list, tuple)) or not sub_rules:
            raise ValueError(f"{owner}: sub_rules must be a non-empty list, got {sub_rules!r}")
        counts: list[dict[str, Any]] = []
        days: list[dict[str, Any]] = []
        names: list[str] = []
        for i, s in enumerate(sub_rules):
            where = f"{owner}: sub_rules[{i}]"
            if not isinstance(s, dict):
                raise ValueError(f"{where} must be a mapping, got {s!r}")
            unknown = set(s) - {"name", "window", "min_visits", "visit_types", "min_days", "min_visits_per_day",
                                "min_institutions_per_day"}
            if unknown:
                raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}")
            name = s.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
            names.append(name)
            window = s.get("window")
            if window not in ("month", "year"):
                raise ValueError(f"{where}.window must be 'month' or 'year', got {window!r}")
            if ("min_visits" in s) == ("min_days" in s):
                raise ValueError(f"{where} must have exactly one of min_visits, min_days")
            if "min_visits" in s:
                if set(s) & {"min_visits_per_day", "min_institutions_per_day"}:
                    raise ValueError(f"{where}: min_visits_per_day / min_institutions_per_day go with min_days")
                check_positive(owner, f"sub_rules[{i}].min_visits", s["min_visits"], integer=True)
                vt = s.get("visit_types", ["outpatient"])
                if (not isinstance(vt, (list, tuple)) or not vt or not all(v in VISIT_TYPES for v in vt)
                        or len(set(vt)) != len(vt)):
                    raise ValueError(f"{where}.visit_types must be a non-empty list of 'outpatient' and/or "
                                     f"'emergency', got {vt!r}")
                counts.append({"name": name, "window": window, "min_visits": s["min_visits"],
                               "visit_types": sorted(vt)})
            else:
                if "visit_types" in s:
                    raise ValueError(f"{where}: day sub-rules count outpatient and emergency visits; "
                                     f"visit_types is not allowed")
                if window != "month":
                    raise ValueError(f"{where}.window must be 'month' for a min_days sub-rule, got {window!r}")
                check_positive(owner, f"sub_rules[{i}].min_days", s["min_days"], integer=True)
                per = [f for f in ("min_visits_per_day", "min_institutions_per_day") if f in s]
                if len(per) != 1:
                    raise ValueError(f"{where} must have exactly one of min_visits_per_day, min_institutions_per_day")
                check_positive(owner, f"sub_rules[{i}].{per[0]}", s[per[0]], integer=True)
                if s["min_days"] > 31:
                    raise ValueError(f"{where}.min_days must be <= 31, got {s['min_days']}")
                days.append({"name": name, "window": "month", "min_days": s["min_days"],
                             "kind": "visits" if per[0] == "min_visits_per_day" else "institutions",
                             "per_day": s[per[0]]})
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}: sub_rules must have distinct names, got {names}")
        self.sub_rules = [dict(s) for s in sub_rules]
        self.counts = counts
        self.days = days
        self.special = check_prefixes(owner, "special_dx_prefixes", special_dx_prefixes)
        self.peers = PeerSpec(owner, peers if peers is not None else {"enabled": False, "min_visits": 8},
                              floor_field="min_visits", integer=True)
        check_positive(owner, "max_evidence", max_evidence, integer=True)
        self.max_evidence = max_evidence
        self._sha = self.sha(LUA)
        self._dx_keys = Memo(lambda dx: dx_key(dx, self.special))   # primary diagnosis -> dx_key
        self._bases = Memo(lambda k: self.peers.base_of(*k))   # (category, birth year, year) -> peer base
        #: digests of the visit keys of a place and diagnosis, or of a day's institution: they recur from card to
        #: card (a bill's key, with its amount, seldom does: not memoised)
        self._visit_keys = Memo(visit_key)
        #: the year state is needed until the year's end + lateness: at most 366 days after an event
        self.card_ttl_s = 366 * 86400 + lateness_s
        cfg = {"field": self.FIELD, "lateness": lateness_s, "keep": lateness_s + REDELIVERY_S,
               "subs": [["m" if c["window"] == "month" else "y",
                         (1 if "outpatient" in c["visit_types"] else 0) + (2 if "emergency" in c["visit_types"] else 0),
                         c["min_visits"]] for c in counts],
               "days": [["v" if d["kind"] == "visits" else "i", d["per_day"], d["min_days"]] for d in days],
               "peers": self.peers.config()}
        self._cfg = orjson.dumps(cfg)
        #: can a card's first visit fire? (else the script does not judge it)
        self._first_may_fire = (any(c["min_visits"] <= 1 for c in counts)
                                or any(d["per_day"] <= 1 and d["min_days"] <= 1 for d in days)
                                or (self.peers.enabled and self.peers.floor <= 1))

    def params(self) -> dict[str, Any]:
        return {"sub_rules": [s["name"] for s in self.sub_rules], "special_dx_prefixes": list(self.special),
                "peers": self.peers}

    # -- Redis ---------------------------------------------------------------------------
    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        batch = CalBatch()
        add, group_of = batch.rows.extend, batch.group
        per_day = bool(self.days)
        peers_on, may_fire = self.peers.enabled, self._first_may_fire
        dx_keys, bases, vkeys = self._dx_keys, self._bases, self._visit_keys
        evs = [(i, ev) for i, ev in enumerate(events)
               if ev.visit_type in VISIT_TYPES and ev.institution_type != "pharmacy"]
        for i, ev, t, once, dom, mi, month_end, year_end, year_no, ref_dom in cal_rows(batch, evs, self.lateness_s):
            pdx = ev.diagnoses[0].strip().upper() if ev.diagnoses else "-"
            dx = dx_keys[pdx]
            sp = dx[0] == "S"
            g = (bases[ev.insured_category, ev.birth_year, year_no], dx)
            gi = group_of(g)
            inst = ev.institution_id
            place = f"{dom}:{inst}|{ev.department or '-'}"
            bill = _bill_key(ev)
            card = ev.card_id
            kb = visit_key(f"{place}|{bill}") if bill else ""
            kp = vkeys[f"{place}#{pdx}"]
            ki = vkeys[f"{dom}|{inst}"] if per_day and not sp else ""
            vo = ev.visit_type == "outpatient"
            fresh: Any = False
            order = 0
            if once and (type(t) is int or fresh_time(t)):
                # the card's state as cal_store writes it for this visit alone (see cal_fresh in the script)
                vk = {kb: 1, kp: 2} if kb else {kp: 2}
                if sp:
                    years: tuple = ()
                    o = em = 0
                    days: tuple = ()
                else:
                    o, em = (1, 0) if vo else (0, 1)
                    years = ((year_end, o, em),)
                    days = ()
                    if per_day:
                        days = (dom, 1, 0 if ki in vk else 1)
                        vk.setdefault(ki, 3)
                keys = sorted(vk)
                if len(keys) > 1:
                    for k in keys:
                        order = order * 10 + vk[k]
                h, gs = ((dom, 1, 1), g) if peers_on else ((), ())
                fresh = mp_str(_pack((years, ((month_end, o, em, 1, (ev.event_id, t), keys, days, h, gs),))))
            add((i, t, ev.event_id, card, dom, mi, "o" if vo else "e", sp, kb, kp, ki, gi, ref_dom, fresh,
                 fresh is not False and may_fire, order))
        return batch.queue(pipe, self._sha, self.key(ns), ns.card_prefix(self.card_hash), self._cfg)

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        out: dict[str, Alert] = {}
        for idx, counts, pinfo, ids, times in cal_replies(replies, self.max_evidence):
            for a in self._alerts(ns, events[idx], counts, pinfo, ids, times):
                out[a.alert_id] = a
        return list(out.values())

    # -- alerts --------------------------------------------------------------------------
    def _alerts(self, ns: Namespace, ev: Settlement, counts: list[int], peer: tuple | None, ids: list[str],
                times: list[float]) -> list[Alert]:
        o, e, yo, ye, pv = counts[:5]
        dd = counts[5:]
        cal = Calendar(ev.ts, self.lateness_s)
        fired: dict[str, list[tuple[str, float, str, str]]] = {"month": [], "year": []}
        metrics: dict[str, dict[str, Any]] = {"month": {}, "year": {}}
        for c in self.counts:
            mo, em = (o, e) if c["window"] == "month" else (yo, ye)
            n = (mo if "outpatient" in c["visit_types"] else 0) + (em if "emergency" in c["visit_types"] else 0)
            metrics[c["window"]][c["name"]] = n
            if n >= c["min_visits"]:
                key = tuple(c["visit_types"])
                when_zh = f"{cal.month} " if c["window"] == "month" else f"{cal.year} 年"
                when_en = f"in {cal.month}" if c["window"] == "month" else f"in {cal.year}"
                zh = f"{when_zh}{_TYPES_ZH[key]}就诊 {n} 次（阈值 {c['min_visits']} 次）"
                en = f"{n} {_TYPES_EN[key]} visits {when_en} (threshold {c['min_visits']})"
                fired[c["window"]].append((c["name"], n / c["min_visits"], zh, en))
        for d, n in zip(self.days, dd):
            metrics["month"][d["name"]] = n
            if n >= d["min_days"]:
                if d["kind"] == "visits":
                    zh = f"{n} 天单日就诊超过 {d['per_day'] - 1} 次（阈值 {d['min_days']} 天）"
                    en = f"more than {d['per_day'] - 1} visits a day on {n} days (threshold {d['min_days']} days)"
                else:
                    zh = f"{n} 天单日就诊超过 {d['per_day'] - 1} 家机构（阈值 {d['min_days']} 天）"
                    en = f"more than {d['per_day'] - 1} institutions a day on {n} days (threshold {d['min_days']} days)"
                fired["month"].append((d["name"], n / d["min_days"], zh, en))
        metrics["month"]["visits_incl_major_disease"] = pv
        if peer is not None:
            members, med, qv, gbase, gdx = peer
            bound = peer_bound(self.peers, qv)
            qn = round(self.peers.quantile * 100)
            metrics["month"].update({"peer_group": group_label("*|*" if is_special(gdx) else gbase, gdx, "en"),
                                     "peers": members, "peer_median_visits": med, f"peer_p{qn}_visits": qv,
                                     "peer_bound_visits": bound})
            if pv >= bound - 1e-9:
                base = "*|*" if is_special(gdx) else gbase
                glz, gle = group_label(base, gdx, "zh"), group_label(base, gdx, "en")
                zh = (f"本月就诊 {pv} 次，同类参保人（{glz}，{members} 人）第 {qn} 百分位 {_num(qv)} 次、"
                      f"中位数 {_num(med)} 次，界限 {_num(bound)} 次")
                en = (f"{pv} visits this month against peers ({gle}, {members} cards): p{qn} {_num(qv)}, "
                      f"median {_num(med)}, bound {_num(bound)}")
                fired["month"].append(("peers", pv / bound, zh, en))
        alerts = []
        for window, items in fired.items():
            if not items:
                continue
            bucket, b_start, b_end = cal.bounds(window)
            ratio = max(r for _, r, _, _ in items)
            zh = f"卡 {ev.card_id} " + "；".join(z for _, _, z, _ in items)
            en = f"Card {ev.card_id}: " + "; ".join(x for _, _, _, x in items)
            m = {"bucket": bucket, "window": window, "fired": [n for n, _, _, _ in items], **metrics[window]}
            alerts.append(Alert(
                alert_id=alert_id(ns.run_id, self.rule, "card", ev.card_id, window, bucket),
                rule=self.rule, rule_version=self.version, severity=severity_for(ratio), score=round(ratio, 4),
                subject_type="card", subject_id=ev.card_id, window_start=iso(min(times)), window_end=iso(max(times)),
                evidence_event_ids=ids, run_id=ns.run_id, summary=zh if self.lang == "zh" else en, summary_en=en,
                detected_at=now_iso(), window_s=b_end - b_start,
                metrics=m,
            ))
        return alerts

