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

Each card's states are read once per batch and written back once, and each card-month the
batch touched is judged once, as of its last event in the batch, so a redelivered batch
returns the same alerts and writes nothing.

State per card (Redis, JSON values expiring at the end of the bucket + lateness: at most one
``GET`` and one ``SET`` per batch and bucket):

* ``cw:{run}:visit_frequency:month:{card}:{YYYY-MM}`` — ``ev`` (event id -> event time; a
  redelivered event is a no-op), ``vk`` (visits and bills seen per day and place), ``o``/``em``
  (outpatient/emergency visits counted for the thresholds), ``d``/``dn``/``di`` (visits and
  institutions per day), ``dd`` (qualifying days per day sub-rule), ``pv``/``gb``/``gd``/``h``
  (peer value and group, see :mod:`detectors._peers`);
* ``…:year:{card}:{YYYY}`` — ``o``/``em`` of the year;
* ``…:peer:{YYYY-MM}:{group}:{day}`` — daily deltas of the peer histograms (hashes).

>>> VisitFrequency(sub_rules=[{"name": "outpatient_month", "window": "month", "min_visits": 15}],
...                peers={"min_visits": 8})
VisitFrequency(sub_rules=['outpatient_month'], special_dx_prefixes=[], peers=PeerSpec(floor=8, quantile=0.99, factor=2.0, min_peer_size=30))
>>> VisitFrequency(sub_rules=[{"name": "m", "window": "week", "min_visits": 15}])
Traceback (most recent call last):
...
ValueError: visit_frequency: sub_rules[0].window must be 'month' or 'year', got 'week'
"""

from __future__ import annotations

from typing import Any, Sequence

import orjson

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors._peers import (LUA_LIB, Calendar, PeerSpec, buckets_of, check_prefixes, dx_key, group_label,
                              is_special, peer_bound)
from detectors.base import Detector, Namespace, check_positive
from stream.events import Settlement, iso

LUA = LUA_LIB + r"""
-- ARGV[1] key prefix (cw:{run}:visit_frequency), ARGV[2] JSON {subs: [[window m|y, mask (1 outpatient,
-- 2 emergency), min]], days: [[kind v|i, per_day_min, min_days]], peers: (see pk_config)}, ARGV[3] JSON
-- [[idx, t, event_id, card, day of month, YYYY-MM, YYYY, ttl month, ttl year, o|e, special 0|1, institution,
--   department, bill key ('' without a registration line), primary diagnosis, group base, diagnosis key,
--   reference day of month], ...]. Keys are built here: {prefix}:month:{card}:{YYYY-MM}, …:year:{card}:{YYYY}
-- (JSON states), {prefix}:peer:… (peer histograms).
-- Each state is read once per batch, updated in memory and written back once; each card-month the batch
-- touched is then judged once, as of its last event in the batch (so a redelivered batch writes nothing
-- and returns the same verdicts). Returns {idx, counts, peer|0, evidence} per card-month over a threshold.
local P = ARGV[1]
local prefix = P .. ':peer'
local cfg = cjson.decode(ARGV[2])
local subs, days = cfg.subs, cfg.days
local K, J = #subs, #days
local pc = pk_config(cfg.peers)
local rows = cjson.decode(ARGV[3])
local ms, ys, mttl, yttl, order, last = {}, {}, {}, {}, {}, {}
for r = 1, #rows do
  local e = rows[r]
  local idx, t, eid, card, dom, ym, yr = e[1], e[2], e[3], e[4], e[5], e[6], e[7]
  local ttl_m, ttl_y, vt, special, inst, dept, bill = e[8], e[9], e[10], e[11], e[12], e[13], e[14]
  local pdx, eb, ed, rdom = e[15], e[16], e[17], e[18]
  local mk, yk = P .. ':month:' .. card .. ':' .. ym, P .. ':year:' .. card .. ':' .. yr
  local m = ms[mk]
  if not m then
    local raw = redis.call('GET', mk)
    if raw then m = cjson.decode(raw)
    else m = {ev = {}, vk = {}, d = {}, dn = {}, di = {}, dd = {}, h = {}, o = 0, em = 0, pv = 0} end
    ms[mk] = m
    order[#order + 1] = mk
  end
  local y = ys[yk]
  if not y then
    local raw = redis.call('GET', yk)
    if raw then y = cjson.decode(raw) else y = {o = 0, em = 0} end
    ys[yk] = y
  end
  last[mk] = {idx, yk, ym, rdom}
  if not m.ev[eid] then
    m.ev[eid] = t
    mttl[mk] = ttl_m
    -- a settlement with a registration (挂号) is a visit unless the same bill was settled there that day
    -- before; one without (tests or drugs paid separately) is part of that day's visit there for the
    -- same diagnosis, if there is one
    local place = dom .. ':' .. inst .. '|' .. dept
    local newvisit
    if bill ~= '' then
      newvisit = not m.vk[place .. '|' .. bill]
      if newvisit then m.vk[place .. '|' .. bill] = 1; m.vk[place .. '#' .. pdx] = 1 end
    else
      newvisit = not m.vk[place .. '#' .. pdx]
      if newvisit then m.vk[place .. '#' .. pdx] = 1 end
    end
    if newvisit then
      m.pv = m.pv + 1
      if special == 0 then
        if vt == 'o' then m.o = m.o + 1; y.o = y.o + 1 else m.em = m.em + 1; y.em = y.em + 1 end
        yttl[yk] = ttl_y
        if J > 0 then
          local dc = (m.d[dom] or 0) + 1
          m.d[dom] = dc
          local ic = -1
          if not m.di[dom .. '|' .. inst] then
            m.di[dom .. '|' .. inst] = 1
            ic = (m.dn[dom] or 0) + 1
            m.dn[dom] = ic
          end
          for j = 1, J do
            if (days[j][1] == 'v' and dc == days[j][2]) or (days[j][1] == 'i' and ic == days[j][2]) then
              m.dd[tostring(j)] = (m.dd[tostring(j)] or 0) + 1
            end
          end
        end
      end
      if pc.enabled then
        local nb, nd = pk_regroup(m.gb, m.gd, eb, ed)
        pk_update(prefix, ym, dom, ttl_m, pc, m.gb, m.gd, m.pv - 1, nb, nd, m.pv)
        m.gb = nb
        m.gd = nd
        m.h[dom] = {m.pv, nb, nd}
      end
    end
  end
end
for mk, ttl in pairs(mttl) do redis.call('SET', mk, cjson.encode(ms[mk]), 'EX', ttl) end
for yk, ttl in pairs(yttl) do redis.call('SET', yk, cjson.encode(ys[yk]), 'EX', ttl) end
local out = {}
for _, mk in ipairs(order) do
  local m, l = ms[mk], last[mk]
  local y = ys[l[2]]
  local counts = {m.o, m.em, y.o, y.em, m.pv}
  for j = 1, J do counts[5 + j] = m.dd[tostring(j)] or 0 end
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
  if pc.enabled and m.gb and m.pv >= pc.floor then
    local p = pk_peers(prefix, l[3], l[4], pc, m.h, m.gb, m.gd)
    if p then
      peer = {p[1], p[2], p[3], m.gb, m.gd}
      if pk_fires(pc, m.pv, p) then fired = true end
    end
  end
  if fired then out[#out + 1] = {l[1], counts, peer, pk_evidence(m.ev)} end
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
    regs = [it for it in ev.items if it.category == "registration"]
    if not regs:
        return ""
    return f"{ev.total_amount:.2f}|{len(ev.items)}|{regs[0].code}"


def _dec(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


class VisitFrequency(Detector):
    """Visits per card per calendar month/year, daily patterns and peers (see module docstring)."""

    rule = "visit_frequency"
    subject_type = "card"
    scripts = (LUA,)

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
        cfg = {"subs": [["m" if c["window"] == "month" else "y",
                         (1 if "outpatient" in c["visit_types"] else 0) + (2 if "emergency" in c["visit_types"] else 0),
                         c["min_visits"]] for c in counts],
               "days": [["v" if d["kind"] == "visits" else "i", d["per_day"], d["min_days"]] for d in days],
               "peers": self.peers.config()}
        self._cfg = orjson.dumps(cfg)

    def params(self) -> dict[str, Any]:
        return {"sub_rules": [s["name"] for s in self.sub_rules], "special_dx_prefixes": list(self.special),
                "peers": self.peers}

    # -- Redis ---------------------------------------------------------------------------
    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        rows: list[list[Any]] = []
        late = self.lateness_s
        special, base = self.special, self.peers.base
        for i, ev in enumerate(events):
            if ev.visit_type not in VISIT_TYPES or ev.institution_type == "pharmacy":
                continue
            ts = ev.ts
            dom, month, month_end, year, year_end, year_no, ref_dom = buckets_of(ts, late)
            pdx = ev.diagnoses[0].strip().upper() if ev.diagnoses else "-"
            dx = dx_key(pdx, special)
            rows.append([i, repr(ts), ev.event_id, ev.card_id, str(dom), month, year,
                         max(1, int(month_end - ts) + late), max(1, int(year_end - ts) + late),
                         "o" if ev.visit_type == "outpatient" else "e", int(dx[0] == "S"), ev.institution_id,
                         ev.department or "-", _bill_key(ev), pdx, base(ev, year_no), dx, ref_dom])
        if not rows:
            return 0
        pipe.evalsha(self._sha, 0, self.key(ns), self._cfg, orjson.dumps(rows))
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not replies:
            return []
        out: dict[str, Alert] = {}
        for idx, counts, peer, flat in replies[0]:
            ev = events[int(idx)]
            counts = [int(x) for x in counts]
            ids = [_dec(x) for x in flat[0::2]]
            times = [float(_dec(x)) for x in flat[1::2]]
            order = sorted(range(len(ids)), key=lambda j: (times[j], ids[j]))[-self.max_evidence:]
            ids, times = [ids[j] for j in order], [times[j] for j in order]
            pinfo = None if not peer else (int(peer[0]), float(_dec(peer[1])), float(_dec(peer[2])), _dec(peer[3]),
                                           _dec(peer[4]))
            for a in self._alerts(ns, ev, counts, pinfo, ids, times):
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

