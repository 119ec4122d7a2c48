"""``card_hopping``: one card settling at many distinct institutions in a short time.

Drug dealers and people using collected or borrowed cards (冒用/出借医保卡) go
from institution to institution buying resale-prone drugs. The rule counts the
distinct institutions a card settled at within each configured event-time
window (by default ≥ 12 in 24 h and ≥ 25 in 7 days) and fires once per card,
window and episode; later events of the same episode extend that alert.

State (Redis, all keys expire):

* field ``card_hopping:{window_s,...}`` (e.g. ``card_hopping:86400,604800``) of the card's
  recent-activity hash ``cw:{run}:c:{card}`` — ONE field for all windows: a cjson flat array
  ``[t, institution, event_id, t, institution, event_id, ...]`` in canonical order (event
  time, then event id byte by byte, as a sorted set orders), deduplicated on ``event_id``
  (a redelivered event is a no-op, so counts are idempotent), pruned by event time to
  ``newest - largest window - lateness_s`` each time it is written; the distinct
  institutions of each window are counted in Lua. A fractional event time is kept exact, as
  ``%.17g`` text. A card's first settlement (no field yet, the usual case) is written as its
  entry's JSON text, built in Python (``HSETNX``: one call, no decoding); a settlement after
  the card's last one is written by appending its entry's text to the stored text; cjson
  re-encodes only when one goes in earlier or old ones are pruned. (The format is the one
  earlier versions wrote, so a worker upgraded mid-stream reads their state as is.) The card
  hash's TTL is set by the processor (``card_ttl_s`` = largest window + lateness);
* only when a window fires: ``cw:{run}:card_hopping:{window_s}:{card}:ep`` — the open
  episode (``start``, ``last`` event time) and ``…:ev`` — the episode's evidence (event
  ids by event time), both ``window_s`` + lateness.

>>> CardHopping(windows=[{"window_s": 86400, "min_institutions": 12}])
CardHopping(windows=[{'window_s': 86400, 'min_institutions': 12}], lateness_s=3600)
>>> d = CardHopping(windows=[{"window_s": 604800, "min_institutions": 25}, {"window_s": 86400, "min_institutions": 12}])
>>> d.field, d.card_hash, d.card_ttl_s
('card_hopping:86400,604800', 'c', 608400)
>>> CardHopping(windows=[{"window_s": 0, "min_institutions": 12}])
Traceback (most recent call last):
...
ValueError: card_hopping: windows[0].window_s must be a positive integer, got 0
"""

from __future__ import annotations

from typing import Any, Sequence

import orjson
from msgspec.msgpack import encode as _pack

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors.base import EPISODE_LUA, TIMES_LUA, Detector, Namespace, check_positive
from stream.events import Settlement, iso

LUA = EPISODE_LUA + TIMES_LUA + r"""
-- ARGV[1] episode key prefix (cw:{run}:card_hopping), ARGV[2] card hash prefix (cw:{run}:c:),
-- ARGV[3] JSON [field, lateness, largest window, smallest min_n, [[window_s, min_n, ttl], ...]],
-- ARGV[4] MessagePack, flat: [more, card hash key, entry, ...] per event, where entry is the event's
-- [t, institution, event_id] as stored, in JSON text (built in Python), and more is 1 when the card has other
-- events in this batch (0: its only one, the usual case). The card's field is a flat array t, institution,
-- event_id, ... in (t, event_id) order. A card without it (its first settlement in reach, the usual case) gets
-- the entry text as is (HSETNX: one call, no decoding, no encoding); otherwise the stored text with the entry's
-- text appended is decoded (one decoding for both), and, when the event is new, sorts after the stored ones and
-- nothing is pruned, that text is the new value (no re-encoding). A card with several events in the batch is
-- read once and written once. Episode keys are built here (standalone Redis; for Redis Cluster the caller groups
-- a batch by hash slot of {card}).
-- Returns a flat list of firing (event, window) pairs: i, j, episode start, n, span, evidence (id, t, ...).
local prefix, cp = ARGV[1], ARGV[2]
local cfg = cjson.decode(ARGV[3])
local evs = cmsgpack.unpack(ARGV[4])
local field, lateness, maxw, minmin, windows = cfg[1], cfg[2], cfg[3], cfg[4], cfg[5]
local sub, tinsert, abs = string.sub, table.insert, math.abs
local need = 3 * minmin
-- x as Lua's tostring (%.14g) leaves it: x itself for whole seconds (the pruning bound of a sorted set was so rounded)
local function q(x)
  if x % 1 == 0 then return x end
  return tonumber(tostring(x))
end
-- the field: t, institution, event_id per settlement (exact fractional times: TIMES_LUA)
local function load(raw) return times_load(cjson.decode(raw), 1, 3) end
local function save(st) return times_save(st, 1, 3) end
-- stored text with an entry's text appended
local function append(raw, entry) return sub(raw, 1, -2) .. ',' .. sub(entry, 2) end
-- (ta, ea) sorts before (tb, eb): by time, then event id byte by byte (as a sorted set)
local function before(ta, ea, tb, eb)
  if ta ~= tb then return ta < tb end
  return bytes_lt(ea, eb)
end
-- st (len values): a card's settlements with an event appended last. Drops the event when its id is known,
-- else moves it to its place and prunes what no window can reach any more. Returns st, len and 0 (known),
-- 1 (kept last: the stored text with the entry appended is the new value) or 2 (re-encode).
local function add(st, len)
  local t, inst, eid = st[len - 2], st[len - 1], st[len]
  for m = len - 3, 3, -3 do
    if st[m] == eid then
      st[len] = nil; st[len - 1] = nil; st[len - 2] = nil
      return st, len - 3, 0
    end
  end
  local how = 1
  local p = len - 2
  while p > 1 and before(t, eid, st[p - 3], st[p - 1]) do p = p - 3 end
  if p < len - 2 then
    st[len] = nil; st[len - 1] = nil; st[len - 2] = nil
    tinsert(st, p, eid); tinsert(st, p, inst); tinsert(st, p, t)
    how = 2
  end
  local cut = st[len - 2] - maxw - lateness
  -- q(cut) is within 1e-13 |cut| of cut: only a first entry that close needs the rounded bound
  if st[1] < cut + 1 + 1e-13 * abs(cut) then
    cut = q(cut)
    if st[1] < cut then  -- the oldest entries come first
      local k = 1
      while st[k] < cut do k = k + 3 end
      local kept = {}
      for m = k, len do kept[#kept + 1] = st[m] end
      return kept, #kept, 2
    end
  end
  return st, len, how
end
local out = {}
-- the windows of event i (at t) of the card of key over its settlements st (len values): fire and record
local function check(i, key, st, len, t)
  local newest = st[len - 2]
  for j = 1, #windows do
    local W, minn, ttl = windows[j][1], windows[j][2], windows[j][3]
    -- the events in [t - W, t], never older than newest - W - lateness (what a per-window set would keep)
    local lo = math.max(t - W, q(newest - W - lateness))
    local a, b, cnt = 0, 0, 0
    for m = len - 2, 1, -3 do
      local x = st[m]
      if x < lo then break end
      if x <= t then
        if cnt == 0 then b = m end
        a = m; cnt = cnt + 1
      end
    end
    local n = 0
    if cnt >= minn then
      local seen = {}
      for m = a + 1, b + 1, 3 do
        local ins = st[m]
        if not seen[ins] then seen[ins] = true; n = n + 1 end
      end
    end
    if n >= minn then
      local zk = prefix .. ':' .. W .. ':' .. sub(key, #cp + 1)
      local ek, vk = zk .. ':ep', zk .. ':ev'
      local start = episode(ek, vk, t, W)
      local args = {}
      for m = a, b, 3 do
        args[#args + 1] = st[m]; args[#args + 1] = st[m + 2]
        if #args >= 1000 then redis.call('ZADD', vk, unpack(args)); args = {} end
      end
      if #args > 0 then redis.call('ZADD', vk, unpack(args)) end
      redis.call('EXPIRE', ek, ttl)
      redis.call('EXPIRE', vk, ttl)
      out[#out + 1] = {i, j, tostring(start), n, tostring(st[b] - st[a]),
                       redis.call('ZRANGE', vk, 0, -1, 'WITHSCORES')}
    end
  end
end
-- cards with several events in the batch: key -> settlements; -> the field's current text (false: re-encode);
-- the ones to write, in order
local state, raws, dirty, nd = {}, {}, {}, 0
local i = 0
for r = 1, #evs, 3 do
  i = i + 1
  local more, key, entry = evs[r], evs[r + 1], evs[r + 2]
  local st = more == 1 and state[key]
  if st then  -- a later event of a card read in this batch
    local e = load(entry)
    local len = #st
    st[len + 1] = e[1]; st[len + 2] = e[2]; st[len + 3] = e[3]
    local how
    st, len, how = add(st, len + 3)
    state[key] = st
    if how > 0 then
      local raw = raws[key]
      raws[key] = how == 1 and raw and append(raw, entry)
      if not dirty[key] then dirty[key] = true; nd = nd + 1; dirty[nd] = key end
    end
    if len >= need then check(i, key, st, len, e[1]) end
  elseif redis.call('HSETNX', key, field, entry) == 1 then
    -- the card's first settlement: stored as sent; one settlement is one institution, below every threshold
    if more == 1 then state[key] = load(entry); raws[key] = entry end
  else
    local raw = redis.call('HGET', key, field)
    local text = append(raw, entry)
    local st = load(text)
    local len = #st
    local t = st[len - 2]
    local how
    st, len, how = add(st, len)
    if len >= need then check(i, key, st, len, t) end
    if more == 1 then
      state[key] = st
      if how == 0 then raws[key] = raw elseif how == 1 then raws[key] = text else raws[key] = false end
      if how > 0 then dirty[key] = true; nd = nd + 1; dirty[nd] = key end
    elseif how > 0 then
      redis.call('HSET', key, field, how == 1 and text or save(st))
    end
  end
end
for c = 1, nd do
  local key = dirty[c]
  redis.call('HSET', key, field, raws[key] or save(state[key]))
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
    card_hash = "c"

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
        #: this rule's field of the card hash: every window's events, one array (see module docstring)
        self.field = f"{self.rule}:{','.join(str(w) for w in sorted(sizes))}"
        self.card_ttl_s = max(sizes) + lateness_s
        self._cfg = orjson.dumps([self.field, lateness_s, max(sizes), min(w["min_institutions"] for w in clean),
                                  [[w["window_s"], w["min_institutions"], w["window_s"] + lateness_s]
                                   for w in clean]])

    def params(self) -> dict[str, Any]:
        return {"windows": self.windows, "lateness_s": self.lateness_s}

    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        if not events:
            return 0
        cp = ns.card_prefix(self.card_hash)
        seen: dict[str, int] = {}   # card -> its number of events in the batch
        for ev in events:
            c = ev.card_id
            seen[c] = seen.get(c, 0) + 1
        rows: list[Any] = []   # flat: more (the card has other events in the batch), card hash key, entry (its JSON text)
        dumps = orjson.dumps
        for ev in events:
            ts, inst, eid = ev.ts, ev.institution_id, ev.event_id
            t: Any = int(ts)
            if t != ts or not -1e14 < ts < 1e14:  # stored exactly, as text (TIMES_LUA)
                t = f"{ts:.17g}"
            c = ev.card_id
            rows += (0 if seen[c] == 1 else 1, cp + c, dumps((t, inst, eid)).decode())
        pipe.evalsha(self._sha, 0, self.key(ns), cp, self._cfg, _pack(rows))
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
