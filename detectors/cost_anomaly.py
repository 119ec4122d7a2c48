"""``cost_anomaly``: 就诊费用异常, the second of Shanghai's "two anomalies" (两个异常).

Inspectors review insured persons whose outpatient spending is far beyond need: expensive
drugs bought to resell (贩卖医保药品), a lent card paying for someone else's treatment,
institutions billing expensive items that were never given. The default sub-rules are the
published thresholds in calendar terms (local +08:00): outpatient cost >= ¥5,000 in a calendar
month or >= ¥20,000 in a calendar year. *Outpatient cost* is ``total_amount`` (fund and self
paid together, as the review counts it; ``fund_paid`` is reported beside it) of settlements
whose ``visit_type`` is in ``visit_types`` — by default outpatient, emergency and pharmacy
purchases (定点药店购药 is outpatient spending paid by the same card), never inpatient bills.
Settlements whose primary diagnosis is a 门诊大病 (``special_dx_prefixes``: dialysis, cancer
treatment, transplant …) are approved heavy treatment: they do not count towards the
absolute thresholds but do count in the peer comparison, where the card is judged against
its peers (same insured category, age band and diagnosis chapter, or all patients of the same
门诊大病, see :mod:`detectors._peers`) and fires when its month's cost reaches
``max(min_amount_cny, factor x the peers' quantile)`` with at least ``min_peer_size`` other
members — a dialysis patient's ¥9,000 a month is compared with dialysis patients, and chronic
patients' refills with theirs (慢特病 patients are legitimately heavy). One alert per card and
calendar month (and per card and year); later settlements extend it (the evidence of a
yearly alert is the current month's settlements).

Each card's state is read once per batch and written back once, and each card-month the
batch touched is judged once, as of its last event in the batch, so a redelivered batch
returns the same alerts and writes nothing. A card's only settlement of a batch is sent with the state it
would leave on a card that has none, built in Python byte for byte as the script's cmsgpack writes it: for a
card's first settlement (the common case) the script writes it with one ``HSETNX`` (no read, no decode or
encode) and judges it only when Python says it may fire; a card that has a state takes the script's path.

State (see :mod:`detectors._peers` for the calendar layout and how long buckets are kept):

* field ``cost_anomaly:m,y`` of the card hash ``cw:{run}:h:{card}`` — years ``[end, a, f]`` and
  months ``[end, a, f, sa, evidence, h, groups]``: ``a``/``f`` cost and fund paid counted for
  the thresholds (fen), ``sa`` 门诊大病 cost (the peer value is ``a + sa``), evidence the month's
  ``[event_id, time, ...]`` (amounts are summed only the first time an event id is seen, so a
  redelivered event changes nothing), ``h`` the peer value (fen) and group after each day;
* ``cw:{run}:cost_anomaly:peer:{YYYY-MM}:{group}:{day}`` — daily deltas of the peer histograms
  (hashes, expiring at the end of the month + lateness).

>>> CostAnomaly(sub_rules=[{"name": "month_5000", "window": "month", "min_amount_cny": 5000}],
...             peers={"min_amount_cny": 3000, "buckets": [100, 1000, 10000]})
CostAnomaly(sub_rules=['month_5000'], visit_types=['emergency', 'outpatient', 'pharmacy'], special_dx_prefixes=[], peers=PeerSpec(floor=3000, quantile=0.99, factor=2.0, min_peer_size=30))
>>> d = CostAnomaly(sub_rules=[{"name": "year_20000", "window": "year", "min_amount_cny": 20000}])
>>> d.card_hash, d.FIELD, d.card_ttl_s == 366 * 86400 + d.lateness_s
('h', 'cost_anomaly:m,y', True)
>>> CostAnomaly(sub_rules=[{"name": "m", "window": "month", "min_amount_cny": -1}])
Traceback (most recent call last):
...
ValueError: cost_anomaly: sub_rules[0].min_amount_cny must be a positive number, got -1
"""

from __future__ import annotations

from typing import Any, Sequence

import orjson
from msgspec.msgpack import encode as _pack

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors._peers import (LUA_LIB, REDELIVERY_S, CalBatch, Calendar, PeerSpec, cal_replies, cal_rows,
                              check_prefixes, dx_key, fresh_time, group_label, is_special, mp_str, peer_bound)
from detectors.base import Detector, Memo, Namespace, check_positive
from stream.events import Settlement, iso

LUA = LUA_LIB + r"""
-- ARGV[1] key prefix (cw:{run}:cost_anomaly), ARGV[2] card hash prefix (cw:{run}:h:), ARGV[3] JSON {field,
-- lateness, keep (how long past its end, in the card's event time, a month or year is kept: lateness +
-- redelivery margin), subs: [[window m|y, min fen]], peers: (see pk_config)}; the batch as MessagePack flat
-- arrays: ARGV[4] months [YYYY-MM, month end, year end, ...], ARGV[5] peer groups [base, diagnosis key, ...],
-- ARGV[6] rows [idx, t, event_id, card, day of month, month (index in months), amount fen, fund fen, special,
-- group (index in groups), reference day of month, first state (false, or the card's state as cal_store would
-- write it from nothing: sent when the row is the batch's only event of the card), may fire (false when the
-- row, as the card's first event, cannot fire), ...].
-- The card's state is the field of its hash {card hash prefix}{card} (see the module docstring); peer
-- histograms are {prefix}:peer:…. Each card's state is read once per batch, updated in memory and written
-- back once; each card-month the batch touched is then judged once, as of its last event in the batch (so a
-- redelivered batch writes nothing and returns the same verdicts). Returns {idx, sums, peer|0, evidence}
-- per card-month over a threshold.
local P, cp, prefix, cfg, pc, months, groups, rows = cal_args()
local F, late, keep = cfg.field, cfg.lateness, cfg.keep
local subs = cfg.subs
local K = #subs
local peers_on = pc.enabled
-- month {me, a, f, sa, evidence, h, groups}; every field it may get is in its constructor (see cal_event)
local function mdec(x)
  local gs = x[7]
  local n = #gs
  return {me = x[1], a = x[2], f = x[3], sa = x[4], ev = x[5], h = x[6], gs = gs, gb = gs[n - 1] or false,
          gd = gs[n] or false, g = false, pb = false, set = false, li = false, lr = false, S = false, mo = false}
end
local function menc(m) return {m.me, m.a, m.f, m.sa, m.ev, m.h or EMPTY, m.gs or EMPTY} end
local function mnew(me)
  return {me = me, a = 0, f = 0, sa = 0, ev = false, h = false, gs = false, gb = false, gd = false, g = false,
          pb = false, set = false, li = false, lr = false, S = false, mo = false}
end
local B = cal_batch(cp, F, keep, mdec, mnew)
for r = 1, #rows, 13 do
  local fresh = rows[r + 11]
  if fresh and cal_fresh(B, rows[r + 3], fresh) then   -- the card's first event: its state is written
    local mo = months[rows[r + 5]]
    if peers_on then
      local gi = 2 * rows[r + 9]
      cal_fresh_peer(prefix, pc, mo, groups[gi - 1], groups[gi], rows[r + 4], rows[r + 1], rows[r + 6] / 100)
    end
    if rows[r + 12] then cal_fresh_judge(B, fresh, mo, rows[r], rows[r + 10]) end
  else
    local S, m = cal_event(B, rows[r + 3], months[rows[r + 5]], rows[r], rows[r + 10], rows[r + 2], rows[r + 1])
    if m then   -- else: late (its month no longer kept) or counted before
      local amt = rows[r + 6]
      local pa = m.a + m.sa
      if not rows[r + 8] then
        local fund = rows[r + 7]
        m.a = m.a + amt
        m.f = m.f + fund
        local y = cal_year(S, m.mo.ye, 2)
        y[2] = y[2] + amt
        y[3] = y[3] + fund
      else
        m.sa = m.sa + amt
      end
      if peers_on then
        local gi = 2 * rows[r + 9]
        cal_peer_move(prefix, pc, m, rows[r + 4], rows[r + 1], groups[gi - 1], groups[gi], pa / 100,
                      (pa + amt) / 100, pa + amt)
      end
    end
  end
end
local order = B.order
for _, S in pairs(B.dirty) do cal_store(S, F, keep, menc) end
pk_flush(pc, late)
local out = {}
local none = {0, 0, 0}
for _, m in ipairs(order) do
  local y = cal_find_year(m.S, m.mo.ye) or none
  local pa = m.a + m.sa
  local fired = false
  for j = 1, K do
    local n = (subs[j][1] == 'm') and m.a or y[2]
    if n >= subs[j][2] then fired = true end
  end
  local peer = 0
  if peers_on and m.gb and pa / 100 >= pc.floor then
    local p = pk_peers(prefix, m.mo.ym, m.lr, pc, cal_own(m, m.lr, 100), m.gb, m.gd)
    if p then
      peer = {p[1], p[2], p[3], m.gb, m.gd}
      if pk_fires(pc, pa / 100, p) then fired = true end
    end
  end
  if fired then out[#out + 1] = {m.li, {m.a, m.f, y[2], y[3], pa, m.sa}, peer, pk_evidence(m.ev)} end
end
return out
"""

VISIT_TYPES = ("outpatient", "emergency", "pharmacy")


def _cny(fen: float) -> str:
    return f"¥{fen / 100:,.0f}"


class CostAnomaly(Detector):
    """Outpatient cost per card per calendar month/year, and peers (see module docstring)."""

    rule = "cost_anomaly"
    subject_type = "card"
    scripts = (LUA,)
    card_hash = "h"
    #: the field of the card hash holding the card's month and year states
    FIELD = "cost_anomaly:m,y"

    def __init__(self, sub_rules: Sequence[dict[str, Any]], *, visit_types: Sequence[str] = VISIT_TYPES,
                 special_dx_prefixes: Sequence[str] = (), peers: dict[str, Any] | None = None,
                 max_evidence: int = 200, lateness_s: int = 3600, lang: str = "zh", version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        owner = self.rule
        if not isinstance(sub_rules, (list, tuple)) or not sub_rules:
            raise ValueError(f"{owner}: sub_rules must be a non-empty list, got {sub_rules!r}")
        subs = []
        for i, s in enumerate(sub_rules):
            where = f"{owner}: sub_rules[{i}]"
            if not isinstance(s, dict):
                raise ValueError(f"{where} must be a mapping, got {s!r}")
            unknown = set(s) - {"name", "window", "min_amount_cny"}
            if unknown:
                raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}")
            name = s.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
            if s.get("window") not in ("month", "year"):
                raise ValueError(f"{where}.window must be 'month' or 'year', got {s.get('window')!r}")
            if "min_amount_cny" not in s:
                raise ValueError(f"{where}.min_amount_cny is required")
            check_positive(owner, f"sub_rules[{i}].min_amount_cny", s["min_amount_cny"])
            subs.append({"name": name, "window": s["window"], "min_amount_cny": s["min_amount_cny"]})
        names = [s["name"] for s in subs]
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}: sub_rules must have distinct names, got {names}")
        if (isinstance(visit_types, str) or not isinstance(visit_types, (list, tuple)) or not visit_types
                or not all(v in VISIT_TYPES for v in visit_types) or len(set(visit_types)) != len(visit_types)):
            raise ValueError(f"{owner}: visit_types must be a non-empty list of 'outpatient', 'emergency' and/or "
                             f"'pharmacy', got {visit_types!r}")
        self.sub_rules = subs
        self.visit_types = frozenset(visit_types)
        self.special = check_prefixes(owner, "special_dx_prefixes", special_dx_prefixes)
        self.peers = PeerSpec(owner, peers if peers is not None else {"enabled": False, "min_amount_cny": 3000},
                              floor_field="min_amount_cny", integer=False)
        check_positive(owner, "max_evidence", max_evidence, integer=True)
        self.max_evidence = max_evidence
        self._sha = self.sha(LUA)
        self._dx_keys = Memo(lambda dx: dx_key(dx, self.special))   # primary diagnosis -> dx_key
        self._bases = Memo(lambda k: self.peers.base_of(*k))   # (category, birth year, year) -> peer base
        #: the year state is needed until the year's end + lateness: at most 366 days after an event
        self.card_ttl_s = 366 * 86400 + lateness_s
        #: the least amount (fen) a sub-rule fires at: a card's first event below it (and the peer floor) is not
        #: judged in the script
        self._min_fen = min(int(round(s["min_amount_cny"] * 100)) for s in subs)
        self._cfg = orjson.dumps({
            "field": self.FIELD, "lateness": lateness_s, "keep": lateness_s + REDELIVERY_S, "peers": self.peers.config(),
            "subs": [["m" if s["window"] == "month" else "y", int(round(s["min_amount_cny"] * 100))] for s in subs]})

    def params(self) -> dict[str, Any]:
        return {"sub_rules": [s["name"] for s in self.sub_rules], "visit_types": sorted(self.visit_types),
                "special_dx_prefixes": list(self.special), "peers": self.peers}

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        batch = CalBatch()
        add, group_of = batch.rows.extend, batch.group
        types, dx_keys, bases = self.visit_types, self._dx_keys, self._bases
        peers_on, floor, min_fen = self.peers.enabled, float(self.peers.floor), self._min_fen
        evs = [(i, ev) for i, ev in enumerate(events) if ev.visit_type in types]
        for i, ev, t, once, dom, mi, month_end, year_end, year_no, ref_dom in cal_rows(batch, evs, self.lateness_s):
            dx = dx_keys[ev.diagnoses[0] if ev.diagnoses else None]
            g = (bases[ev.insured_category, ev.birth_year, year_no], dx)
            gi = group_of(g)
            amt, fund, sp = int(round(ev.total_amount * 100)), int(round(ev.fund_paid * 100)), dx[0] == "S"
            card = ev.card_id
            fresh: Any = False
            maybe = False
            if once and (type(t) is int or fresh_time(t)):
                # the card's state as cal_store writes it for this event alone (see cal_fresh in the script)
                h, gs = ((dom, amt, 1), g) if peers_on else ((), ())
                if sp:
                    state = ((), ((month_end, 0, 0, amt, (ev.event_id, t), h, gs),))
                else:
                    state = (((year_end, amt, fund),), ((month_end, amt, fund, 0, (ev.event_id, t), h, gs),))
                fresh = mp_str(_pack(state))
                maybe = (not sp and amt >= min_fen) or (peers_on and amt / 100 >= floor)
            add((i, t, ev.event_id, card, dom, mi, amt, fund, sp, gi, ref_dom, fresh, maybe))
        return batch.queue(pipe, self._sha, self.key(ns), ns.card_prefix(self.card_hash), self._cfg)

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        out: dict[str, Alert] = {}
        for idx, sums, pinfo, ids, times in cal_replies(replies, self.max_evidence):
            for a in self._alerts(ns, events[idx], sums, pinfo, ids, times):
                out[a.alert_id] = a
        return list(out.values())

    def _alerts(self, ns: Namespace, ev: Settlement, sums: list[int], peer: tuple | None, ids: list[str],
                times: list[float]) -> list[Alert]:
        ma, mf, ya, yf, pa, sa = sums
        cal = Calendar(ev.ts, self.lateness_s)
        fired: dict[str, list[tuple[str, float, str, str]]] = {"month": [], "year": []}
        metrics: dict[str, dict[str, Any]] = {
            "month": {"outpatient_cost_cny": ma / 100, "fund_paid_cny": mf / 100, "major_disease_cost_cny": sa / 100},
            "year": {"outpatient_cost_cny": ya / 100, "fund_paid_cny": yf / 100},
        }
        for s in self.sub_rules:
            w = s["window"]
            amount, fund = (ma, mf) if w == "month" else (ya, yf)
            thr = s["min_amount_cny"] * 100
            if amount >= thr - 1e-6:
                when_zh = f"{cal.month} " if w == "month" else f"{cal.year} 年"
                when_en = f"in {cal.month}" if w == "month" else f"in {cal.year}"
                zh = f"{when_zh}门诊费用 {_cny(amount)}（阈值 {_cny(thr)}），其中统筹基金支付 {_cny(fund)}"
                en = f"outpatient cost {_cny(amount)} {when_en} (threshold {_cny(thr)}), fund paid {_cny(fund)}"
                fired[w].append((s["name"], amount / thr, zh, en))
        if peer is not None:
            members, med, qv, gbase, gdx = peer
            bound = peer_bound(self.peers, qv)
            qn = round(self.peers.quantile * 100)
            base = "*|*" if is_special(gdx) else gbase
            metrics["month"].update({"peer_group": group_label(base, gdx, "en"), "peers": members,
                                     "peer_median_cny_at_most": med, f"peer_p{qn}_cny_at_most": qv,
                                     "peer_bound_cny": bound, "cost_incl_major_disease_cny": pa / 100})
            if pa / 100 >= bound - 1e-6:
                glz, gle = group_label(base, gdx, "zh"), group_label(base, gdx, "en")
                zh = (f"本月门诊费用 {_cny(pa)}，同类参保人（{glz}，{members} 人）第 {qn} 百分位不超过 {_cny(qv * 100)}、"
                      f"中位数不超过 {_cny(med * 100)}，界限 {_cny(bound * 100)}")
                en = (f"outpatient cost {_cny(pa)} this month against peers ({gle}, {members} cards): "
                      f"p{qn} at most {_cny(qv * 100)}, median at most {_cny(med * 100)}, bound {_cny(bound * 100)}")
                fired["month"].append(("peers", pa / 100 / bound, zh, en))
        alerts = []
        for window, items in fired.items():
            if not items:
                continue
            bucket, b_start, b_end = cal.bounds(window)
            ratio = max(r for _, r, _, _ in items)
            zh = f"卡 {ev.card_id} " + "；".join(z for _, _, z, _ in items)
            en = f"Card {ev.card_id}: " + "; ".join(x for _, _, _, x in items)
            alerts.append(Alert(
                alert_id=alert_id(ns.run_id, self.rule, "card", ev.card_id, window, bucket),
                rule=self.rule, rule_version=self.version, severity=severity_for(ratio), score=round(ratio, 4),
                subject_type="card", subject_id=ev.card_id, window_start=iso(min(times)), window_end=iso(max(times)),
                evidence_event_ids=ids, run_id=ns.run_id, summary=zh if self.lang == "zh" else en, summary_en=en,
                detected_at=now_iso(), window_s=b_end - b_start,
                metrics={"bucket": bucket, "window": window, "fired": [n for n, _, _, _ in items], **metrics[window]},
            ))
        return alerts
