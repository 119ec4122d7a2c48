"""Inspectors' verdicts on alerts, and the online model that learns from them which alerts matter.

A verdict is one JSON message on the ``verdicts`` topic (key = alert id)::

    {"alert_id": "A-…", "verdict": "fraud" | "false_positive", "author": "王芳",
     "time": "2026-11-24T10:02:00+08:00", "note": "optional, ≤ 2000 characters"}

``claimwatch alerts verdict ALERT_ID --fraud|--false-positive --author NAME`` publishes one
(:func:`verdict_command`); the inspectors' console will publish the same message.

:class:`PriorityModel` is an online classifier (river ``StandardScaler | LogisticRegression``)
over what an alert says about itself — rule, severity, score, evidence size, the numbers
in its metrics (for ``ml_outlier`` the settlement's features) — trained on verdicts. It
gives every new alert a ``priority``: the probability that an inspector will confirm it
(0.5 before any verdict). It is persisted in Redis (``cw:priority_model``) after every
verdict and restored on start.

>>> v = parse_verdict(b'{"alert_id": "A-1", "verdict": "fraud", "author": "wang", "time": "2026-11-24T10:00:00+08:00"}')
>>> v.verdict, v.note
('fraud', None)
>>> parse_verdict(b'{"alert_id": "A-1", "verdict": "maybe", "author": "wang", "time": "2026-11-24T10:00:00+08:00"}')
Traceback (most recent call last):
...
alerts.verdicts.InvalidVerdict: Invalid enum value 'maybe' - at `$.verdict`
"""

from __future__ import annotations

import io
import math
import pickle
from datetime import datetime, timezone
from typing import Annotated, Any, Iterable, Literal, Mapping, Sequence

import msgspec

from alerts.model import SEVERITIES, Alert

VERDICTS: tuple[str, ...] = ("fraud", "false_positive")
REDIS_KEY = "cw:priority_model"
#: Redis hash alert_id -> the last verdict learned (JSON): a redelivered verdict is not learned twice
SEEN_KEY = "cw:verdicts"
MAX_NOTE = 2000


class InvalidVerdict(ValueError):
    """A message that is not a valid verdict; ``str(exc)`` is the reason."""


class Verdict(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, omit_defaults=True):
    alert_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    verdict: Literal["fraud", "false_positive"]
    author: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    time: datetime
    note: Annotated[str, msgspec.Meta(max_length=MAX_NOTE)] | None = None

    @property
    def fraud(self) -> bool:
        return self.verdict == "fraud"


_dec = msgspec.json.Decoder(Verdict)
_enc = msgspec.json.Encoder()


def _check(v: Verdict) -> Verdict:
    if v.time.tzinfo is None:
        raise InvalidVerdict("time has no UTC offset - at `$.time`")
    for name in ("alert_id", "author"):
        val = getattr(v, name)
        if not val.strip() or any(ord(c) < 32 or ord(c) == 127 for c in val):
            raise InvalidVerdict(f"{name} must be printable text, got {val!r} - at `$.{name}`")
    return v


def parse_verdict(raw: bytes | str) -> Verdict:
    """Decode and validate one verdict message; raise :class:`InvalidVerdict` with the reason."""
    if raw is None:
        raise InvalidVerdict("empty message (no value)")
    if len(raw) > 16 * 1024:
        raise InvalidVerdict(f"message of {len(raw)} bytes is larger than a verdict can be (16 KiB)")
    try:
        v = _dec.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidVerdict(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidVerdict(f"not valid JSON: {exc}") from None
    return _check(v)


def make_verdict(alert_id: str, verdict: str, author: str, note: str | None = None,
                 at: datetime | None = None) -> Verdict:
    """A validated verdict (``at`` defaults to now, UTC).

    >>> at = datetime(2026, 11, 24, 2, 0, tzinfo=timezone.utc)
    >>> make_verdict("A-1", "false_positive", "li", at=at).time.isoformat()
    '2026-11-24T02:00:00+00:00'
    >>> make_verdict("A-1", "yes", "li")
    Traceback (most recent call last):
    ...
    alerts.verdicts.InvalidVerdict: Invalid enum value 'yes' - at `$.verdict`
    """
    doc: dict[str, Any] = {"alert_id": alert_id, "verdict": verdict, "author": author,
                           "time": (at or datetime.now(timezone.utc)).isoformat()}
    if note is not None:
        doc["note"] = note
    return parse_verdict(msgspec.json.encode(doc))


def verdict_json(v: Verdict) -> bytes:
    return _enc.encode(v)


async def publish_verdict(bootstrap: str, topic: str, alert_id: str, verdict: str, author: str,
                          note: str | None = None, at: datetime | None = None) -> Verdict:
    """Validate and publish one verdict (key = alert id); return it."""
    from aiokafka import AIOKafkaProducer

    v = make_verdict(alert_id, verdict, author, note, at)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        await producer.start()
        await producer.send_and_wait(topic, verdict_json(v), key=v.alert_id.encode())
    finally:
        await producer.stop()
    return v


def verdict_command(settings: Any, alert_id: str, verdict: str, author: str, note: str | None = None) -> Verdict:
    """``claimwatch alerts verdict``: check the alert exists in the store, then publish the verdict.

    Raises ``LookupError`` for an alert the store does not know, :class:`InvalidVerdict` for a bad
    verdict, and ``RuntimeError`` when no broker is configured.
    """
    import asyncio

    from alerts.store import AlertStore
    from stream.topics import ensure_topics

    v = make_verdict(alert_id, verdict, author, note)  # validate before touching anything
    store = AlertStore(settings.store_url_resolved)
    try:
        if not _exists(store, alert_id):
            raise LookupError(f"no alert {alert_id!r} in the alert store ({settings.store_url_resolved})")
    finally:
        store.close()
    topic = getattr(settings, "topic_verdicts", "verdicts")

    async def go() -> Verdict:
        await ensure_topics(settings.bootstrap_servers, [topic], 1)
        return await publish_verdict(settings.bootstrap_servers, topic, v.alert_id, v.verdict, v.author, v.note,
                                     v.time)

    return asyncio.run(go())


def _exists(store: Any, alert_id: str) -> bool:
    import sqlalchemy as sa

    from alerts.store import alerts_table

    with store.engine.connect() as conn:
        return conn.execute(sa.select(alerts_table.c.alert_id).where(alerts_table.c.alert_id == alert_id)).first() \
            is not None


# ----------------------------------------------------------------------------- the priority model

#: metrics that are bookkeeping, never evidence of fraud
_SKIP_METRICS = {"priority", "verdict", "partition", "event_id", "threshold", "exemption"}
_MAX_FEATURES = 96


def _signed_log(v: float) -> float:
    return math.copysign(math.log1p(abs(v)), v)


def alert_features(a: Alert | Mapping[str, Any]) -> dict[str, float]:
    """What the priority model sees of an alert (numbers only; ids never).

    >>> from alerts.model import Alert
    >>> a = Alert(alert_id="A-1", rule="card_hopping", severity="high", subject_type="card", subject_id="C1",
    ...           window_start="2026-11-24T09:00:00+08:00", window_end="2026-11-24T18:00:00+08:00",
    ...           evidence_event_ids=["E1", "E2"], run_id="r", score=1.5, metrics={"distinct_institutions": 14})
    >>> f = alert_features(a)
    >>> f["rule=card_hopping"], f["severity"], f["card_hopping.distinct_institutions"]
    (1.0, 2.0, 2.7081)
    """
    d = a if isinstance(a, Mapping) else msgspec.structs.asdict(a)
    rule = str(d.get("rule", ""))
    out: dict[str, float] = {f"rule={rule}": 1.0, f"subject={d.get('subject_type', '')}": 1.0}
    sev = d.get("severity")
    out["severity"] = float(SEVERITIES.index(sev)) if sev in SEVERITIES else 1.0
    score = d.get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        out[f"{rule}.score"] = round(_signed_log(float(score)), 4)
    out["evidence"] = round(math.log1p(len(d.get("evidence_event_ids") or ())), 4)
    out["members"] = round(math.log1p(len(d.get("member_ids") or ())), 4)
    try:
        span = (datetime.fromisoformat(d["window_end"]) - datetime.fromisoformat(d["window_start"])).total_seconds()
        out["span_h"] = round(math.log1p(max(0.0, span) / 3600), 4)
    except (KeyError, TypeError, ValueError):
        pass

    def walk(prefix: str, m: Mapping[str, Any]) -> None:
        for k, v in m.items():
            if len(out) >= _MAX_FEATURES:
                return
            if k in _SKIP_METRICS:
                continue
            if isinstance(v, bool):
                out[f"{prefix}.{k}"] = float(v)
            elif isinstance(v, (int, float)):
                if math.isfinite(v):
                    out[f"{prefix}.{k}"] = round(_signed_log(float(v)), 4)
            elif isinstance(v, Mapping) and prefix.count(".") < 1:
                walk(f"{prefix}.{k}", v)

    walk(rule, d.get("metrics") or {})
    return out


def default_model() -> Any:
    from river import linear_model, optim, preprocessing

    return preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.05), l2=0.0)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in {"dict", "list", "tuple", "set", "float", "int", "bool", "str",
                                               "frozenset"}) \
                or module.startswith("river.") \
                or (module == "collections" and name in ("defaultdict", "OrderedDict", "Counter", "deque")) \
                or (module == "functools" and name == "partial") or module == "copyreg" and name == "_reconstructor":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"priority model refers to {module}.{name}, which it never holds")


class PriorityModel:
    """Online classifier: verdicts in, a priority (probability of confirmed fraud) for every alert out.

    >>> from alerts.model import Alert
    >>> def mk(i, n):
    ...     return Alert(alert_id=f"A-{i}", rule="ml_outlier", severity="medium", subject_type="card",
    ...                  subject_id=f"C{i}", window_start="2026-11-24T09:00:00+08:00",
    ...                  window_end="2026-11-24T09:00:00+08:00", evidence_event_ids=["E"], run_id="r",
    ...                  metrics={"features": {"card_inst_24h": n}})
    >>> pm = PriorityModel()
    >>> pm.priority(mk(0, 1))
    0.5
    >>> for i in range(200):
    ...     pm.learn(mk(i, 1 + 9 * (i % 2)), fraud=bool(i % 2))
    >>> pm.priority(mk(1, 10)) > 0.8 > 0.2 > pm.priority(mk(2, 1))
    True
    """

    def __init__(self, model: Any = None) -> None:
        self.model = model if model is not None else default_model()
        self.n_learned = 0
        self.n_fraud = 0
        self.version = 0

    def learn(self, alert: Alert | Mapping[str, Any], fraud: bool) -> None:
        self.model.learn_one(alert_features(alert), bool(fraud))
        self.n_learned += 1
        self.n_fraud += bool(fraud)
        self.version += 1

    def priority(self, alert: Alert | Mapping[str, Any]) -> float:
        """P(an inspector confirms it as fraud), 0-1 (0.5 before any verdict)."""
        if not self.n_learned:
            return 0.5
        p = self.model.predict_proba_one(alert_features(alert)).get(True, 0.0)
        return round(float(p), 6)

    def prioritise(self, alerts: Sequence[Alert]) -> list[Alert]:
        """The alerts with ``metrics["priority"]`` set (new structs; the inputs are not changed)."""
        out = []
        for a in alerts:
            out.append(msgspec.structs.replace(a, metrics={**a.metrics, "priority": self.priority(a)}))
        return out

    def rank(self, alerts: Iterable[Alert | Mapping[str, Any]]) -> list:
        """Alerts by priority, highest first (ties: earliest ``window_end`` first, then rule and subject)."""
        def key(a):
            d = a if isinstance(a, Mapping) else msgspec.structs.asdict(a)
            return (-self.priority(a), str(d.get("window_end", "")), str(d.get("rule", "")),
                    str(d.get("subject_id", "")), str(d.get("alert_id", "")))
        return sorted(alerts, key=key)

    # -- persistence ----------------------------------------------------------------------
    def dumps(self) -> bytes:
        """Pickle of plain data and the river model (no class of this module: loads wherever it is imported)."""
        return pickle.dumps({"format": 1, "model": self.model, "n_learned": self.n_learned, "n_fraud": self.n_fraud,
                             "version": self.version}, protocol=5)

    @classmethod
    def loads(cls, blob: bytes) -> "PriorityModel":
        st = _Unpickler(io.BytesIO(blob)).load()
        if not isinstance(st, dict) or st.get("format") != 1 or type(st.get("model")).__module__.split(".")[0] \
                != "river":
            raise pickle.UnpicklingError(f"{REDIS_KEY} does not hold a priority model")
        m = cls(st["model"])
        m.n_learned, m.n_fraud, m.version = int(st["n_learned"]), int(st["n_fraud"]), int(st["version"])
        return m

    async def save(self, redis: Any, key: str = REDIS_KEY) -> None:
        await redis.set(key, self.dumps())

    @classmethod
    async def load(cls, redis: Any, key: str = REDIS_KEY) -> "PriorityModel":
        """The persisted model, or a fresh one when there is none (or it cannot be read)."""
        blob = await redis.get(key)
        if not blob:
            return cls()
        try:
            return cls.loads(blob)
        except Exception:
            import logging

            logging.getLogger("claimwatch.verdicts").error("%s unreadable; starting a fresh priority model", key,
                                                           exc_info=True)
            return cls()
