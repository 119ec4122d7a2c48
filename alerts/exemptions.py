"""Exemptions (豁免): approved long prescriptions (长处方), chronic / special-disease approvals
(慢特病) and other legitimate heavy users that silence named rules for named subjects.

Entries come from a YAML file (``configs/exemptions.yaml``) and from Redis (hash
``cw:exemptions``, written by ``claimwatch exemptions add``). Each has an author, a reason and
an expiry; validity is judged at the alert's event time, so a replay of last year honours the
approvals that were valid then. A suppressed alert is still stored (``suppressed: true``,
``metrics.exemption``), never dropped.

>>> reg = ExemptionRegistry.from_entries([{"subject_id": "C1", "rules": ["visit_frequency"], "kind": "chronic_approval",
...     "author": "王审核", "reason": "血透 慢特病备案", "valid_from": "2026-01-01", "expires": "2027-01-01"}])
>>> reg.match("C1", "visit_frequency", 1790000000.0)["kind"], reg.match("C1", "card_hopping", 1790000000.0)
('chronic_approval', None)
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

import orjson
import yaml

KINDS = ("long_prescription", "chronic_approval", "special_disease", "other")
REDIS_KEY = "cw:exemptions"
TZ = timezone(timedelta(hours=8))


class ExemptionError(ValueError):
    pass


def _to_ts(v: Any, field: str, where: str) -> float:
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, date):
        dt = datetime(v.year, v.month, v.day)
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise ExemptionError(f"{where}: {field} must be an ISO date or date-time, got {v!r}") from None
    else:
        raise ExemptionError(f"{where}: {field} must be an ISO date or date-time, got {v!r}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=TZ)
    return dt.timestamp()


def validate_entry(e: Any, where: str = "exemption") -> dict:
    if not isinstance(e, dict):
        raise ExemptionError(f"{where}: must be a mapping, got {type(e).__name__}")
    for f in ("subject_id", "rules", "kind", "author", "reason", "expires"):
        if f not in e or e[f] in (None, "", []):
            raise ExemptionError(f"{where}: {f} is required")
    if not isinstance(e["rules"], list) or not all(isinstance(r, str) and r for r in e["rules"]):
        raise ExemptionError(f"{where}: rules must be a list of rule ids (or ['*']), got {e['rules']!r}")
    if e["kind"] not in KINDS:
        raise ExemptionError(f"{where}: kind must be one of {', '.join(KINDS)}, got {e['kind']!r}")
    out = dict(e)
    out["subject_id"] = str(e["subject_id"])
    out["_from"] = _to_ts(e["valid_from"], "valid_from", where) if e.get("valid_from") else 0.0
    out["_until"] = _to_ts(e["expires"], "expires", where)
    if out["_until"] <= out["_from"]:
        raise ExemptionError(f"{where}: expires must be after valid_from")
    return out


class ExemptionRegistry:
    def __init__(self) -> None:
        self._by_subject: dict[str, list[dict]] = {}

    @classmethod
    def from_entries(cls, entries: Iterable[dict], where: str = "exemptions") -> "ExemptionRegistry":
        reg = cls()
        for i, e in enumerate(entries):
            reg.add(validate_entry(e, f"{where}[{i}]"))
        return reg

    @classmethod
    def load_file(cls, path: Path | str) -> "ExemptionRegistry":
        p = Path(path)
        if not p.exists():
            return cls()
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ExemptionError(f"{p}: not valid YAML: {exc}") from None
        entries = doc.get("exemptions") or [] if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ExemptionError(f"{p}: expected a mapping with a list 'exemptions'")
        return cls.from_entries(entries, f"{p}: exemptions")

    def add(self, entry: dict) -> None:
        self._by_subject.setdefault(entry["subject_id"], []).append(entry)

    def merge(self, other: "ExemptionRegistry") -> "ExemptionRegistry":
        out = ExemptionRegistry()
        for reg in (self, other):
            for entries in reg._by_subject.values():
                for e in entries:
                    out.add(e)
        return out

    def match(self, subject_id: str, rule: str, t: float) -> dict | None:
        for e in self._by_subject.get(subject_id, ()):
            if (rule in e["rules"] or "*" in e["rules"]) and e["_from"] <= t < e["_until"]:
                return {k: v for k, v in e.items() if not k.startswith("_")}
        return None

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_subject.values())


async def load_redis(redis) -> ExemptionRegistry:
    raw = await redis.hgetall(REDIS_KEY)
    reg = ExemptionRegistry()
    for _, v in sorted(raw.items()):
        try:
            reg.add(validate_entry(orjson.loads(v), "redis exemption"))
        except (ExemptionError, orjson.JSONDecodeError):
            continue  # written by `claimwatch exemptions add`, which validates; never crash the worker on one
    return reg


def entry_id(e: dict) -> str:
    import hashlib

    h = hashlib.sha256(orjson.dumps({k: e[k] for k in ("subject_id", "rules", "kind", "author", "expires")},
                                    option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()
    return "X-" + h[:12]
