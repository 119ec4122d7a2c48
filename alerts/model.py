"""The alert, as on the ``alerts`` topic and in exports (``shared/contract/alert.schema.json``).

Alert ids are deterministic from (run, rule, subject, window, episode), so a
redelivered event or a restarted worker upserts the same alert instead of
adding a second one.

>>> a = Alert(alert_id=alert_id("r1", "card_hopping", "card", "C1", "86400", 1.0), rule="card_hopping",
...           severity="high", subject_type="card", subject_id="C1", window_start="2026-11-24T09:00:00+08:00",
...           window_end="2026-11-24T18:00:00+08:00", evidence_event_ids=["E1"], run_id="r1")
>>> a.alert_id
'A-3276a59882de415d4eb0cae9'
>>> sorted(to_dict(a))[:3]
['alert_id', 'evidence_event_ids', 'rule']
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Literal

import msgspec

Severity = Literal["low", "medium", "high", "critical"]
SubjectType = Literal["card", "physician", "institution", "ring"]
SEVERITIES: tuple[str, ...] = ("low", "medium", "high", "critical")


class Alert(msgspec.Struct, omit_defaults=True, kw_only=True):
    alert_id: str
    rule: str
    severity: Severity
    subject_type: SubjectType
    subject_id: str
    window_start: str
    window_end: str
    evidence_event_ids: list[str]
    run_id: str
    rule_version: str = ""
    score: float | None = None
    member_ids: list[str] | None = None
    summary: str = ""
    summary_en: str = ""
    detected_at: str = ""
    status: str = "open"
    window_s: int | None = None
    metrics: dict[str, Any] = {}
    suppressed: bool = False


def alert_id(run_id: str, rule: str, subject_type: str, subject_id: str, window: str, episode: float | str) -> str:
    """Deterministic id of one alert episode."""
    h = hashlib.sha256(f"{run_id}\x1f{rule}\x1f{subject_type}\x1f{subject_id}\x1f{window}\x1f{episode}".encode())
    return "A-" + h.hexdigest()[:24]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def to_dict(a: Alert) -> dict[str, Any]:
    return msgspec.to_builtins(a)


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Alert)


def to_json(a: Alert) -> bytes:
    return _enc.encode(a)


def from_json(raw: bytes | str) -> Alert:
    return _dec.decode(raw)


def severity_for(ratio: float) -> Severity:
    """Severity from how far past its threshold a rule fired (value / threshold).

    >>> [severity_for(r) for r in (1.0, 1.3, 1.6, 2.5)]
    ['medium', 'medium', 'high', 'critical']
    """
    if ratio >= 2.0:
        return "critical"
    if ratio >= 1.5:
        return "high"
    return "medium"
