"""``card_hopping``: one card settling at many distinct institutions in a short time.

Drug dealers and people using collected or borrowed cards (冒用/出借医保卡) go
from institution to institution buying resale-prone drugs. The rule counts the
distinct institutions a card settled at within each configured event-time
window (by default ≥ 12 in 24 h and ≥ 25 in 7 days) and fires once per card,
window and episode; later events of the same episode extend that alert.

State per card and window (Redis, all keys expire):

* ``cw:{run}:card_hopping:{window_s}:{card}`` — sorted set, member
  ``institution\\tevent_id``, score = event time; re-adding a redelivered event is
  a no-op, so counts are idempotent on ``event_id``;
* ``…:ep`` — the open episode (``start``, ``last`` event time);
* ``…:ev`` — the episode's evidence (event ids by event time).

>>> CardHopping(windows=[{"window_s": 86400, "min_institutions": 12}])
CardHopping(windows=[{'window_s': 86400, 'min_institutions': 12}], lateness_s=3600)
>>> CardHopping(windows=[{"window_s": 0, "min_institutions": 12}])
Traceback (most recent call last):
...
ValueError: card_hopping: windows[0].window_s must be a positive integer, got 0
"""

from __future__ import annotations

from typing import Any, Sequence

import orjson

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors.base import EPISODE_LUA, Detector, Namespace, check_positive
from stream.events import Settlement, iso

LUA = EPISODE_LUA + r"""
-- ARGV[1] key prefix (cw:{run}:card_hopping), ARGV[2] JSON {lateness, windows: [[window_s, min_n, ttl]]},
-- ARGV[3] JSON [[t, card, institution, event_id], ...]. Keys are built here from the prefix
-- (standalone Redis; for Redis Cluster the caller groups a batch by hash slot of {card}).
-- Returns a flat list of firing (event, window) pairs: i, j, episode start, n, span, evidence (id, t, ...).
local prefix = ARGV[1]
local cfg = cjson.decode(ARGV[2])
local evs = cjson.decode(ARGV[3])
local lateness = cfg.lateness
local out = {}
for i = 1, #evs do
  local e = evs[i]
  local t, card, inst, eid = e[1], e[2], e[3], e[4]
  for j = 1, #cfg.windows do
    local W, minn, ttl = cfg.windows[j][1], cfg.windows[j][2], cfg.windows[j][3]
    local zk = prefix .. ':' .. W .. ':' .. card
    local ek, vk = zk .. ':ep', zk .. ':ev'
    redis.call('ZADD', zk, t, inst .. '\t' .. eid)
    local top = redis.call('ZRANGE', zk, -1, -1, 'WITHSCORES')
    local maxt = tonumber(top[2])
    redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. tostring(maxt - W - lateness))
    redis.call('EXPIRE', zk, ttl)
    local members = redis.call('ZRANGEBYSCORE', zk, t - W, t, 'WITHSCORES')
    local n = 0
    if #members / 2 >= minn then
      local seen = {}
      for m = 1, #members, 2 do
        local s = members[m]
        local ins = string.sub(s, 1, string.find(s, '\t', 1, true) - 1)
        if not seen[ins] then seen[ins] = true; n = n + 1 end
      end
    end
    if n >= minn then
      local start = episode(ek, vk, t, W)
      for m = 1, #members, 2 do
        local s = members[m]
        redis.call('ZADD', vk, members[m + 1], string.sub(s, string.find(s, '\t', 1, true) + 1))
      end
      redis.call('EXPIRE', ek, ttl)
      redis.call('EXPIRE', vk, ttl)
      out[#out + 1] = {i, j, tostring(start), n, tostring(tonumber(members[#members]) - tonumber(members[2])),
                       redis.call('ZRANGE', vk, 0, -1, 'WITHSCORES')}
    end
  end
end
return out
"""


def _duration(seconds: float, lang: str) -> str:
    s = int(round(seconds))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m = rem // 60
    if lang == "en":
        parts = [f"{d} d" if d else "", f"{h} h" if h else "", f"{m} min" if m or not (d or h) else ""]
    else:
        parts = [f"{d} 天" if d else "", f"{h} 小时" if h else "", f"{m} 分钟" if m or not (d or h) else ""]
    return " ".join(p for p in parts if p)


def window_label(window_s: int, lang: str) -> str:
    """Human name of a window: ``24 小时`` / ``7 天``.

    >>> window_label(86400, "zh"), window_label(604800, "en")
    ('24 小时', '7 days')
    """
    if window_s % 86400 == 0 and window_s >= 2 * 86400:
        return f"{window_s // 86400} days" if lang == "en" else f"{window_s // 86400} 天"
    if window_s % 3600 == 0:
        return f"{window_s // 3600} h" if lang == "en" else f"{window_s // 3600} 小时"
    return f"{window_s} s" if lang == "en" else f"{window_s} 秒"


class CardHopping(Detector):
    """Distinct institutions per card per event-time window (see module docstring)."""

    rule = "card_hopping"
    subject_type = "card"
    scripts = (LUA,)

    def __init__(self, windows: Sequence[dict[str, int]], *, lateness_s: int = 3600, lang: str = "zh",
                 version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        if not isinstance(windows, (list, tuple)) or not windows:
            raise ValueError(f"card_hopping: windows must be a non-empty list, got {windows!r}")
        clean = []
        for i, w in enumerate(windows):
            if not isinstance(w, dict):
                raise ValueError(f"card_hopping: windows[{i}] must be a mapping, got {w!r}")
            unknown = set(w) - {"window_s", "min_institutions"}
            if unknown:
                raise ValueError(f"card_hopping: windows[{i}] has unknown field(s) {sorted(unknown)}")
            for name in ("window_s", "min_institutions"):
                if name not in w:
                    raise ValueError(f"card_hopping: windows[{i}].{name} is required")
                check_positive("card_hopping", f"windows[{i}].{name}", w[name], integer=True)
            if w["min_institutions"] < 2:
                raise ValueError(f"card_hopping: windows[{i}].min_institutions must be >= 2, got {w['min_institutions']}")
            clean.append({"window_s": int(w["window_s"]), "min_institutions": int(w["min_institutions"])})
        sizes = [w["window_s"] for w in clean]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"card_hopping: windows must have distinct window_s, got {sizes}")
        self.windows = clean
        self._sha = self.sha(LUA)

    def params(self) -> dict[str, Any]:
        return {"windows": self.windows, "lateness_s": self.lateness_s}

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        if not events:
            return 0
        cfg = {"lateness": self.lateness_s,
               "windows": [[w["window_s"], w["min_institutions"], w["window_s"] + self.lateness_s]
                           for w in self.windows]}
        rows = [[ev.ts, ev.card_id, ev.institution_id, ev.event_id] for ev in events]
        pipe.evalsha(self._sha, 0, self.key(ns), orjson.dumps(cfg), orjson.dumps(rows))
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not events:
            return []
        out: dict[str, Alert] = {}
        for i, j, start, n, span, flat in replies[0]:
            ev, w = events[i - 1], self.windows[j - 1]
            ids = [x.decode() if isinstance(x, bytes) else x for x in flat[0::2]]
            times = [float(x) for x in flat[1::2]]
            a = self._alert(ns, ev.card_id, w, float(start), int(n), float(span), ids, times)
            out[a.alert_id] = a
        return list(out.values())

    def _alert(self, ns: Namespace, card: str, w: dict[str, int], start: float, n: int, span: float,
               ids: list[str], times: list[float]) -> Alert:
        ws, mn = w["window_s"], w["min_institutions"]
        zh = f"卡 {card} 在 {window_label(ws, 'zh')}内于 {n} 家定点医药机构结算（{_duration(span, 'zh')}内），阈值 {mn} 家"
        en = f"Card {card} settled at {n} institutions within {window_label(ws, 'en')} ({n} in {_duration(span, 'en')}); threshold {mn}"
        return Alert(
            alert_id=alert_id(ns.run_id, self.rule, "card", card, str(ws), repr(start)),
            rule=self.rule, rule_version=self.version, severity=severity_for(n / mn), score=round(n / mn, 4),
            subject_type="card", subject_id=card, window_start=iso(min(times)), window_end=iso(max(times)),
            evidence_event_ids=ids, run_id=ns.run_id, summary=zh if self.lang == "zh" else en, summary_en=en,
            detected_at=now_iso(), window_s=ws,
            metrics={"distinct_institutions": n, "min_institutions": mn, "window_s": ws, "span_s": span},
        )
