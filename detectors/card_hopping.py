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

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors.base import Detector, Namespace, check_positive
from stream.events import Settlement, iso

LUA = r"""
-- ARGV: nwin, lateness, {window_s, min_n, ttl} * nwin, {t, institution, event_id} * n
-- KEYS: {zset, episode, evidence} * nwin per event
local nwin = tonumber(ARGV[1])
local lateness = tonumber(ARGV[2])
local win = {}
local a = 3
for j = 1, nwin do
  win[j] = {tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])}
  a = a + 3
end
local out = {}
local k = 1
local i = 0
while a <= #ARGV do
  i = i + 1
  local t = tonumber(ARGV[a]); local inst = ARGV[a + 1]; local eid = ARGV[a + 2]
  a = a + 3
  local res = {}
  for j = 1, nwin do
    local W, minn, ttl = win[j][1], win[j][2], win[j][3]
    local zk, ek, vk = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    k = k + 3
    redis.call('ZADD', zk, t, inst .. '\t' .. eid)
    local top = redis.call('ZRANGE', zk, -1, -1, 'WITHSCORES')
    local maxt = tonumber(top[2])
    redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. tostring(maxt - W - lateness))
    redis.call('EXPIRE', zk, ttl)
    local members = redis.call('ZRANGEBYSCORE', zk, t - W, t, 'WITHSCORES')
    local seen = {}
    local n = 0
    for m = 1, #members, 2 do
      local s = members[m]
      local ins = string.sub(s, 1, string.find(s, '\t', 1, true) - 1)
      if not seen[ins] then seen[ins] = true; n = n + 1 end
    end
    if n >= minn then
      local ep = redis.call('HMGET', ek, 'start', 'last')
      local start = tonumber(ep[1])
      local last = tonumber(ep[2])
      if start and (t - last) <= W and t >= start - W then
        if t > last then redis.call('HSET', ek, 'last', t) end
      else
        start = t
        redis.call('HSET', ek, 'start', t, 'last', t)
        redis.call('DEL', vk)
      end
      for m = 1, #members, 2 do
        local s = members[m]
        redis.call('ZADD', vk, members[m + 1], string.sub(s, string.find(s, '\t', 1, true) + 1))
      end
      redis.call('EXPIRE', ek, ttl)
      redis.call('EXPIRE', vk, ttl)
      local ev = redis.call('ZRANGE', vk, 0, -1, 'WITHSCORES')
      local span = tonumber(members[#members]) - tonumber(members[2])
      res[j] = {tostring(start), n, tostring(span), ev}
    else
      res[j] = 0
    end
  end
  out[i] = res
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

    def _keys(self, ns: Namespace, card: str) -> list[str]:
        keys = []
        for w in self.windows:
            base = self.key(ns, w["window_s"], card)
            keys += [base, base + ":ep", base + ":ev"]
        return keys

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        if not events:
            return 0
        argv: list[Any] = [len(self.windows), self.lateness_s]
        for w in self.windows:
            argv += [w["window_s"], w["min_institutions"], w["window_s"] + self.lateness_s]
        keys: list[str] = []
        for ev in events:
            argv += [repr(ev.ts), ev.institution_id, ev.event_id]
            keys += self._keys(ns, ev.card_id)
        pipe.evalsha(self._sha, len(keys), *keys, *argv)
        return 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not events:
            return []
        out: dict[str, Alert] = {}
        per_event = replies[0]
        for ev, res in zip(events, per_event):
            for w, r in zip(self.windows, res):
                if not r:
                    continue
                start, n, span, flat = r
                n = int(n)
                ids = [x.decode() if isinstance(x, bytes) else x for x in flat[0::2]]
                times = [float(x) for x in flat[1::2]]
                a = self._alert(ns, ev.card_id, w, float(start), n, float(span), ids, times)
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
